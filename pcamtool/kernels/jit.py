"""The one switch through which every numba kernel is compiled.

``PCAMTOOL_NUMBA=0`` in the environment (read once, at import) leaves every
kernel as plain Python, which is slow but debuggable. With the switch on, the
plain function of any kernel stays reachable as ``kernel.py_func``, so tests
compare the jitted and the plain-Python result of the same source.

Kernels compile on their first call and are cached on disk (numba's cache,
``__pycache__`` beside the sources or ``NUMBA_CACHE_DIR``). The first run on
a machine therefore spends seconds compiling (about 10 s for pack's kernels on
2 cores); so that it does not look like a slow tool, the first compile that
misses the cache logs "compiling kernels (first run only)" once per process.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Callable, Optional, TypeVar, Union

from ..envflags import env_flag

F = TypeVar("F", bound=Callable)

# 1/0, true/false, yes/no, on/off; anything else is an error naming the value (pcamtool.envflags).
ENABLED: bool = env_flag("PCAMTOOL_NUMBA")


def jit(fn: Optional[F] = None, *, fastmath: Union[bool, frozenset, set] = False,
        error_model: str = "python") -> F:
    """Compile ``fn`` with numba (nopython, GIL released, cached on disk) when enabled.

    Used bare (``@jit``) or with options for a kernel that documents why it needs them:
    LLVM fast-math flags (``fastmath={"contract"}``), which apply to the instructions
    of that function only, also where it is inlined into another; and
    ``error_model="numpy"``, which drops the division-by-zero check (and its
    exception branch, which keeps LLVM from vectorizing a loop) of a function whose
    divisions are guarded.
    """
    if fn is None:
        return lambda f: jit(f, fastmath=fastmath, error_model=error_model)  # type: ignore[return-value]
    if not ENABLED:
        fn.py_func = fn  # type: ignore[attr-defined]
        return fn
    import numba

    _watch_compiles()
    # nogil: kernels run in worker threads beside file reads.
    # cache: a fresh process does not pay compile time again.
    compiled = numba.njit(nogil=True, cache=True, fastmath=fastmath, error_model=error_model)(fn)
    return compiled  # type: ignore[no-any-return]


COMPILE_NOTICE = "compiling kernels (first run only; later runs load them from numba's cache)"

_notice_lock = threading.Lock()
_watching = False
_announced = False


def _watch_compiles() -> None:
    """Log COMPILE_NOTICE at the first compile of a pcamtool kernel in this process.

    numba fires its ``numba:compile`` event only when a signature misses the
    disk cache (a hit loads without it), so a warm cache stays silent. The
    notice goes through the "pcamtool" logger: stderr on the CLI, silenced by
    ``pcamtool -q``.
    """
    global _watching
    with _notice_lock:
        if _watching:
            return
        _watching = True
    from numba.core import event

    class _FirstCompile(event.Listener):
        def on_start(self, ev: Any) -> None:
            global _announced
            dispatcher = (ev.data or {}).get("dispatcher")
            module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
            if not module.startswith("pcamtool"):
                return  # another library's numba code is not ours to announce
            with _notice_lock:
                if _announced:
                    return
                _announced = True
            log = logging.getLogger("pcamtool")
            if not log.isEnabledFor(logging.INFO):
                return
            # Compiles start inside work that already shows a progress bar:
            # clear the bars for the line and redraw them after it.
            from tqdm import tqdm

            with tqdm.external_write_mode(file=sys.stderr):
                log.info(COMPILE_NOTICE)

        def on_end(self, ev: Any) -> None:
            pass

    event.register("numba:compile", _FirstCompile())


def plain(kernel: Callable) -> Callable:
    """The plain-Python version of a kernel (itself when the switch is off)."""
    return getattr(kernel, "py_func", kernel)


def libc(name: str, restype: str, *argtypes: str) -> Optional[Any]:
    """A C library function that kernels may call, or None where they cannot.

    Linked by symbol name (``numba.types.ExternalFunction``), not through a
    ctypes pointer, so kernels calling it still cache on disk. Types are numba
    type names; pointers travel as ``intp`` (same calling convention on the
    64-bit POSIX platforms numba supports). None with the switch off (plain
    Python cannot call it) and off POSIX: callers keep a Python path for both.
    """
    if not ENABLED or os.name != "posix":
        return None
    from numba import types

    sig = getattr(types, restype)(*(getattr(types, a) for a in argtypes))
    return types.ExternalFunction(name, sig)
