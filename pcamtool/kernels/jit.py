"""The one switch through which every numba kernel is compiled.

``PCAMTOOL_NUMBA=0`` in the environment (read once, at import) leaves every
kernel as plain Python, which is slow but debuggable. With the switch on, the
plain function of any kernel stays reachable as ``kernel.py_func``, so tests
compare the jitted and the plain-Python result of the same source.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, TypeVar, Union

F = TypeVar("F", bound=Callable)

ENABLED: bool = os.environ.get("PCAMTOOL_NUMBA", "1").strip().lower() not in ("0", "false", "no", "off")


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

    # nogil: kernels run in worker threads beside file reads.
    # cache: a fresh process does not pay compile time again.
    compiled = numba.njit(nogil=True, cache=True, fastmath=fastmath, error_model=error_model)(fn)
    return compiled  # type: ignore[no-any-return]


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
