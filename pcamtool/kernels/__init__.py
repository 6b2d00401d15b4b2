"""Every numba kernel of pcamtool, compiled through one switch (:mod:`.jit`).

``PCAMTOOL_NUMBA=0`` runs them all as plain Python; ``plain(kernel)`` gives
the plain-Python function of any kernel for tests.
"""
from .jit import ENABLED, jit, plain

__all__ = ["ENABLED", "jit", "plain"]
