"""Read 96x96 RGB uint8 patches from TIFF files, fast.

The common uncompressed strip layout is decoded by a numba kernel straight
from the file bytes (one ``preadv`` per file into a reused buffer); every
other TIFF (compressed, tiled, big-endian, PIL-written, ...) goes through
``tifffile``. Both give the same pixels as ``tifffile.imread``.

Example::

    from pcamtool.tiff import read_patch
    img = read_patch("data/train/0000d563d5cfafc4e68acb7c9829258a298d9b6a.tif")
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .errors import BadImageError
from .kernels.decode import OK, PATCH, decode_batch

SHAPE = (PATCH, PATCH, 3)
# Kaggle files are 27,935 bytes; a slot a little larger holds them whole,
# and a file that fills the slot is re-read by tifffile.
SLOT_BYTES = 32768
TIFF_SUFFIXES = (".tif", ".tiff")


def _fallback(path: str) -> np.ndarray:
    """Read with tifffile and insist on the patch shape; errors name the file."""
    import tifffile

    try:
        img = tifffile.imread(path)
    except Exception as exc:  # tifffile raises many types for damaged files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if os.path.getsize(path) == 0:
            msg = "empty file"
        raise BadImageError(path, f"not a readable TIFF ({msg})") from None
    if img.shape != SHAPE or img.dtype != np.uint8:
        shape = "x".join(str(s) for s in img.shape)
        raise BadImageError(path, f"image is {shape} {img.dtype}, expected 96x96x3 uint8")
    return img


def read_patch(path: str | os.PathLike) -> np.ndarray:
    """Read one patch as a (96, 96, 3) uint8 array.

    Raises
    ------
    BadImageError
        If the file is not a readable TIFF or not a 96x96 RGB uint8 image.
    """
    out = np.empty((1, *SHAPE), np.uint8)
    errors = read_into([os.fspath(path)], out)
    if errors[0] is not None:
        raise errors[0]
    return out[0]


def read_into(paths: Sequence[str], out: np.ndarray,
              buf: Optional[np.ndarray] = None) -> list[Optional[BadImageError]]:
    """Read ``paths`` into ``out[:len(paths)]``; returns one error (or None) per file.

    Damaged files do not stop the batch: the caller decides whether an error
    is fatal (``pack``) or skipped (``--skip-bad``).
    """
    n = len(paths)
    if buf is None or buf.shape[0] < n:
        buf = np.empty((n, SLOT_BYTES), np.uint8)
    lengths = np.empty(n, np.int64)
    errors: list[Optional[BadImageError]] = [None] * n
    for i, p in enumerate(paths):
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as exc:
            errors[i] = BadImageError(p, exc.strerror or "cannot open")
            lengths[i] = -1
            continue
        try:
            got = os.preadv(fd, [buf[i]], 0)
            # A file that fills the slot may be longer: tifffile reads it.
            lengths[i] = got if got < SLOT_BYTES else -1
        except OSError as exc:
            errors[i] = BadImageError(p, exc.strerror or "cannot read")
            lengths[i] = -1
        finally:
            os.close(fd)
    status = np.empty(n, np.int8)
    decode_batch(buf[:n], lengths, out[:n], status)
    for i in np.flatnonzero(status != OK):
        if errors[i] is None:
            try:
                out[i] = _fallback(paths[i])
            except BadImageError as exc:
                errors[i] = exc
    return errors


@dataclass
class Batch:
    """One batch of decoded patches, in input order."""

    start: int
    images: np.ndarray                      # (n, 96, 96, 3) uint8
    errors: list[Optional[BadImageError]]   # one per image


def iter_batches(paths: Sequence[str], batch_size: int = 512, workers: int = 2,
                 prefetch: int = 2) -> Iterator[Batch]:
    """Decode ``paths`` in batches on ``workers`` threads, yielding batches in order.

    At most ``workers * prefetch`` batches are in flight, so memory stays
    bounded however many files there are.
    """
    workers = max(1, int(workers))
    starts = range(0, len(paths), batch_size)

    local = threading.local()  # one read buffer per thread: no page faults per batch

    def work(start: int) -> Batch:
        chunk = paths[start:start + batch_size]
        if not hasattr(local, "buf"):
            local.buf = np.empty((batch_size, SLOT_BYTES), np.uint8)
        images = np.empty((len(chunk), *SHAPE), np.uint8)
        return Batch(start, images, read_into(chunk, images, local.buf))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pcam-read") as pool:
        pending: list[Future] = []
        it = iter(starts)
        for start in it:
            pending.append(pool.submit(work, start))
            if len(pending) >= workers * prefetch:
                break
        while pending:
            batch = pending.pop(0).result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(work, nxt))
            yield batch


def list_tifs(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """The tif files of ``folder`` (sorted by name) and the other visible files in it."""
    tifs: list[Path] = []
    others: list[Path] = []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.startswith(".") or not e.is_file():
                continue
            (tifs if e.name.lower().endswith(TIFF_SUFFIXES) else others).append(Path(e.path))
    tifs.sort(key=lambda p: p.name)
    others.sort(key=lambda p: p.name)
    return tifs, others
