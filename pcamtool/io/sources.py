"""Images to predict or look at: a folder of tifs or a packed store, whole or one shard.

``infer`` and ``eda`` both take "a tif folder or a store"; this is the one
place that tells them apart, lists ids, and hands out uint8 batches (tifs
decoded by the fast reader on worker threads, the next batch decoding while
the current one is used).

Example::

    src = ImageSource("data/test", shard=(0, 4))
    for images, errors in src.batches(256):
        ...
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np

from ..errors import BadImageError, PcamError
from ..system import cpu_threads

if TYPE_CHECKING:
    from ..stain import StainReference


def shard_slice(n_items: int, i: int, n: int) -> slice:
    """The items of shard ``i`` of ``n`` (0-based) out of ``n_items``.

    Shards are contiguous, disjoint, cover every item, and differ in size by
    at most one.

    Raises
    ------
    PcamError
        ``n < 1``, ``i`` outside ``0 .. n-1`` or ``n_items < 0``.
    """
    if n < 1 or not 0 <= i < n:
        raise PcamError(f"shard {i}/{n}: need n >= 1 and 0 <= i < n")
    if n_items < 0:
        raise PcamError(f"cannot shard {n_items} items")
    return slice(i * n_items // n, (i + 1) * n_items // n)


def named_folder(folder: Path) -> Path:
    """``folder`` with a real last name: ``.`` and ``..`` resolved (``Path('.').name`` is empty)."""
    return folder.resolve() if folder.name in ("", "..") else folder


def labels_beside(folder: Path) -> Path:
    """Kaggle keeps ``train_labels.csv`` beside ``train/`` (also when ``folder`` is ``.``)."""
    folder = named_folder(folder)
    return folder.parent / f"{folder.name}_labels.csv"


class ImageSource:
    """Ids, labels (if known) and uint8 batches of a tif folder or a store.

    Parameters
    ----------
    src
        A folder of ``.tif`` files or a store written by ``pack``.
    shard
        ``(i, n)``: only the i-th of n contiguous slices.
    workers
        Decoding threads for tifs (default: the usable cores).
    """

    def __init__(self, src: str | os.PathLike, shard: Optional[tuple[int, int]] = None,
                 workers: Optional[int] = None) -> None:
        self.src = Path(src)
        self.workers = workers or cpu_threads()
        self.store: Any = None
        if not self.src.exists():
            raise PcamError(f"{self.src}: not found")
        if self.src.is_dir():
            from .tiff import list_tifs

            listing = list_tifs(self.src)
            if not listing.paths:
                raise PcamError(f"{self.src}: no .tif files found")
            items: list[Any] = listing.paths
            ids = listing.ids
        else:
            from .store import open_store

            self.store = open_store(self.src)
            ids = list(self.store.ids)
            items = list(range(len(ids)))
            if not ids:
                raise PcamError(f"{self.src}: store is empty")
        sl = shard_slice(len(ids), *shard) if shard else slice(None)
        self.ids: list[str] = ids[sl]
        self.items: list[Any] = items[sl]

    def __len__(self) -> int:
        return len(self.ids)

    def stain(self) -> "StainReference":
        """The stain normalization the images carry (tifs: none)."""
        from ..stain import StainReference

        return StainReference.from_dict(self.store.stain() if self.store is not None else None)

    def labels(self) -> Optional[np.ndarray]:
        """int8 labels per id (-1 unknown), or ``None`` where there are none at all."""
        if self.store is not None:
            return np.asarray(self.store.labels)[np.asarray(self.items, np.int64)]
        csv_path = labels_beside(self.src)
        if not csv_path.exists():
            return None
        from .csvio import read_labels

        table = read_labels(csv_path)
        return np.array([table.get(i, -1) for i in self.ids], np.int8)

    def subset(self, keep: Sequence[int]) -> "ImageSource":
        """The same source restricted to positions ``keep`` (in order)."""
        out = object.__new__(ImageSource)
        out.__dict__.update(self.__dict__)
        out.ids = [self.ids[i] for i in keep]
        out.items = [self.items[i] for i in keep]
        return out

    def batches(self, size: int) -> Iterator[tuple[np.ndarray, list[Optional[BadImageError]]]]:
        """``(images, errors)`` of ``size`` rows at a time, in id order; ``errors[i]`` is None if readable."""
        if self.store is not None:
            idx = np.asarray(self.items, np.int64)
            for a in range(0, len(idx), size):
                part = idx[a:a + size]
                yield self.store.gather(part), [None] * len(part)
            return
        from .tiff import iter_batches

        for b in iter_batches(self.items, size, self.workers):
            yield b.images, b.errors
