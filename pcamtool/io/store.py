"""The pcamtool store: one chunked HDF5 file of patches, labels and ids.

Format ``pcamtool-store`` version 1 (public, see README), or version 2 when
the store also says where each patch came from (packed from PCam's files):

* ``images``  uint8 (N, 96, 96, 3), chunked along the first axis,
  uncompressed by default so readers can memory-map the chunks;
* ``labels``  int8 (N,), -1 where unlabelled;
* ``ids``     fixed-length UTF-8 strings (N,), unique, rows sorted by id
  (stores of pcamtool <= 0.1.0 hold ASCII, a subset: the same format);
* root attributes: ``format``, ``format_version``, ``mean`` and ``std``
  (float64 (3,), of pixels/255, exact over the whole set), ``count``,
  ``n_positive``, ``n_unlabelled``, ``pcamtool_version``, ``created``,
  ``source``, ``labels_source``, ``options`` (JSON), ``skipped`` (JSON list of
  ``[file, problem]``), ``stain`` (JSON of the stain normalization applied);
* version 2 adds the group ``meta`` (:class:`PatchMeta`): ``slide`` (UTF-8
  strings (N,), the whole-slide image of each row), ``coord_y`` and
  ``coord_x`` (int64 (N,), where the patch was cut) and ``tumor_patch``
  (int8 (N,), tumour anywhere in the patch, where ``labels`` looks at the
  centre only). A store without it is written as version 1, byte for byte
  what earlier pcamtool versions read; both versions open here.

Training reads batches through :meth:`Store.gather`, which copies rows out of
a memory map of the file at the chunks' byte offsets: h5py's own fancy
indexing reads whole chunks per batch and is ~400x slower.

:func:`open_store` checks what is cheap on every open (attributes, ids
unique, labels in {0, 1, -1}, counts, every chunk inside the file), so a
damaged or foreign store fails there in one line, never later in a kernel;
``pcamtool info --check`` reads every pixel as well (:mod:`pcamtool.info`).

Example::

    from pcamtool.io.store import open_store
    store = open_store("data/train.h5")
    batch = store.gather([5, 1, 9])   # (3, 96, 96, 3) uint8
"""
from __future__ import annotations

import errno
import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import h5py
import numpy as np

from ..errors import StoreError
from .fsutil import QuietFailingFile, utf8_ok
from .store_checks import as_int, check_contents
from ..kernels.stats import copy_rows

FORMAT = "pcamtool-store"
FORMAT_VERSION = 2           # the newest this pcamtool writes (only for stores with PatchMeta)
PLAIN_VERSION = 1            # what a store without PatchMeta is written as
READ_VERSIONS = (1, 2)
SHAPE = (96, 96, 3)
ROW_BYTES = int(np.prod(SHAPE))
COMPRESSIONS = ("none", "lzf", "gzip")


