"""Batches for training and evaluation, straight from a store.

Rows come out of the store as uint8 (memory map, RAM or GPU copy), are
assembled into a batch in uint8, and only then move to the device: float
conversion, normalization and augmentation happen there (see
:mod:`pcamtool.contract` and :mod:`pcamtool.augment`). A background thread
prepares the next batches while the current one trains.

On CUDA nothing here makes the training step wait for the host: RAM and
memory-map batches are gathered into reusable pinned buffers and copied with
``non_blocking=True`` on a side stream, and the compute stream waits on an
event, not the host; the GPU cache gathers on the device. On the CPU the
same code runs with stand-ins (no pinning, no stream, no copy) chosen once.
"""
from __future__ import annotations

import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

import numpy as np
import torch

from ..constants import CACHES
from ..errors import PcamError
from ..io.store import ROW_BYTES, SHAPE, Store
from ..system import available_ram

UPLOAD_ROWS = 8192  # rows per host-to-GPU copy when filling the GPU cache (~226 MB)


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


class _Copier:
    """Host-to-device copies that never block the compute stream (CUDA).

    Copies run on a side stream; each batch carries an event the compute
    stream waits on, and its tensors are marked as used by the compute stream
    so the caching allocator does not hand their memory out early.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def pinned(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=True)

    def on_side(self) -> ContextManager:
        return torch.cuda.stream(self.stream)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    def record(self) -> Any:
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def host_wait(self, ev: Any) -> None:
        # the loader thread waits, never the training step; polled rather than
        # Event.synchronize() so no synchronising call is made even in this thread
        while ev is not None and not ev.query():
            time.sleep(1e-4)

    def use(self, ev: Any, tensors: Sequence[torch.Tensor]) -> None:
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(ev)
        for t in tensors:
            t.record_stream(stream)


class _CpuCopier(_Copier):
    """The CPU stand-in: plain memory, no stream, tensors used where they are."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def pinned(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype)

    def on_side(self) -> ContextManager:
        return nullcontext()

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def record(self) -> Any:
        return None

    def use(self, ev: Any, tensors: Sequence[torch.Tensor]) -> None:
        pass


def make_copier(device: torch.device) -> _Copier:
    return _Copier(device) if device.type == "cuda" else _CpuCopier(device)


class RowSource:
    """Gathers uint8 rows by index from wherever ``cache`` put them."""

    def __init__(self, store: Store, cache: str, device: torch.device) -> None:
        self.store = store
        self.cache = cache
        self.device = device
        self.copier = make_copier(device)
        self.labels = torch.from_numpy(store.labels.astype(np.float32)).to(device)
        self.gpu: Optional[torch.Tensor] = None
        if cache == "gpu":
            # chunk by chunk: no second host copy of the whole set is ever alive
            self.gpu = torch.empty((len(store), *SHAPE), dtype=torch.uint8, device=device)
            for start, rows in store.chunks(UPLOAD_ROWS):
                self.gpu[start:start + len(rows)].copy_(torch.from_numpy(rows))
        elif cache == "ram":
            store.load()
        self.fill: Callable[[np.ndarray, _Slot], tuple[torch.Tensor, torch.Tensor]] = (
            self._fill_gpu if self.gpu is not None else self._fill_host)


    def _fill_host(self, idx: np.ndarray, slot: "_Slot") -> tuple[torch.Tensor, torch.Tensor]:
        n = len(idx)
        self.store.gather(idx, out=slot.x_np[:n])
        slot.i[:n].copy_(torch.from_numpy(idx))
        x = self.copier.to_device(slot.x[:n])
        i = self.copier.to_device(slot.i[:n])
        return x, self.labels.index_select(0, i)

    def _fill_gpu(self, idx: np.ndarray, slot: "_Slot") -> tuple[torch.Tensor, torch.Tensor]:
        slot.i[:len(idx)].copy_(torch.from_numpy(idx))
        i = self.copier.to_device(slot.i[:len(idx)])
        return self.gpu.index_select(0, i), self.labels.index_select(0, i)  # type: ignore[union-attr]


class _Slot:
    """One reusable host buffer (pinned on CUDA) and the event of its last copy."""

    def __init__(self, copier: _Copier, batch_size: int, with_images: bool) -> None:
        self.x = copier.pinned((batch_size, *SHAPE) if with_images else (0,), torch.uint8)
        self.x_np = self.x.numpy()  # the same memory, for Store.gather(out=...)
        self.i = copier.pinned((batch_size,), torch.int64)
        self.copied: Any = None


@dataclass
class Batch:
    x: torch.Tensor      # uint8 (B, 96, 96, 3) on the device
    y: torch.Tensor      # float32 (B,) on the device
    index: np.ndarray    # store rows


class BatchLoader:
    """Epochs of (optionally shuffled) batches over ``indices`` of a store.

    Deterministic: epoch ``e`` shuffles with ``seed + e``. With ``world > 1``
    each rank takes every ``world``-th row of the epoch's permutation (DDP),
    padded so all ranks run the same number of steps. Batch tensors are only
    valid until the next batch is asked for (their host buffers are reused);
    keep copies, not the tensors, across steps.
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
        self.epoch = 0
        # a slot per queued batch, one with the consumer, one being filled, one spare
        self._slots = [_Slot(source.copier, self.batch_size, source.gpu is None) for _ in range(max(prefetch, 0) + 3)]

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler stands: the next epoch's permutation follows from these."""
        return {"epoch": self.epoch, "seed": self.seed, "rows": len(self.indices), "world": self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        differ = [k for k in ("seed", "rows", "world") if k in state and state[k] != mine[k]]
        if differ:
            raise PcamError(f"the checkpoint's sampler ({', '.join(f'{k} {state[k]}' for k in differ)}) "
                            f"does not match this run ({', '.join(f'{k} {mine[k]}' for k in differ)})")
        self.epoch = int(state["epoch"])

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
        # batch ends: with drop_last up to len(idx) itself (a last full batch is kept), else one partial batch more
        stops = range(self.batch_size, len(idx) + (1 if self.drop_last else self.batch_size), self.batch_size)
        parts = [idx[s - self.batch_size:s] for s in stops]
        copier = self.source.copier

        def make(k: int, part: np.ndarray) -> tuple[Batch, Any]:
            slot = self._slots[k % len(self._slots)]
            copier.host_wait(slot.copied)  # the slot's previous copy must be done before refilling it
            with copier.on_side():
                x, y = self.source.fill(part, slot)
                slot.copied = copier.record()
            return Batch(x, y, part), slot.copied

        def ready(item: tuple[Batch, Any]) -> Batch:
            b, ev = item
            copier.use(ev, (b.x, b.y))
            return b

        if self.prefetch <= 0:
            for k, part in enumerate(parts):
                yield ready(make(k, part))
            return
        # One producer thread overlaps gathering (numba, GIL released) with compute.
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce() -> None:
            try:
                for k, part in enumerate(parts):
                    if stop.is_set():
                        return
                    q.put(make(k, part))
            except BaseException as exc:  # hand errors to the consumer
                q.put(exc)
            q.put(None)

        t = threading.Thread(target=produce, daemon=True, name="pcam-batches")
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield ready(item)
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.01)
