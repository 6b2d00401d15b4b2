"""The PatchCamelyon benchmark files as published: ``..._split_<split>_{x,y}.h5[.gz]`` and ``_meta.csv``.

Each split is three files side by side: ``x`` (uint8 (N, 96, 96, 3)),
``y`` (uint8 (N, 1, 1, 1), 1 where the centre 32x32 holds tumour) and a meta
CSV (``,coord_y,coord_x,tumor_patch,center_tumor_patch,wsi``: the row
number, where the patch was cut, tumour anywhere in it, tumour in its
centre, and the slide). :class:`PcamSource` finds and checks all three,
then hands out the pixels in chunk order, block by block: a ``.gz`` is
decompressed as a stream (:mod:`pcamtool.io.gzstream`), once, with no copy
on disk. :func:`pcamtool.io.pack.pack_pcam` writes them into a store.

Example::

    from pcamtool.io.pcam import PcamSource, find_split
    with PcamSource(find_split("pcam/", "valid")) as src:
        for start, images in src.blocks():
            ...
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import h5py
import numpy as np

from ..errors import LabelsError, PcamError, few
from .gzstream import GzipSeekable, GzipStreamError, inflater_module
from .store import SHAPE, PatchMeta

log = logging.getLogger("pcamtool")

SPLITS = ("train", "valid", "test")
META_COLUMNS = ("coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi")
# Names a meta CSV's unnamed row-number column takes (pandas writes "", reads it back as "Unnamed: 0").
INDEX_NAMES = ("", "unnamed: 0", "index")
# Rows per block handed out: ~28 MiB, whole source chunks, so each chunk is read (and inflated) once.
BLOCK_ROWS = 1024
_X_NAME = re.compile(r"^(?P<stem>.*?)(?P<split>train|valid|test)_x\.h5(?P<gz>\.gz)?$")


def looks_like_pcam(src: str | os.PathLike) -> bool:
    """True for an ``.h5``/``.h5.gz`` file, or a folder holding PCam x files and no tifs (``pack`` then packs PCam)."""
    src = Path(src)
    if src.is_file() or not src.exists():
        return src.name.endswith((".h5", ".h5.gz"))
    try:
        names = [p.name for p in src.iterdir()]
    except OSError:
        return False
    return any(_X_NAME.match(n) for n in names) and not any(n.lower().endswith((".tif", ".tiff")) for n in names)


@dataclass(frozen=True)
class PcamFiles:
    """The three files of one split."""

    x: Path
    y: Path
    meta: Optional[Path]   # None: no meta CSV beside x (the store then has no slide ids)
    split: str

    def __str__(self) -> str:
        return str(self.x)


def _beside(x: Path, kind: str) -> Optional[Path]:
    """The ``y`` file (``.h5`` before ``.h5.gz``) or the meta CSV of the split whose x is ``x``."""
    m = _X_NAME.match(x.name)
    assert m is not None
    base = x.with_name(m["stem"] + m["split"])
    names = [f"_{kind}.h5", f"_{kind}.h5.gz"] if kind == "y" else [f"_{kind}.csv"]
    for suffix in names:
        p = base.with_name(base.name + suffix)
        if p.is_file():
            return p
    return None


def find_split(src: str | os.PathLike, split: Optional[str] = None) -> PcamFiles:
    """The files of one split: ``src`` is its ``_x.h5``/``_x.h5.gz``, or the folder holding them (with ``split``).

    Raises
    ------
    PcamError
        ``src`` missing, a folder without ``split`` or without that split's
        x file, an x file whose name says another split, or no ``y`` beside it.
    """
    src = Path(src)
    if split is not None and split not in SPLITS:
        raise PcamError(f"--split {split}: choose from {', '.join(SPLITS)}")
    if src.is_dir():
        if split is None:
            raise PcamError(f"{src}: a folder of PCam files: choose one with --split {'|'.join(SPLITS)}")
        found = sorted(p for p in src.iterdir() if (m := _X_NAME.match(p.name)) and m["split"] == split)
        if not found:
            raise PcamError(f"{src}: no {split} images (expected camelyonpatch_level_2_split_{split}_x.h5 or .h5.gz)")
        plain = [p for p in found if p.suffix == ".h5"]
        stems = {_X_NAME.match(p.name)["stem"] for p in found}  # type: ignore[index]
        if len(stems) > 1:
            raise PcamError(f"{src}: several {split} image files ({few([p.name for p in found])}); give one")
        x = plain[0] if plain else found[0]  # an uncompressed copy beside the .gz reads faster
    elif src.is_file():
        m = _X_NAME.match(src.name)
        if m is None:
            raise PcamError(f"{src}: not a PCam image file (expected a name ending in "
                            f"{{train,valid,test}}_x.h5 or _x.h5.gz)")
        if split is not None and split != m["split"]:
            raise PcamError(f"{src}: holds the {m['split']} split, not --split {split}")
        x, split = src, m["split"]
    else:
        raise PcamError(f"{src}: not found")
    y = _beside(x, "y")
    if y is None:
        want = x.name.replace("_x.h5", "_y.h5")
        raise PcamError(f"{x}: no labels beside it (expected {want.removesuffix('.gz')} or .h5.gz)")
    return PcamFiles(x, y, _beside(x, "meta"), split)


@contextlib.contextmanager
def open_h5(path: Path) -> Iterator[tuple[h5py.File, Optional[GzipSeekable]]]:
    """Open a PCam ``.h5``, or the HDF5 file inside a ``.h5.gz`` as a stream; errors name the file.

    Yields the file and, for a ``.gz``, the stream under it (whose
    :meth:`~pcamtool.io.gzstream.GzipSeekable.verify` checks the CRC).
    """
    raw: Optional[GzipSeekable] = None
    try:
        if path.name.endswith(".gz"):
            raw = GzipSeekable(path)
            raw.size  # noqa: B018 -- checks the gzip and the HDF5 superblock before h5py sees them
            f = h5py.File(raw, "r")
        else:
            f = h5py.File(path, "r")
    except GzipStreamError as exc:
        if raw is not None:
            raw.close()
        raise PcamError(str(exc)) from None
    except OSError as exc:
        if raw is not None:
            raw.close()
        raise PcamError(f"{path}: not a readable HDF5 file ({str(exc).split(' (')[0]})") from None
    try:
        yield f, raw
    finally:
        f.close()
        if raw is not None:
            raw.close()


def _dataset(path: Path, f: h5py.File, name: str) -> h5py.Dataset:
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset):
        have = ", ".join(sorted(f.keys())) or "nothing"
        raise PcamError(f"{path}: no dataset {name!r} (it holds {have}); not a PCam {name} file")
    return ds


def read_labels(path: Path, n: int) -> np.ndarray:
    """The ``y`` of a split as int8 (N,) 0/1; ``n`` is the length of its x."""
    with open_h5(path) as (f, raw):
        ds = _dataset(path, f, "y")
        if ds.ndim < 1 or int(np.prod(ds.shape[1:])) != 1:
            raise LabelsError(f"{path}: y is {ds.shape}, expected (N, 1, 1, 1)")
        if ds.shape[0] != n:
            raise LabelsError(f"{path}: {ds.shape[0]:,} labels for {n:,} images")
        if ds.dtype.kind not in "uib":
            raise LabelsError(f"{path}: y is {ds.dtype}, expected uint8 0/1")
        try:
            y = ds[...].reshape(-1)
            if raw is not None:
                raw.verify()
        except (OSError, GzipStreamError) as exc:
            raise LabelsError(f"{path}: cannot read y ({exc})") from None
    bad = np.flatnonzero((y != 0) & (y != 1))
    if len(bad):
        raise LabelsError(f"{path}: {len(bad)} label(s) not 0 or 1 (row {bad[0]}: {y[bad[0]]})")
    return y.astype(np.int8)


def _flag(text: str) -> Optional[bool]:
    t = text.strip().lower()
    return True if t in ("true", "1", "1.0") else False if t in ("false", "0", "0.0") else None


def _int(text: str) -> Optional[int]:
    try:
        v = float(text)
    except ValueError:
        return None
    return int(v) if v.is_integer() else None


def _meta_columns(body: list[list[str]], col: dict[str, int], has_index: bool, width: int,
                  n: int) -> Optional[tuple[PatchMeta, np.ndarray]]:
    """The meta rows parsed column by column in numpy (~10x the row loop), or None if any is not plain."""
    if len(body) != n or any(len(r) != width for r in body):
        return None
    cols = [np.array(c) for c in zip(*body)]
    try:
        ys, xs = (cols[col[k]].astype(np.int64) for k in ("coord_y", "coord_x"))
        if has_index and not np.array_equal(cols[0].astype(np.int64), np.arange(n)):
            return None
    except ValueError:   # "1088.0", "", text: the row loop says which line
        return None
    flags = []
    for k in ("tumor_patch", "center_tumor_patch"):
        c = cols[col[k]]
        yes = c == "True"
        if not (yes | (c == "False")).all():
            return None
        flags.append(yes)
    slide = cols[col["wsi"]]
    if not (np.char.str_len(slide) > 0).all() or not (np.char.strip(slide) == slide).all():
        return None
    return PatchMeta(slide, ys, xs, flags[0]), flags[1]


def read_meta(path: Path, n: int) -> tuple[PatchMeta, np.ndarray]:
    """The meta CSV of a split: its :class:`PatchMeta` and the ``center_tumor_patch`` flags (bool (N,)).

    The first column may be the unnamed row number pandas writes; the
    named ones must be exactly :data:`META_COLUMNS`, in any order.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(f"{path}: cannot read the meta CSV ({exc})") from None
    rows = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(rows, [])]
    has_index = bool(header) and header[0].lower() in INDEX_NAMES
    named = header[1:] if has_index else header
    if sorted(named) != sorted(META_COLUMNS):
        raise LabelsError(f"{path}: columns are {','.join(header)!r}, expected "
                          f"{'[row number,]' if not has_index else ','}{','.join(META_COLUMNS)}")
    col = {name: i + has_index for i, name in enumerate(named)}
    body = [r for r in rows if r]
    fast = _meta_columns(body, col, has_index, len(header), n)
    if fast is not None:
        return fast
    # Something is off: the row-by-row reading below finds the line to name.
    rows = csv.reader(io.StringIO(text, newline=""))
    next(rows)
    slides: list[str] = []
    ys, xs, tumor, centre = (np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, bool), np.empty(n, bool))
    count = 0
    for row in rows:
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{path}: line {rows.line_num}"
        if len(row) != len(header):
            raise LabelsError(f"{where}: {len(row)} fields, the header has {len(header)}")
        if count >= n:
            count += 1
            continue  # counted, for the message below
        if has_index and _int(row[0]) != count:
            raise LabelsError(f"{where}: row number {row[0]!r}, expected {count} (rows out of order?)")
        cy, cx = _int(row[col["coord_y"]]), _int(row[col["coord_x"]])
        tp, ctp = _flag(row[col["tumor_patch"]]), _flag(row[col["center_tumor_patch"]])
        wsi = row[col["wsi"]].strip()
        if cy is None or cx is None:
            raise LabelsError(f"{where}: coordinates {row[col['coord_y']]!r}, {row[col['coord_x']]!r} are not integers")
        if tp is None or ctp is None:
            raise LabelsError(f"{where}: tumor_patch/center_tumor_patch must be True or False")
        if not wsi:
            raise LabelsError(f"{where}: no slide name (wsi)")
        ys[count], xs[count], tumor[count], centre[count] = cy, cx, tp, ctp
        slides.append(wsi)
        count += 1
    if count != n:
        raise LabelsError(f"{path}: {count:,} meta rows for {n:,} images")
    return PatchMeta(np.array(slides, dtype=str), ys, xs, tumor), centre


