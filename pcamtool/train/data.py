"""Batches for training and evaluation, straight from a store.

Rows come out of the store as uint8 (memory map, RAM or GPU copy), are
assembled into a batch in uint8, and only then move to the device: float
conversion, normalization and augmentation happen there (see
:mod:`pcamtool.preprocess` and :mod:`pcamtool.augment`). A background thread
prepares the next batch while the current one trains.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ..errors import PcamError
from ..io.store import ROW_BYTES, Store
from ..system import available_ram

CACHES = ("auto", "gpu", "ram", "mmap")


def resolve_cache(cache: str, store: Store, device: torch.device) -> str:
    """Where batches are gathered from: ``gpu``, ``ram`` or ``mmap``.

    ``auto`` keeps the uint8 set on the GPU when it takes under half of the
    free GPU memory (6 GB for the full Kaggle set), else in RAM when under
    half of the available memory, else gathers from the memory map.
    Compressed stores cannot be mapped and are decompressed into RAM once.
    """
    if cache not in CACHES:
        raise PcamError(f"unknown cache {cache!r} (choose from {', '.join(CACHES)})")
    size = len(store) * ROW_BYTES
    if cache == "gpu" and device.type != "cuda":
        raise PcamError("--cache gpu needs a CUDA device")
    if cache == "mmap" and not store.mappable:
        raise PcamError(f"{store.path}: compressed store cannot be memory-mapped (use --cache ram, or pack with --compression none)")
    if cache != "auto":
        return cache
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if size < free // 2:
            return "gpu"
    if not store.mappable or size < available_ram() // 2:
        return "ram"
    return "mmap"


class RowSource:
    """Gathers uint8 rows by index from wherever ``cache`` put them."""

    def __init__(self, store: Store, cache: str, device: torch.device) -> None:
        self.store = store
        self.cache = cache
        self.device = device
        self.gpu: Optional[torch.Tensor] = None
        if cache == "gpu":
            self.gpu = torch.from_numpy(store.load()).to(device)
        elif cache == "ram":
            store.load()

    def batch(self, idx: np.ndarray, pin: bool = False) -> torch.Tensor:
        """Rows ``idx`` as a uint8 (B, 96, 96, 3) tensor on the device."""
        if self.gpu is not None:
            return self.gpu.index_select(0, torch.from_numpy(idx).to(self.device))
        x = torch.from_numpy(self.store.gather(idx))
        if pin:
            x = x.pin_memory()
        return x.to(self.device, non_blocking=pin)


@dataclass
class Batch:
    x: torch.Tensor      # uint8 (B, 96, 96, 3) on the device
    y: torch.Tensor      # float32 (B,) on the device
    index: np.ndarray    # store rows


class BatchLoader:
    """Epochs of (optionally shuffled) batches over ``indices`` of a store.

    Deterministic: epoch ``e`` shuffles with ``seed + e``. With ``world > 1``
    each rank takes every ``world``-th row of the epoch's permutation (DDP),
    padded so all ranks run the same number of steps.
    """

    def __init__(self, source: RowSource, indices: Sequence[int], batch_size: int,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world: int = 1, prefetch: int = 2) -> None:
        self.source = source
        self.indices = np.asarray(indices, np.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank, self.world = rank, world
        self.prefetch = prefetch
        self.labels = torch.from_numpy(source.store.labels.astype(np.float32))
        self.epoch = 0

    def epoch_indices(self, epoch: int) -> np.ndarray:
        idx = self.indices
        if self.shuffle:
            idx = idx[np.random.default_rng(self.seed + epoch).permutation(len(idx))]
        if self.world > 1:
            per = -(-len(idx) // self.world)
            idx = np.resize(idx, per * self.world)[self.rank::self.world]
        return idx

    def __len__(self) -> int:
        n = len(self.epoch_indices(0))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        idx = self.epoch_indices(self.epoch)
        self.epoch += 1
        stops = range(self.batch_size, len(idx) + (0 if self.drop_last else self.batch_size), self.batch_size)
        parts = [idx[s - self.batch_size:s] for s in stops if s - self.batch_size < len(idx)]
        pin = self.source.device.type == "cuda" and self.source.gpu is None
        dev = self.source.device

        def make(part: np.ndarray) -> Batch:
            y = self.labels[torch.from_numpy(part)]
            return Batch(self.source.batch(part, pin), y.to(dev, non_blocking=pin), part)

        if self.prefetch <= 0:
            for part in parts:
                yield make(part)
            return
        # One producer thread overlaps gathering (numba, GIL released) with compute.
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for part in parts:
                    if stop.is_set():
                        return
                    q.put(make(part))
            except BaseException as exc:  # hand errors to the consumer
                q.put(exc)
            q.put(None)

        t = threading.Thread(target=produce, daemon=True, name="pcam-batches")
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.01)
