"""Exact per-channel pixel sums of uint8 image batches.

Integers make the statistics exact whatever the order in which chunks
arrive: uint32 accumulators per image cannot overflow (96*96*255^2 < 2^32),
and the per-image totals are added into uint64.
"""
from __future__ import annotations

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
def gather_rows(src, chunk_offsets, rows_per_chunk, row_bytes, indices, out):
    """Copy rows ``indices`` of a chunked, uncompressed dataset out of a byte map.

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