class PcamSource:
    """One split, opened and checked: ``n``, ``labels``, ``meta``, ``ids``, and the pixels block by block.

    Use as a context manager (the x file stays open between blocks).

    Raises
    ------
    PcamError
        x not (N, 96, 96, 3) uint8, not HDF5, or a damaged ``.gz``; y or the
        meta CSV of another length or form (:class:`LabelsError`).
    """

    def __init__(self, files: PcamFiles, workers: int = 1) -> None:
        self.files = files
        self.workers = max(1, int(workers))
        self._stack = contextlib.ExitStack()
        path = files.x
        f, self._raw = self._stack.enter_context(open_h5(path))
        try:
            ds = _dataset(path, f, "x")
            if ds.ndim != 4 or ds.shape[1:] != SHAPE or ds.dtype != np.uint8:
                raise PcamError(f"{path}: x is {ds.shape} {ds.dtype}, expected (N, 96, 96, 3) uint8")
            self.n = int(ds.shape[0])
            if self.n == 0:
                raise PcamError(f"{path}: x holds no images")
            self._x = ds
            self.labels = read_labels(files.y, self.n)
            self.meta: Optional[PatchMeta] = None
            if files.meta is not None:
                self.meta, centre = read_meta(files.meta, self.n)
                differ = int(np.count_nonzero(centre != (self.labels == 1)))
                if differ:
                    log.warning("%s: center_tumor_patch differs from %s in %d row(s)", files.meta, files.y.name, differ)
            else:
                log.warning("%s: no meta CSV beside it: the store gets no slide ids (splits of it will be "
                            "random, and random splits of PCam leak slides)", path)
        except BaseException:
            self._stack.close()
            raise
        width = max(6, len(str(self.n - 1)))
        self.ids = np.array([f"pcam-{files.split}-{i:0{width}d}" for i in range(self.n)])
        chunk = ds.chunks[0] if ds.chunks else 1
        self.block_rows = max(chunk, BLOCK_ROWS - BLOCK_ROWS % chunk)
        # Chunks of whole patches under gzip alone: read them raw and inflate them on
        # ``workers`` threads (zlib lets go of the GIL), where h5py inflates one at a
        # time under its lock.
        self._chunk_rows = chunk if (ds.chunks is not None and ds.chunks[1:] == SHAPE
                                     and ds.compression == "gzip" and not ds.shuffle and not ds.fletcher32
                                     and ds.scaleoffset is None and ds.id.get_create_plist().get_nfilters() == 1
                                     and self.workers > 1) else 0
        self._pool = (self._stack.enter_context(ThreadPoolExecutor(self.workers, thread_name_prefix="pcam-inflate"))
                      if self._chunk_rows else None)

    def __enter__(self) -> "PcamSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def verify(self) -> None:
        """After every block was read: inflate what is left of a ``.gz`` x, checking its CRC and length."""
        if self._raw is not None:
            try:
                self._raw.verify()
            except GzipStreamError as exc:
                raise PcamError(str(exc)) from None

    def read_into(self, start: int, out: np.ndarray) -> np.ndarray:
        """Rows ``start...`` into ``out`` ((k, 96, 96, 3) uint8); returns the filled part."""
        stop = min(start + len(out), self.n)
        part = out[:stop - start]
        try:
            if self._chunk_rows and start % self._chunk_rows == 0:
                self._read_chunks(start, part)
            else:
                self._x.read_direct(part, np.s_[start:stop])
        except (OSError, GzipStreamError, RuntimeError, zlib.error, inflater_module().error) as exc:
            raise PcamError(self._read_problem(exc, start, stop)) from None
        return part

    def _read_chunks(self, start: int, part: np.ndarray) -> None:
        """Rows ``start...`` (a chunk boundary) from the raw chunks, inflated in parallel."""
        k = self._chunk_rows
        flat = part.reshape(len(part), -1)
        raw = []
        for a in range(start, start + len(part), k):   # in file order, on this thread (HDF5 is serial)
            mask, data = self._x.id.read_direct_chunk((a, 0, 0, 0))
            raw.append((a - start, mask, data))

        def inflate(item: tuple[int, int, bytes]) -> None:
            at, mask, data = item
            rows = min(k, len(part) - at)
            pixels = data if mask & 1 else inflate_chunk(data)   # bit 0 set: gzip was skipped for this chunk
            if len(pixels) != k * flat.shape[1]:
                raise zlib.error(f"chunk at row {start + at} inflates to {len(pixels):,} bytes, "
                                 f"expected {k * flat.shape[1]:,}")
            flat[at:at + rows] = np.frombuffer(pixels, np.uint8, rows * flat.shape[1]).reshape(rows, -1)

        assert self._pool is not None
        inflate_chunk = inflater_module().decompress
        list(self._pool.map(inflate, raw))

    def _read_problem(self, exc: BaseException, start: int, stop: int) -> str:
        text = str(exc)
        if isinstance(exc, GzipStreamError):
            return text
        return f"{self.files.x}: cannot read images {start}..{stop - 1} ({text.split(' (')[0]})"

    def blocks(self, rows: Optional[int] = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, images)`` in row order, ``rows`` (default :attr:`block_rows`) at a time, into one reused array."""
        rows = rows or self.block_rows
        buf = np.empty((min(rows, self.n), *SHAPE), np.uint8)
        for a in range(0, self.n, rows):
            yield a, self.read_into(a, buf)

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (sorted, unique) as (len, 96, 96, 3) uint8, reading forward only (one pass over a ``.gz``)."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), *SHAPE), np.uint8)
        buf = np.empty((self.block_rows, *SHAPE), np.uint8)
        done = 0
        while done < len(rows):
            a = int(rows[done]) - int(rows[done]) % self.block_rows
            block = self.read_into(a, buf)
            take = rows[done:][rows[done:] < a + len(block)]
            out[done:done + len(take)] = block[take - a]
            done += len(take)
        return out
