"""The one switch through which every numba kernel is compiled.

``PCAMTOOL_NUMBA=0`` in the environment (read once, at import) leaves every
kernel as plain Python, which is slow but debuggable. With the switch on, the
plain function of any kernel stays reachable as ``kernel.py_func``, so tests
compare the jitted and the plain-Python result of the same source.
"""
from __future__ import annotations

import os
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

ENABLED: bool = os.environ.get("PCAMTOOL_NUMBA", "1").strip().lower() not in ("0", "false", "no", "off")


def jit(fn: F) -> F:
    """Compile ``fn`` with numba (nopython, GIL released, cached on disk) when enabled."""
    if not ENABLED:
        fn.py_func = fn  # type: ignore[attr-defined]
        return fn
    import numba

    # nogil: kernels run in worker threads beside file reads.
    # cache: a fresh process does not pay compile time again.
    return numba.njit(nogil=True, cache=True, fastmath=False)(fn)  # type: ignore[return-value]


def plain(kernel: Callable) -> Callable:
    """The plain-Python version of a kernel (itself when the switch is off)."""
    return getattr(kernel, "py_func", kernel)
