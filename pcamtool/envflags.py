"""The one parser of pcamtool's on/off environment variables.

``PCAMTOOL_NUMBA``, ``PCAMTOOL_AMP``, ``PCAMTOOL_CHANNELS_LAST`` and
``PCAMTOOL_DEBUG`` each take 1/0, true/false, yes/no or on/off (any case);
unset or empty means the default. Anything else is an error naming the
variable and its value: ``PCAMTOOL_AMP=banana`` used to be taken as "on"
without a word, and ``PCAMTOOL_DEBUG=0`` as "on".

Example::

    PCAMTOOL_AMP=off pcamtool train      # fp32 everywhere
"""
from __future__ import annotations

import os

from .errors import PcamError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")

# Every on/off variable pcamtool reads, with its default; the CLI checks them all before a command runs.
FLAGS = {
    "PCAMTOOL_NUMBA": True,           # numba kernels (off: plain Python, slow but debuggable)
    "PCAMTOOL_AMP": True,             # mixed precision where the hardware has it
    "PCAMTOOL_CHANNELS_LAST": True,   # channels-last tensors on the CPU
    "PCAMTOOL_DEBUG": False,          # tracebacks instead of one-line errors
}


def env_flag(name: str, default: bool | None = None) -> bool:
    """The on/off value of environment variable ``name`` (``default`` when unset or empty).

    ``default`` None takes the one in :data:`FLAGS`.

    Raises
    ------
    PcamError
        The value is none of 1/0, true/false, yes/no, on/off.
    """
    if default is None:
        default = FLAGS[name]
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise PcamError(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off")


def check_env_flags() -> None:
    """Raise :class:`PcamError` for the first variable of :data:`FLAGS` set to something else than on/off."""
    for name in FLAGS:
        env_flag(name)