def channel_stats(sums: np.ndarray, sqsums: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of pixels/255 per channel from exact integer sums over ``count`` images."""
    n = float(count) * SHAPE[0] * SHAPE[1]
    if n == 0:
        return np.zeros(3), np.zeros(3)
    # Python ints keep the sums exact before the one division.
    mean = np.array([int(s) / n for s in sums]) / 255.0
    var = np.array([int(q) / n for q in sqsums]) / 255.0**2 - mean**2
    return mean, np.sqrt(np.maximum(var, 0.0))


@dataclass(frozen=True)
class PatchMeta:
    """Where each row of a store came from: its slide, the patch's coordinates, tumour anywhere in it.

    The slide is what keeps validation honest: neighbouring patches of one
    slide look alike, so a split that puts one slide on both sides
    overestimates (:func:`pcamtool.train.split.resolve_groups`).
    """

    slide: np.ndarray         # str (N,)
    coord_y: np.ndarray       # int64 (N,)
    coord_x: np.ndarray       # int64 (N,)
    tumor_patch: np.ndarray   # bool (N,)

    def __len__(self) -> int:
        return len(self.slide)

    def to_h5(self, f: h5py.File) -> None:
        """Write the ``meta`` group of a store."""
        g = f.create_group("meta")
        raw = [s.encode("utf-8") for s in self.slide]
        width = max([len(b) for b in raw] + [1])
        g.create_dataset("slide", data=np.array(raw, dtype=h5py.string_dtype("utf-8", width)))
        g.create_dataset("coord_y", data=np.asarray(self.coord_y, np.int64))
        g.create_dataset("coord_x", data=np.asarray(self.coord_x, np.int64))
        g.create_dataset("tumor_patch", data=np.asarray(self.tumor_patch, np.int8))

    @classmethod
    def from_h5(cls, path: Path, f: h5py.File, n: int) -> Optional["PatchMeta"]:
        """The ``meta`` group of an open store (None when it has none); checks lengths and values."""
        g = f.get("meta")
        if g is None:
            return None
        try:
            slide = _read_ids(path, g["slide"])
            arrays = [np.asarray(g[k][...]).reshape(-1) for k in ("coord_y", "coord_x", "tumor_patch")]
        except KeyError as exc:
            raise StoreError(f"{path}: incomplete meta group (missing {exc})") from None
        except UnicodeDecodeError:
            raise StoreError(f"{path}: meta/slide is not valid UTF-8 text") from None
        except (OSError, AttributeError, TypeError) as exc:
            raise StoreError(f"{path}: damaged meta group ({exc})") from None
        for name, arr in zip(("slide", "coord_y", "coord_x", "tumor_patch"), [slide, *arrays]):
            if len(arr) != n:
                raise StoreError(f"{path}: meta/{name} has {len(arr)} rows, the images {n}")
        for name, arr in zip(("coord_y", "coord_x", "tumor_patch"), arrays):
            if arr.dtype.kind not in "iub":
                raise StoreError(f"{path}: meta/{name} is {arr.dtype}, expected integers")
        if not np.isin(arrays[2], (0, 1)).all():
            raise StoreError(f"{path}: meta/tumor_patch holds values other than 0 and 1")
        return cls(slide, arrays[0].astype(np.int64), arrays[1].astype(np.int64), arrays[2].astype(bool))

    def take(self, rows: np.ndarray) -> "PatchMeta":
        """The rows ``rows``, in that order."""
        return PatchMeta(self.slide[rows], self.coord_y[rows], self.coord_x[rows], self.tumor_patch[rows])


class StoreWriter:
    """Write a store row-chunk by row-chunk (rows must arrive in order).

    Use as a context manager over a temporary path; the caller renames it.
    A write that fails (a full disk) raises ``OSError`` naming that path.
    """

    def __init__(self, path: str | os.PathLike, n: int, chunk: int = 512,
                 compression: str = "none") -> None:
        if compression not in COMPRESSIONS:
            raise StoreError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSIONS)})")
        self.path = Path(path)
        self.n = n
        self.chunk = max(1, min(int(chunk), max(n, 1)))
        self.compression = compression
        self._raw = QuietFailingFile(self.path)
        # A chunk cache that holds a whole chunk (14 MiB at 512 rows; h5py's
        # default is 1 MiB): batches of 64 rows then fill a compressed chunk in
        # memory, compressed once when full, not re-read, decompressed and
        # recompressed for every batch (8x the work, and dead space in the file).
        self._file = h5py.File(self._raw, "w", libver=("earliest", "v110"), track_order=False,
                               rdcc_nbytes=self.chunk * ROW_BYTES + 2**20, rdcc_w0=1.0)
        self._fd: Optional[int] = None
        try:
            if compression == "none":
                self.images = self._create_preallocated(n)
            else:
                kw: dict[str, Any] = {"compression": "lzf"} if compression == "lzf" else \
                    {"compression": "gzip", "compression_opts": 4, "shuffle": True}
                self.images = self._file.create_dataset(
                    "images", shape=(n, *SHAPE), dtype=np.uint8, chunks=(self.chunk, *SHAPE),
                    maxshape=(None, *SHAPE), **kw)  # resizable: skipped files shrink it
        except BaseException:
            # No __exit__ runs for a constructor that raised: an HDF5 file left
            # open is closed at interpreter exit, after its Python file object,
            # and that segfaulted (a full disk refusing the preallocation).
            self.close(check=False)
            raise
        self._written = 0

    def _create_preallocated(self, n: int) -> h5py.Dataset:
        """An uncompressed dataset whose chunks all exist on disk from the start.

        Rows are then written with ``os.pwrite`` at the chunks' byte offsets:
        the copy into the page cache runs without the GIL, beside the decoding
        threads, where h5py's own writes would hold it.
        """
        space = h5py.h5s.create_simple((max(n, 1), *SHAPE), (h5py.h5s.UNLIMITED, *SHAPE))
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((self.chunk, *SHAPE))
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # every row is written by us
        ds = h5py.Dataset(h5py.h5d.create(self._file.id, b"images", h5py.h5t.NATIVE_UINT8, space, dcpl=dcpl))
        self._file.flush()
        offsets = _chunk_offsets(ds)
        assert offsets is not None  # early allocation places every chunk
        self._offsets = offsets
        self._fd = os.open(self.path, os.O_RDWR)  # read too: keep_rows moves rows
        if len(offsets):
            # Reserve the chunks' blocks in one call: page-cache writes into
            # allocated (unwritten) extents skip the per-page delayed-allocation
            # bookkeeping, ~30% of the write's cost on ext4. Only a speed-up:
            # a filesystem that refuses is written the usual way; but a full
            # disk is worth saying now rather than after the whole decode.
            start = int(offsets.min())
            try:
                os.posix_fallocate(self._fd, start, int(offsets.max()) + self.chunk * ROW_BYTES - start)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
        return ds

    def write(self, images: np.ndarray) -> None:
        """Append ``images`` (the next rows, in order)."""
        self.write_at(self._written, images)
        self._written += len(images)
        self._raise_kept_error()

    def _raise_kept_error(self) -> None:
        exc = self._raw.error
        if exc is not None:
            raise OSError(exc.errno, exc.strerror, str(self.path))

    def write_at(self, row: int, images: np.ndarray) -> None:
        """Write ``images`` as rows ``row, row + 1, ...``; several threads may call it at once.

        Rows written this way are not counted: the caller ends with :meth:`keep_rows`.
        """
        stop = row + len(images)
        if stop > self.n:
            raise StoreError(f"{self.path}: rows up to {stop} written into a store of {self.n}")
        if self._fd is not None:
            self._rows_io(row, np.ascontiguousarray(images).reshape(len(images), ROW_BYTES), write=True)
        else:
            self.images[row:stop] = images

    def keep_rows(self, keep: np.ndarray) -> None:
        """After :meth:`write_at` filled every row: keep the rows where ``keep``, in order.

        The rows of skipped files are closed up by moving the later rows
        forward (a pass over the rest of the file, only when something was
        skipped); the kept rows then count as written.
        """
        keep = np.asarray(keep, bool)
        if len(keep) != self.n:
            raise StoreError(f"{self.path}: {len(keep)} keep flags for a store of {self.n}")
        count = int(keep.sum())
        first_gap = int(np.argmin(keep)) if count < self.n else self.n
        if count < self.n and self._fd is None:
            raise StoreError(f"{self.path}: only uncompressed stores close gaps in place")
        dst = first_gap
        for a in range(first_gap, self.n, self.chunk):
            b = min(a + self.chunk, self.n)
            rows = np.flatnonzero(keep[a:b])
            if not len(rows):
                continue
            block = np.empty((b - a, ROW_BYTES), np.uint8)
            self._rows_io(a, block, write=False)
            # dst + len(rows) <= b: the rows written never reach a block not yet read
            self._rows_io(dst, block[rows], write=True)
            dst += len(rows)
        self._written = count

    def _rows_io(self, row: int, data: np.ndarray, write: bool) -> None:
        """Write (or read into) ``data`` ((k, ROW_BYTES) uint8) at rows ``row...``, one call per chunk touched."""
        stop, done = row + len(data), 0
        while row < stop:
            c, r = divmod(row, self.chunk)
            take = min(self.chunk - r, stop - row)
            where = int(self._offsets[c]) + r * ROW_BYTES
            part = data[done:done + take]
            if write:
                os.pwrite(self._fd, part, where)
            elif os.preadv(self._fd, [part], where) != part.nbytes:
                raise StoreError(f"{self.path}: short read at row {row}")
            row += take
            done += take

    def finish(self, ids: Sequence[str], labels: np.ndarray, attrs: dict[str, Any],
               meta: Optional[PatchMeta] = None) -> None:
        """Write ids (as UTF-8), labels, root attributes and ``meta``; rows written must equal ``n``.

        Sets ``format_version``: 2 with ``meta``, else 1 (what older readers know).
        """
        if self._written != self.n:
            raise StoreError(f"{self.path}: {self._written} of {self.n} rows written")
        try:
            raw = [i.encode("utf-8") for i in ids]
        except UnicodeEncodeError:
            bad = next(i for i in ids if not utf8_ok(i))
            raise StoreError(f"id {bad!r} is not valid UTF-8 (rename the file)") from None
        width = max([len(b) for b in raw] + [1])
        self._file.create_dataset("ids", data=np.array(raw, dtype=h5py.string_dtype("utf-8", width)))
        self._file.create_dataset("labels", data=np.asarray(labels, np.int8))
        if meta is not None:
            if len(meta) != self.n:
                raise StoreError(f"{self.path}: meta of {len(meta)} rows for a store of {self.n}")
            meta.to_h5(self._file)
        attrs = {**attrs, "format": FORMAT, "format_version": FORMAT_VERSION if meta is not None else PLAIN_VERSION}
        for k, v in attrs.items():
            self._file.attrs[k] = v

    def close(self, check: bool = True) -> None:
        """Close the file; with ``check``, raise the first write that failed (the store is then garbage)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            self._file.close()
        finally:
            self._raw.close()
        if check:
            self._raise_kept_error()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(check=exc_type is None)  # an error on the way out says more than a kept one


@dataclass
class Store:
    """An open store: ids, labels and attributes in memory, images gathered on demand."""

    path: Path
    ids: np.ndarray                 # str (N,)
    labels: np.ndarray              # int8 (N,)
    attrs: dict[str, Any]
    chunk_rows: int
    compression: Optional[str]
    _offsets: Optional[np.ndarray] = None   # byte offset of each chunk, for the map
    _map: Optional[np.ndarray] = None       # the file as uint8 (mmap)
    _mmap: Optional[mmap.mmap] = field(default=None, repr=False)
    _end: int = 0                           # bytes the map needs: the end of the last chunk
    _ram: Optional[np.ndarray] = field(default=None, repr=False)
    meta: Optional[PatchMeta] = field(default=None, repr=False)   # format version 2 only

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def groups(self) -> Optional[np.ndarray]:
        """The slide id of every row (str (N,)), or None for a store that does not know them."""
        return self.meta.slide if self.meta is not None else None

    @property
    def mean(self) -> np.ndarray:
        return np.asarray(self.attrs["mean"], np.float64)

    @property
    def std(self) -> np.ndarray:
        return np.asarray(self.attrs["std"], np.float64)

    @property
    def has_labels(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    @property
    def mappable(self) -> bool:
        """True when rows can be gathered from a memory map (uncompressed, all chunks on disk)."""
        return self._map is not None

    def stain(self) -> dict[str, Any]:
        """The stain normalization the images went through (``{"method": "none"}`` if none)."""
        raw = self.attrs.get("stain")
        return json.loads(raw) if raw else {"method": "none"}

    def gather(self, indices: Sequence[int] | np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Rows ``indices`` as a (B, 96, 96, 3) uint8 array (any order, repeats allowed)."""
        idx = np.asarray(indices, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for a store of {len(self)} rows")
        if out is None:
            out = np.empty((len(idx), *SHAPE), np.uint8)
        elif out.shape != (len(idx), *SHAPE) or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError("out must be a C-contiguous uint8 array of shape (len(indices), 96, 96, 3)")
        if self._ram is not None:
            np.take(self._ram, idx, axis=0, out=out)
        elif self._map is not None:
            self._check_size()
            copy_rows(self._map, self._offsets, self.chunk_rows, ROW_BYTES, idx,
                      out.reshape(len(idx), ROW_BYTES))
        else:
            self.load()
            np.take(self._ram, idx, axis=0, out=out)
        return out

    def load(self) -> np.ndarray:
        """All images in RAM (decompressed once for compressed stores)."""
        if self._ram is None:
            if self._map is not None:
                self._ram = self.gather(np.arange(len(self)))
            else:
                with h5py.File(self.path, "r") as f:
                    try:
                        self._ram = f["images"][...]
                    except OSError as exc:  # h5py's message names no file: say which store
                        raise StoreError(f"{self.path}: damaged store, its images cannot be read "
                                         f"({exc}); repack it") from None
        return self._ram

    def _check_size(self) -> None:
        """Fail in one line if the file shrank under the map (a read past its end is a bus error).

        ``mmap.size()`` is one ``fstat``, ~1 us beside the ~1 ms a batch
        takes to copy. A truncation between this check and the copy still
        kills the process: a SIGBUS raised inside the kernel cannot be turned
        into an exception (Python runs signal handlers only between bytecodes,
        and returning from a SIGBUS handler re-runs the faulting load).
        """
        assert self._mmap is not None
        try:
            size = self._mmap.size()
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read the store any more ({exc.strerror})") from None
        if size < self._end:
            raise StoreError(f"{self.path}: the file was truncated while in use "
                             f"({size:,} bytes, its chunks need {self._end:,})")

    def chunks(self, size: int = 4096):
        """Iterate ``(start, images)`` over the store in order, ``size`` rows at a time.

        Compressed stores are read a block at a time through h5py (not
        decompressed whole into RAM, as :meth:`load` does).
        """
        if self._ram is not None:
            for a in range(0, len(self), size):
                yield a, self._ram[a:a + size]
            return
        if self._map is not None:
            # Read with pread, not through the map: a file truncated while it
            # is read then gives a short read (an error naming the store), where
            # a load from the map past the new end kills the process (SIGBUS).
            with open(self.path, "rb", buffering=0) as fh:
                for a in range(0, len(self), size):
                    yield a, self._pread_rows(fh.fileno(), a, min(a + size, len(self)))
            return
        if self.compression is not None:
            size = max(self.chunk_rows, size - size % self.chunk_rows)  # whole chunks: each decompressed once
        with h5py.File(self.path, "r") as f:
            ds = f["images"]
            for a in range(0, len(self), size):
                b = min(a + size, len(self))
                try:
                    block = ds[a:b]
                except OSError as exc:
                    raise StoreError(f"{self.path}: damaged chunk in rows {a}..{b - 1} ({exc})") from None
                yield a, block

    def _pread_rows(self, fd: int, a: int, b: int) -> np.ndarray:
        """Rows ``a..b-1`` of a mappable store read with ``pread`` (one call per chunk touched)."""
        assert self._offsets is not None
        out = np.empty((b - a, ROW_BYTES), np.uint8)
        row = a
        while row < b:
            c, r = divmod(row, self.chunk_rows)
            take = min(self.chunk_rows - r, b - row)
            part = out[row - a:row - a + take]
            if os.preadv(fd, [part], int(self._offsets[c]) + r * ROW_BYTES) != part.nbytes:
                raise StoreError(f"{self.path}: the file was truncated while in use "
                                 f"({os.fstat(fd).st_size:,} bytes, row {row} lies beyond)")
            row += take
        return out.reshape(b - a, *SHAPE)


@dataclass
class _ChunkTable:
    """Where the chunks of ``images`` lie: one entry per chunk written."""

    first_row_chunk: np.ndarray   # chunk index along the rows
    offset: np.ndarray            # byte offset in the file
    size: np.ndarray              # bytes stored (compressed size for compressed chunks)
    filter_mask: np.ndarray


def _chunk_table(ds: h5py.Dataset) -> _ChunkTable:
    rows = ds.chunks[0]
    n = ds.id.get_num_chunks()
    table = _ChunkTable(*(np.empty(n, np.int64) for _ in range(4)))
    for i in range(n):
        info = ds.id.get_chunk_info(i)
        table.first_row_chunk[i] = info.chunk_offset[0] // rows
        table.offset[i] = info.byte_offset
        table.size[i] = info.size
        table.filter_mask[i] = info.filter_mask
    return table


def _chunk_offsets(ds: h5py.Dataset, table: Optional[_ChunkTable] = None) -> Optional[np.ndarray]:
    """Byte offset of every chunk in row order, or None when the chunks cannot be mapped."""
    if ds.compression is not None or ds.chunks is None or ds.scaleoffset is not None:
        return None
    if ds.shuffle or ds.fletcher32:
        return None
    rows = ds.chunks[0]
    n_chunks = -(-ds.shape[0] // rows) if ds.shape[0] else 0
    table = table if table is not None else _chunk_table(ds)
    if len(table.offset) != n_chunks:
        return None  # unwritten chunks read as zeros through h5py only
    if (table.size != rows * ROW_BYTES).any() or table.filter_mask.any():
        return None
    offsets = np.empty(n_chunks, np.int64)
    offsets[table.first_row_chunk] = table.offset
    return offsets


def _read_ids(path: Path, ds: h5py.Dataset) -> np.ndarray:
    raw = ds[...]
    if raw.dtype.kind != "S":  # variable-length strings: not what pack writes, still readable
        return ds.asstr(errors="strict")[...].astype(str)
    try:
        return raw.astype(str)  # ASCII (every Kaggle id): 3x faster than decoding UTF-8
    except UnicodeDecodeError:
        return np.char.decode(raw, "utf-8")


def open_store(path: str | os.PathLike, need_labels: bool = False) -> Store:
    """Open a store for reading, checking its format and (cheaply) its contents.

    Raises
    ------
    StoreError
        Missing file, not HDF5 or truncated, another format or version, a
        malformed attribute (``mean``, ``std``, ``stain``, counts), duplicate
        ids, labels other than 0/1/-1, chunks past the end of the file, or
        (with ``need_labels``) images without labels.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: store not found")
    if path.is_dir():
        raise StoreError(f"{path}: is a folder, expected a .h5 store (run 'pcamtool pack' on it first)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise StoreError(f"{path}: not a readable HDF5 store (truncated or another format: {exc})") from None
    with f:
        try:
            attrs = {k: (v.decode(errors="replace") if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        except (KeyError, OSError, RuntimeError, ValueError, TypeError) as exc:  # e.g. a zeroed tail
            raise StoreError(f"{path}: damaged store (its attributes cannot be read: "
                             f"{exc.args[0] if exc.args else exc})") from None
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{path}: not a pcamtool store (format attribute is {attrs.get('format')!r})")
        version = as_int(attrs.get("format_version", -1))
        if version not in READ_VERSIONS:
            raise StoreError(f"{path}: store format version {attrs.get('format_version')}, "
                             f"this pcamtool reads versions {', '.join(map(str, READ_VERSIONS))} "
                             f"(a newer pcamtool wrote it)")
        try:
            ds = f["images"]
            if not isinstance(ds, h5py.Dataset) or ds.shape[1:] != SHAPE or ds.dtype != np.uint8:
                what = f"{ds.shape} {ds.dtype}" if isinstance(ds, h5py.Dataset) else "a group"
                raise StoreError(f"{path}: images are {what}, expected (N, 96, 96, 3) uint8")
            n = ds.shape[0]
            ids = _read_ids(path, f["ids"])
            raw_labels = np.asarray(f["labels"][...]).reshape(-1)
            table = _chunk_table(ds) if ds.chunks else None
            offsets = _chunk_offsets(ds, table) if table is not None else None
            chunk_rows = ds.chunks[0] if ds.chunks else max(n, 1)
            compression = ds.compression
            meta = PatchMeta.from_h5(path, f, n) if version >= 2 else None
        except KeyError as exc:
            raise StoreError(f"{path}: incomplete store (missing {exc})") from None
        except UnicodeDecodeError:
            raise StoreError(f"{path}: ids are not valid UTF-8 text") from None
        except (OSError, AttributeError, TypeError, ValueError, RuntimeError) as exc:
            raise StoreError(f"{path}: damaged store ({exc})") from None
    size = os.path.getsize(path)
    check_contents(path, attrs, ids, raw_labels, n,
                   table.offset + table.size if table is not None else None, size)
    store = Store(path, ids, raw_labels.astype(np.int8), attrs, chunk_rows, compression, meta=meta)
    if offsets is not None and len(ids):
        with open(path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        store._mmap = mm
        store._map = np.frombuffer(mm, np.uint8)
        store._offsets = offsets
        store._end = int(offsets.max()) + chunk_rows * ROW_BYTES
    if need_labels and not store.has_labels:
        missing = int((store.labels < 0).sum())
        if missing == len(store):
            raise StoreError(f"{path}: store has no labels (none of its {len(store):,} rows; "
                             f"pack it with a labels CSV)")
        raise StoreError(f"{path}: {missing:,} of its {len(store):,} rows have no label (label -1); "
                         f"training needs every row labelled (pack only labelled images)")
    return store
