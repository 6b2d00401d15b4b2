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

    ``images`` is (N, H, W, 3) uint8; ``sums`` and ``sqsums`` are (3,) uint64,
    updated in place.
    """
    n, h, w, c = images.shape
    assert c == 3  # three scalar accumulators per statistic, below
    for i in range(n):
        if not keep[i]:
            continue
        # Scalars, not small arrays: a store into s[k] every byte kept LLVM
        # from vectorizing, ~1 GB/s; scalars run at ~6 GB/s.
        s0 = s1 = s2 = np.uint32(0)
        q0 = q1 = q2 = np.uint32(0)
        for y in range(h):
            for x in range(w):
                a = np.uint32(images[i, y, x, 0])
                b = np.uint32(images[i, y, x, 1])
                d = np.uint32(images[i, y, x, 2])
                s0 += a
                s1 += b
                s2 += d
                q0 += a * a
                q1 += b * b
                q2 += d * d
        sums[0] += np.uint64(s0)
        sums[1] += np.uint64(s1)
        sums[2] += np.uint64(s2)
        sqsums[0] += np.uint64(q0)
        sqsums[1] += np.uint64(q1)
        sqsums[2] += np.uint64(q2)


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
