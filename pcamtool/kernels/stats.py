"""Exact statistics kernels: per-channel pixel sums, percentiles without sorting, row copies.

Integers make the pixel sums exact whatever the order in which chunks
arrive: uint32 accumulators per image cannot overflow (96*96*255^2 < 2^32),
and the per-image totals are added into uint64. Percentiles are numpy's
(method "linear"), found by a histogram selection instead of a sort.
"""
from __future__ import annotations

import math

import numpy as np

from .jit import jit


LANES = 48  # bytes per step: 16 RGB pixels, so lane k always holds channel k % 3


@jit
def channel_sums(images, keep, sums, sqsums):
    """Add the per-channel sum and sum of squares of ``images[i]`` where ``keep[i]``.

    ``images`` is C-contiguous (N, H, W, 3) uint8; ``sums`` and ``sqsums`` are
    (3,) uint64, updated in place.
    """
    n, h, w, c = images.shape
    assert c == 3
    flat = images.reshape(n, h * w * c)
    size = h * w * c
    body = size - size % LANES
    # Per-lane uint32 accumulators (a lane sees at most size/48 bytes, so
    # they cannot overflow for any patch size pack meets). Lanes of whole
    # 48-byte rows, not three scalars per pixel: the stride-3 channel
    # interleave made LLVM shuffle every vector, ~9 GB/s; rows of 48 add
    # straight down, ~12 GB/s.
    acc = np.zeros(LANES, np.uint32)
    sq = np.zeros(LANES, np.uint32)
    for i in range(n):
        if not keep[i]:
            continue
        acc[:] = 0
        sq[:] = 0
        x = flat[i]
        for j in range(0, body, LANES):
            row = x[j:j + LANES]
            for k in range(LANES):
                v = np.uint32(row[k])
                acc[k] += v
                sq[k] += v * v
        for k in range(LANES):
            sums[k % 3] += np.uint64(acc[k])
            sqsums[k % 3] += np.uint64(sq[k])
        for j in range(body, size):  # images whose byte count is not a multiple of 48
            v = np.uint64(x[j])
            sums[j % 3] += v
            sqsums[j % 3] += v * v


@jit
def copy_rows(src, chunk_offsets, rows_per_chunk, row_bytes, indices, out):
    """Copy rows ``indices`` of a chunked, uncompressed dataset out of a memory-mapped file into ``out``.

    ``src`` is the whole file as uint8; row ``i`` lives at
    ``chunk_offsets[i // rows_per_chunk] + (i % rows_per_chunk) * row_bytes``.
    ``out`` is (len(indices), row_bytes) uint8.
    """
    for j in range(indices.shape[0]):
        i = indices[j]
        off = chunk_offsets[i // rows_per_chunk] + (i % rows_per_chunk) * row_bytes
        # A loop over two views, not ``out[j, :] = src[...]``: numba's slice
        # assignment copies a byte at a time (~2 GB/s); this loop vectorizes.
        a = src[off:off + row_bytes]
        b = out[j]
        for k in range(row_bytes):
            b[k] = a[k]


# ---- order statistics ----

_NBINS = 1024  # histogram bins of the order-statistic search


@jit
def _bin(v, lo, scale):
    """Histogram bin of ``v``: non-decreasing in ``v``, so the values of a bin all lie between
    those of the bins around it; values outside the range fall in the end bins, +inf (filler)
    in the extra last bin."""
    b = int(min(max((v - lo) * scale, 0.0), _NBINS - 1.0))
    return _NBINS if v == np.inf else b


@jit
def order_stats(a, lo, hi, ranks):
    """The order statistics ``ranks`` (0-based, ascending) of the finite values of ``a``; +inf
    entries are filler that sorts last.

    Exact, without sorting ``a``: count the values in _NBINS bins of [lo, hi] (any range
    is exact; one that hugs the values keeps the bins small), then collect, in one pass,
    the values of the bins that hold the wanted ranks (a few dozen in a 1% tail) and sort
    only those (in a near-constant image, up to all of them: a sort, as numpy does). A
    quickselect was slower on real patches: its branches mispredict.
    """
    scale = _NBINS / (hi - lo) if hi > lo else 0.0
    bins = np.empty(a.size, np.int64)
    for i in range(a.size):  # vectorizes
        bins[i] = _bin(a[i], lo, scale)
    hist = np.zeros((4, _NBINS + 1), np.int64)
    for i in range(a.size):  # four interleaved counts: runs of one bin do not wait on one store
        hist[i & 3, bins[i]] += 1
    counts = hist[0] + hist[1] + hist[2] + hist[3]
    want = np.zeros(_NBINS + 1, np.int64)  # 1 for the bins to collect
    pos = np.empty(ranks.size, np.int64)   # each rank's place among the collected values
    b, below, taken = 0, 0, 0              # values in bins < b, and in wanted bins < b
    for j in range(ranks.size):
        while below + counts[b] <= ranks[j]:
            below += counts[b]
            taken += want[b] * counts[b]
            b += 1
        want[b] = 1
        pos[j] = taken + ranks[j] - below
    vals = np.empty((want * counts).sum() + 1)
    c = 0
    for i in range(a.size):  # branch-free: the spare last slot takes the writes of unwanted values
        vals[c] = a[i]
        c += want[bins[i]]
    vals = np.sort(vals[:c])
    out = np.empty(ranks.size)
    for j in range(ranks.size):
        out[j] = vals[pos[j]]
    return out


@jit
def percentile_pairs(a, count, lo, hi, qs):
    """For each quantile in ``qs`` (ascending), the two order statistics and the weight that
    ``np.percentile(sample, 100 q)`` (method "linear": virtual index ``q (count - 1)``)
    interpolates between, where the sample is the ``count`` finite values of ``a``, most
    of them in [lo, hi]."""
    ranks = np.empty(2 * qs.size, np.int64)
    gamma = np.empty(qs.size)
    for j in range(qs.size):
        virtual = qs[j] * (count - 1)
        k = int(math.floor(virtual))
        ranks[2 * j] = k
        ranks[2 * j + 1] = min(k + 1, count - 1)
        gamma[j] = virtual - k
    stats = order_stats(a, lo, hi, ranks)
    return stats[0::2], stats[1::2], gamma


@jit
def lerp_quantile(a, b, t):
    """numpy's quantile interpolation, the same floating-point expression."""
    d = b - a
    return b - d * (1.0 - t) if t >= 0.5 else a + d * t
