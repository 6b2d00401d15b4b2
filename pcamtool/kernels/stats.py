"""Exact per-channel pixel sums of uint8 image batches.

Integers make the statistics exact whatever the order in which chunks
arrive: a uint32 accumulator per image cannot overflow (96*96*255^2 < 2^32),
and the per-image totals are added into uint64.
"""
from __future__ import annotations

import numpy as np

from .jit import jit


@jit
def channel_sums(images, keep, sums, sqsums):
    """Add the per-channel sum and sum of squares of ``images[i]`` where ``keep[i]``.

    ``images`` is (N, H, W, C) uint8; ``sums`` and ``sqsums`` are (C,) uint64,
    updated in place.
    """
    n, h, w, c = images.shape
    s = np.zeros(c, np.uint32)
    q = np.zeros(c, np.uint32)
    for i in range(n):
        if not keep[i]:
            continue
        s[:] = 0
        q[:] = 0
        img = images[i]
        for y in range(h):
            for x in range(w):
                for k in range(c):
                    v = np.uint32(img[y, x, k])
                    s[k] += v
                    q[k] += v * v
        for k in range(c):
            sums[k] += np.uint64(s[k])
            sqsums[k] += np.uint64(q[k])


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
        out[j, :] = src[off:off + row_bytes]
