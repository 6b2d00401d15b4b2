"""Per-patch random numbers for the synthetic-patch kernels.

A 32-bit xorshift generator whose state is seeded per patch from ``(seed,
split, index)``, so a patch never depends on the batch it is painted in. All
integer steps stay below 2**63, so the plain-Python kernels
(``PCAMTOOL_NUMBA=0``) draw exactly the numbers the jitted ones do.
"""
from __future__ import annotations

import math

from ..kernels.jit import jit

M32 = 0xFFFFFFFF


@jit
def _mul32(a, b):
    """``a * b mod 2**32`` in 16-bit halves, so no product passes 2**48."""
    return (a * (b & 0xFFFF) + (((a * (b >> 16)) & 0xFFFF) << 16)) & M32


@jit
def _mix32(h):
    """MurmurHash3's finaliser: a bijective scramble of 32 bits."""
    h ^= h >> 16
    h = _mul32(h, 0x85EBCA6B)
    h ^= h >> 13
    h = _mul32(h, 0xC2B2AE35)
    h ^= h >> 16
    return h


@jit
def patch_state(seed_lo, seed_hi, code, index):
    """The generator state of one patch, from (seed, split code, patch index)."""
    h = _mix32((seed_lo & M32) ^ 0x9E3779B9)
    h = _mix32(h ^ (seed_hi & M32))
    h = _mix32(h ^ (code & M32))
    h = _mix32(h ^ (index & M32))
    h = _mix32(h ^ ((index >> 32) & M32))
    return h if h != 0 else 0x2545F491


@jit
def uniform(st):
    """A uniform in [0, 1) from the xorshift32 state ``st[0]`` (24 bits)."""
    x = st[0] & M32  # any state stays in 32 bits (a stray negative one cannot index out of range)
    x ^= (x << 13) & M32
    x ^= x >> 17
    x ^= (x << 5) & M32
    st[0] = x
    return (x >> 8) * (1.0 / 16777216.0)


@jit
def uniform_in(st, a, b):
    return a + (b - a) * uniform(st)


@jit
def normal(st):
    """A standard normal (Box-Muller)."""
    u1 = uniform(st)
    if u1 < 1e-9:
        u1 = 1e-9
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * uniform(st))
