"""Painting the patches of a split in batches, in order, on a few threads.

Example::

    for part in iter_split(1000, seed=0, split="train"):
        part.images, part.labels  # (n, 96, 96, 3) uint8, (n,) int8
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from ..errors import PcamError
from ..system import cpu_threads
from . import schema
from .plan import SPLIT_CODE, noise_tiles, plan_split, seed64
from .render import render_batch

SIZE = schema.SIZE
CENTRE = (schema.CENTRE_LO, schema.CENTRE_HI + 1)  # the labelled square: pixels 32..63 on both axes


@dataclass
class Rendered:
    """A batch of painted patches with their ground truth.

    ``labels`` are the clean PCam labels measured on the painted tumour
    footprints (``tumour_mask[:, 32:64, 32:64].any()``), before label noise.
    ``cells`` (when asked for) holds each patch's cell rows, columns as in
    :mod:`pcamtool.synth.schema` (``C_X``, ``C_Y``, ``C_KIND``, ``C_CYR`` ...).
    """

    index: np.ndarray        # (n,) patch numbers within the split
    images: np.ndarray       # uint8 (n, 96, 96, 3)
    tumour_mask: np.ndarray  # bool (n, 96, 96)
    labels: np.ndarray       # int8 (n,)
    targets: np.ndarray      # (n,) what each patch was drawn to be (schema.T_*)
    slide: np.ndarray        # (n,) slide number within the split
    cells: Optional[list[np.ndarray]] = field(default=None, repr=False)


def iter_split(n: int, seed: int = 0, split: str = "train", batch: int = 256,
               with_cells: bool = False, workers: Optional[int] = None) -> Iterator[Rendered]:
    """Paint the ``n`` patches of a split, ``batch`` at a time, in order.

    Patch ``i`` depends only on ``(seed, split, n, i)`` (``n`` fixes the
    slides), never on the batching or the number of workers.

    Parameters
    ----------
    split
        ``"train"`` (three staining centres) or ``"test"`` (a fourth one).
    with_cells
        Also return every patch's cell list (for tests; costs memory).
    workers
        Threads painting batches side by side (the kernel releases the
        GIL); default: the CPU count, at most 4.
    """
    if split not in SPLIT_CODE:
        raise PcamError(f"split must be 'train' or 'test', not {split!r}")
    plan = plan_split(n, seed, split)
    raw, tex, noise = noise_tiles(seed64(seed))
    s64 = seed64(seed)
    lo, hi = s64 & 0xFFFFFFFF, s64 >> 32

    def paint(b0: int) -> Rendered:
        idx = np.arange(b0, min(n, b0 + batch), dtype=np.int64)
        m = len(idx)
        images = np.empty((m, SIZE, SIZE, 3), np.uint8)
        tmask = np.empty((m, SIZE, SIZE), np.bool_)
        cells = np.zeros((m if with_cells else 0, schema.MAX_CELLS, schema.N_CELL))
        ncell = np.zeros(m if with_cells else 0, np.int64)
        render_batch(plan.slides, plan.slide_of[idx], plan.targets[idx], idx, lo, hi,
                       SPLIT_CODE[split], raw, tex, noise, images, tmask, cells, ncell)
        labels = tmask[:, CENTRE[0]:CENTRE[1], CENTRE[0]:CENTRE[1]].any((1, 2)).astype(np.int8)
        cl = [cells[k, :ncell[k]].copy() for k in range(m)] if with_cells else None
        return Rendered(idx, images, tmask, labels, plan.targets[idx], plan.slide_of[idx], cl)

    starts = range(0, n, batch)
    workers = min(4, cpu_threads()) if workers is None else max(1, workers)
    if workers == 1 or len(starts) <= 1:
        for b0 in starts:
            yield paint(b0)
        return
    # Keep at most `workers` batches in flight beyond the one being consumed:
    # bounded memory, and the writer never waits on a cold pipeline.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synth") as pool:
        pending: deque[Future[Rendered]] = deque()
        for b0 in starts:
            pending.append(pool.submit(paint, b0))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

