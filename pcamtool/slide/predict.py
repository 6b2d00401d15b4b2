"""One slide through the model: tiles read on worker threads ahead of the ``infer`` sessions.

The model is run through the same :class:`pcamtool.onnx_io.ModelSession`
objects as ``pcamtool infer`` (providers, I/O binding, TTA in the graph on a
GPU, an ensemble averaged), opened once per cohort (:class:`SlideModel`).
Tiles are read in blocks (:func:`pcamtool.slide.tiles.blocks`), each worker
thread with its own OpenSlide handle (OpenSlide releases the GIL while it
decodes), a few blocks ahead of the model.

OpenSlide errors are sticky: after a failed read a handle answers nothing
more. So a block that fails is read again tile by tile on a fresh handle,
and a tile that still fails is skipped (NaN), counted and reported.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import ModelError
from ..progress import progress_bar
from ..system import cpu_threads
from .reader import TILE, Geometry, open_slide, openslide_module, read_tiles
from .tiles import TileGrid, blocks

log = logging.getLogger("pcamtool")


class SlideModel:
    """The ONNX model(s) of a cohort, opened once, as ``infer`` opens them; ``__call__`` gives probabilities."""

    def __init__(self, models: Sequence[str | os.PathLike], tta: Optional[int] = None, provider: str = "auto",
                 batch_size: int = 256) -> None:
        from ..infer import _stain_transform, expand_models
        from ..onnx_io import open_session

        self.paths = expand_models(models)
        self.sessions = [open_session(p, provider, batch_size=batch_size, tta=tta) for p in self.paths]
        self.batch_size = batch_size
        stains = {s.metadata.get("stain", '{"method": "none"}') for s in self.sessions}
        if len(stains) > 1:
            raise ModelError("the ensemble's models were trained with different stain normalizations")
        # Slides are never stain-normalized beforehand: a model trained on normalized patches gets its normalization here.
        self.transform = _stain_transform(json.loads(stains.pop()), {"method": "none"}, Path("slide"))

    @property
    def tta(self) -> int:
        return max(len(s.tta) for s in self.sessions)

    @property
    def provider(self) -> str:
        return self.sessions[0].providers[0]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        from ..infer import _model_mean

        if self.transform is not None:
            images = self.transform(images)
        return np.mean([_model_mean(s, images) for s in self.sessions], 0)


class _Reader:
    """Per-thread OpenSlide handles on one slide, reopened after an error."""

    def __init__(self, path: Path, geo: Geometry, xy: np.ndarray) -> None:
        self.path, self.geo, self.xy = path, geo, xy
        self.local = threading.local()
        self.handles: list[Any] = []
        self.lock = threading.Lock()
        self.error_type = openslide_module().OpenSlideError

    def _handle(self, fresh: bool = False) -> Any:
        if fresh or getattr(self.local, "slide", None) is None:
            self.local.slide = open_slide(self.path)
            with self.lock:
                self.handles.append(self.local.slide)
        return self.local.slide

    def read(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[str]]:
        """(indices, tiles, readable) of one block, and the first error's text (None if all read)."""
        try:
            return idx, read_tiles(self._handle(), self.geo, self.xy[idx]), np.ones(len(idx), bool), None
        except self.error_type as exc:
            first = str(exc).strip()[:200] or type(exc).__name__
        tiles = np.zeros((len(idx), TILE, TILE, 3), np.uint8)
        ok = np.ones(len(idx), bool)
        slide = self._handle(fresh=True)
        for k, i in enumerate(idx):
            try:
                tiles[k] = read_tiles(slide, self.geo, self.xy[i:i + 1])[0]
            except self.error_type:
                ok[k] = False
                slide = self._handle(fresh=True)
        return idx, tiles, ok, first

    def close(self) -> None:
        for h in self.handles:
            h.close()


@dataclass
class SlidePredictions:
    probs: np.ndarray          # float64 (n,), NaN where unreadable
    unreadable: int
    first_error: Optional[str]


def predict_tiles(path: Path, geo: Geometry, grid: TileGrid, model: SlideModel, workers: Optional[int] = None,
                  progress: bool = True, desc: str = "") -> SlidePredictions:
    """Probabilities of every tile of ``grid``, read on ``workers`` threads a few blocks ahead."""
    n = len(grid)
    probs = np.full(n, np.nan)
    if n == 0:
        return SlidePredictions(probs, 0, None)
    workers = workers or cpu_threads()
    reader = _Reader(path, geo, grid.xy)
    unreadable, first_error = 0, None
    buf_idx: list[np.ndarray] = []
    buf_tiles: list[np.ndarray] = []
    held = 0

    def flush(bar: Any) -> None:
        nonlocal held
        idx = np.concatenate(buf_idx)
        tiles = np.concatenate(buf_tiles)
        for s in range(0, len(idx), model.batch_size):
            probs[idx[s:s + model.batch_size]] = model(tiles[s:s + model.batch_size])
        bar.update(len(idx))
        buf_idx.clear()
        buf_tiles.clear()
        held = 0

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pcam-slide")
    try:
        with progress_bar(total=n, desc=desc, unit="tile", enabled=progress) as bar:
            pending: deque[Future] = deque()
            for idx in blocks(grid):
                pending.append(pool.submit(reader.read, idx))
                if len(pending) <= 2 * workers:   # read ahead: enough to hide a slow block, bounded memory
                    continue
                held, unreadable, first_error = _take(pending.popleft(), buf_idx, buf_tiles, held,
                                                      unreadable, first_error, bar)
                if held >= model.batch_size:
                    flush(bar)
            while pending:
                held, unreadable, first_error = _take(pending.popleft(), buf_idx, buf_tiles, held,
                                                      unreadable, first_error, bar)
                if held >= model.batch_size:
                    flush(bar)
            if held:
                flush(bar)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        reader.close()
    return SlidePredictions(probs, unreadable, first_error)


def _take(fut: Future, buf_idx: list, buf_tiles: list, held: int, unreadable: int, first_error: Optional[str],
          bar: Any) -> tuple[int, int, Optional[str]]:
    idx, tiles, ok, err = fut.result()
    if not ok.all():
        unreadable += int((~ok).sum())
        first_error = first_error or err
        bar.update(int((~ok).sum()))
        idx, tiles = idx[ok], tiles[ok]
    if len(idx):
        buf_idx.append(idx)
        buf_tiles.append(tiles)
    return held + len(idx), unreadable, first_error
