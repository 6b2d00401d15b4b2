"""Read 96x96 RGB uint8 patches from TIFF files, fast.

The common uncompressed strip layout is read and decoded by a numba kernel
that opens and reads the files itself (libc calls, without the GIL, so the
worker threads read side by side), straight into the destination rows once
the folder's layout is known; every other TIFF (compressed, tiled, ...) goes
through ``tifffile``. Both give the same pixels as ``tifffile.imread``.
Where kernels cannot call C (``PCAMTOOL_NUMBA=0``, not POSIX) a Python loop
reads the files for the same decoding kernel.

Example::

    from pcamtool.io.tiff import read_patch
    img = read_patch("data/train/0000d563d5cfafc4e68acb7c9829258a298d9b6a.tif")
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ..errors import BadImageError, ImageFolderError
from ..kernels.decode import IO_ERROR, NATIVE_IO, OK, PATCH, decode_batch, read_decode
from ..kernels.stats import channel_sums

SHAPE = (PATCH, PATCH, 3)
# Kaggle files are 27,935 bytes; a slot a little larger holds them whole,
# and a file that fills the slot is re-read by tifffile.
SLOT_BYTES = 32768
GROUP = 16  # files read, then decoded, per kernel call (16 slots: 512 KiB)
TIFF_SUFFIXES = (".tif", ".tiff")


class _TifffileLog(logging.Filter):
    """Holds tifffile's log lines while this thread reads a file, instead of letting them reach stderr.

    tifffile logs what it finds wrong in a damaged file (and then often goes
    on); a filter on its logger, keyed by thread, keeps those lines for the
    one-line error of the file being read without touching other threads'
    logging (``iter_batches`` reads on several).
    """

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        lines = getattr(self.local, "lines", None)
        if lines is None:
            return True
        lines.append(record.getMessage())
        return False

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        self.local.lines = lines = []
        try:
            yield lines
        finally:
            self.local.lines = None


_TIFFFILE_LOG = _TifffileLog()
logging.getLogger("tifffile").addFilter(_TIFFFILE_LOG)


def _shape_text(shape: Sequence[int], dtype: object) -> str:
    return "x".join(str(int(v)) for v in shape) + f" {dtype}"


def _declared_problem(tf) -> Optional[str]:
    """What is wrong with the image a TIFF declares, read from its tags alone (no pixels decoded).

    A small file may declare a huge image: checking the shape before decoding
    keeps such a file from costing its declared size in memory.
    """
    series = tf.series
    if not series:
        return "holds no image"
    shape, dtype = tuple(series[0].shape), series[0].dtype
    if dtype is None or not shape or 0 in shape:
        return "declares no pixels (its image directory is damaged)"
    if shape != SHAPE or dtype != np.uint8:
        return f"image is {_shape_text(shape, dtype)}, expected 96x96x3 uint8"
    return None


def _log_reason(line: str) -> str:
    """A tifffile log line in a user's terms: the inner message, the tag by number."""
    line = line.strip()
    m = re.search(r"raised \w+\((['\"])(.*)\1\)$", line)
    if m:
        line = m.group(2)
    m = re.match(r"<tifffile\.TiffTag (\d+) @\d+>\s*(.*)", line)
    if m:
        return f"tag {m.group(1)}: {m.group(2)}"
    return re.sub(r"^<[^>]*>\s*", "", line)  # drop tifffile's "<TiffPage 0 @8>" prefix


def _read_problem(exc: Exception, logged: list[str], decoding: bool) -> str:
    """The reason a damaged TIFF could not be read, in a user's terms, from what tifffile said."""
    import tifffile

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    short = re.match(r"failed to read (\d+) bytes, got (\d+)", text)
    if short:
        return f"truncated: its pixel data needs {short.group(1)} bytes, the file holds {short.group(2)}"
    if decoding:
        return f"pixel data cannot be decoded ({text or type(exc).__name__})"
    if isinstance(exc, (tifffile.TiffFileError, OSError, EOFError)) and text:
        return text
    # Anything else is tifffile tripping over a tag it did not expect: what it
    # logged first says which, better than the Python error does.
    reasons = [r for r in map(_log_reason, logged) if r]
    return f"damaged image directory ({reasons[0]})" if reasons else "damaged image directory"


def _fallback(path: str) -> np.ndarray:
    """Read with tifffile and insist on the patch shape; errors name the file.

    The shape and type the tags declare are checked before any pixel is
    decoded; tifffile's own log lines and numpy warnings never reach stderr
    (the error says what matters).
    """
    import tifffile

    decoding = False
    # errstate: tifffile's numpy arithmetic on crafted tag values warns on stderr
    # (overflow); numpy keeps that state per thread.
    with np.errstate(all="ignore"), _TIFFFILE_LOG.capture() as logged:
        try:
            with tifffile.TiffFile(path) as tf:
                problem = _declared_problem(tf)
                if problem is None:
                    decoding = True
                    img = tf.asarray()
        except Exception as exc:  # tifffile raises many types for damaged files
            empty = os.path.exists(path) and os.path.getsize(path) == 0
            msg = "empty file" if empty else f"not a readable TIFF ({_read_problem(exc, logged, decoding)})"
            raise BadImageError(path, msg) from None
    if problem is not None:
        raise BadImageError(path, problem)
    if img.shape != SHAPE or img.dtype != np.uint8:  # tifffile decoded other than it declared
        raise BadImageError(path, f"image is {_shape_text(img.shape, img.dtype)}, expected 96x96x3 uint8")
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


def read_into(paths: Sequence[str], out: np.ndarray, buf: Optional[np.ndarray] = None,
              sums: Optional[np.ndarray] = None,
              sqsums: Optional[np.ndarray] = None) -> list[Optional[BadImageError]]:
    """Read ``paths`` into ``out[:len(paths)]``; returns one error (or None) per file.

    Damaged files do not stop the batch: the caller decides whether an error
    is fatal (``pack``) or skipped (``--skip-bad``). With ``sums`` and
    ``sqsums`` ((3,) uint64), the exact channel sums of every readable image
    are added to them (see :func:`channel_sums`). ``buf`` is scratch space
    ((k, SLOT_BYTES) uint8) a caller may reuse across calls.
    """
    n = len(paths)
    status = np.empty(n, np.int8)
    errors: list[Optional[BadImageError]] = [None] * n
    if NATIVE_IO and n:
        if buf is None:
            buf = np.empty((1, SLOT_BYTES), np.uint8)
        stats = sums is not None
        names = np.frombuffer(b"\0".join(map(os.fsencode, paths)) + b"\0", np.uint8)
        read_decode(names, _OPEN_FLAGS, buf[0], out, status, stats,
                    sums if stats else np.zeros(3, np.uint64), sqsums if stats else np.zeros(3, np.uint64))
        for i in np.flatnonzero(status == IO_ERROR):
            # The kernel knows only that a syscall failed: the Python read
            # of that one file names the error (or succeeds on a retry).
            errors[i] = _read_python(paths[i:i + 1], out[i:i + 1], buf, status[i:i + 1], sums, sqsums)[0]
    else:
        errors = _read_python(paths, out, buf, status, sums, sqsums)
    for i in np.flatnonzero(status != OK):
        if errors[i] is None:
            try:
                out[i] = _fallback(paths[i])
            except BadImageError as exc:
                errors[i] = exc
                continue
            if sums is not None:
                channel_sums(out[i:i + 1], np.ones(1, np.bool_), sums, sqsums)
    return errors


# Python's os.open sets O_CLOEXEC too: a subprocess started meanwhile inherits no fds.
# O_NONBLOCK changes nothing for files, but a FIFO named x.tif would block the open forever.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def _entry_problem(path: str, exc: OSError) -> str:
    """Why ``path`` could not be opened or read, naming what it is when it is not a file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "broken symbolic link (its target is missing)" if os.path.islink(path) else (exc.strerror or "not found")
    except OSError:
        return exc.strerror or "cannot open"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return exc.strerror or "cannot read"


def _read_python(paths: Sequence[str], out: np.ndarray, buf: Optional[np.ndarray], status: np.ndarray,
                 sums: Optional[np.ndarray], sqsums: Optional[np.ndarray]) -> list[Optional[BadImageError]]:
    """The reader where kernels cannot call C (numba off, not POSIX), and for I/O errors.

    Sets ``status`` per file like :func:`read_decode`; returns the I/O errors.
    """
    n = len(paths)
    # Files go through a few slots that stay in L2 between the read and the
    # decode: one slot per file of the whole batch (16 MB) made every byte
    # travel to memory and back, which cost as much as the syscalls.
    slots = min(n, GROUP) or 1
    if buf is None or buf.shape[0] < slots:
        buf = np.empty((slots, SLOT_BYTES), np.uint8)
    # One single-slot iovec list per slot, built once: not a new list per file.
    iovs = [[buf[i]] for i in range(slots)]
    lengths = np.empty(slots, np.int64)
    errors: list[Optional[BadImageError]] = [None] * n
    for a in range(0, n, slots):
        m = min(slots, n - a)
        for i in range(m):
            p = paths[a + i]
            try:
                fd = os.open(p, _OPEN_FLAGS)
            except OSError as exc:
                errors[a + i] = BadImageError(p, _entry_problem(p, exc))
                lengths[i] = -1
                continue
            try:
                got = os.preadv(fd, iovs[i], 0)
                # A file that fills the slot may be longer: tifffile reads it.
                lengths[i] = got if got < SLOT_BYTES else -1
            except OSError as exc:
                errors[a + i] = BadImageError(p, _entry_problem(p, exc))
                lengths[i] = -1
            finally:
                os.close(fd)
        decode_batch(buf[:m], lengths[:m], out[a:a + m], status[a:a + m])
        if sums is not None:
            # Now, while the group's pixels are still in L2: over the whole
            # batch afterwards they come back from memory.
            channel_sums(out[a:a + m], status[a:a + m] == OK, sums, sqsums)
    return errors


@dataclass
class DecodedBatch:
    """One batch of decoded patches, in input order."""

    start: int
    images: np.ndarray                      # (n, 96, 96, 3) uint8
    errors: list[Optional[BadImageError]]   # one per image
    sums: Optional[np.ndarray] = None       # with ``stats``: channel sums of the readable images
    sqsums: Optional[np.ndarray] = None     # ... and sums of squares, (3,) uint64 each


def iter_batches(paths: Sequence[str], batch_size: int = 512, workers: int = 2,
                 prefetch: int = 2, stats: bool = False, reuse: bool = False,
                 sink: Optional[Callable[[int, np.ndarray], None]] = None) -> Iterator[DecodedBatch]:
    """Decode ``paths`` in batches on ``workers`` threads, yielding batches in order.

    At most ``workers * prefetch`` batches are in flight, so memory stays
    bounded however many files there are. ``stats=True`` fills ``batch.sums``/``batch.sqsums`` with the exact channel
    sums of the batch's readable images, computed as the files are decoded.

    ``reuse=True`` recycles the image arrays: a batch's ``images`` are only
    valid until the next batch is asked for (copy what must outlive it).
    Fresh arrays cost a page fault per 4 KiB on first touch, ~1 us per image,
    as much as decoding it.

    ``sink(start, images)`` is called on the worker thread with every decoded
    batch (rows of unreadable files included, whatever they hold), before it
    is yielded: ``pack`` writes the rows to the store there, while they are
    still in that core's cache, instead of handing them to the main thread.
    """
    workers = max(1, int(workers))
    starts = range(0, len(paths), batch_size)

    local = threading.local()  # one read buffer per thread: no page faults per batch
    spare: list[np.ndarray] = []  # with ``reuse``: arrays the consumer is done with

    def work(start: int) -> DecodedBatch:
        chunk = paths[start:start + batch_size]
        if not hasattr(local, "buf"):
            local.buf = np.empty((min(batch_size, GROUP), SLOT_BYTES), np.uint8)
        try:
            images = spare.pop()[:len(chunk)]  # list.pop is atomic: no lock needed
        except IndexError:
            images = np.empty((len(chunk), *SHAPE), np.uint8)
        s = np.zeros(3, np.uint64) if stats else None
        q = np.zeros(3, np.uint64) if stats else None
        errors = read_into(chunk, images, local.buf, s, q)
        if sink is not None:
            sink(start, images)
        return DecodedBatch(start, images, errors, sums=s, sqsums=q)

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
            if reuse and len(batch.images) == batch_size:
                spare.append(batch.images)


@dataclass
class TifListing:
    """The tifs of a folder, sorted by id (the file stem), and its other files."""

    folder: str
    paths: list[str]
    ids: list[str]
    others: list[str]


def list_tifs(folder: str | os.PathLike) -> TifListing:
    """List the ``.tif``/``.tiff`` entries of ``folder``; hidden names are ignored.

    Every entry named like a tif is listed, file or not: a broken symbolic
    link or a folder named ``x.tif`` then fails to read like any damaged
    image, with its reason, instead of vanishing from the listing. Other
    names go to ``others`` (files only).

    Plain strings all the way: at ~10 us a file to read, pathlib objects
    (~1 us per ``.stem``, more per comparison) would be a sizeable share.

    Raises
    ------
    ImageFolderError
        Two files with the same id (``a.tif`` and ``a.tiff``).
    """
    folder = os.fspath(folder)
    by_id: dict[str, str] = {}
    others: list[str] = []
    with os.scandir(folder) as entries:
        for e in entries:
            name = e.name
            if name.startswith("."):
                continue
            low = name.lower()
            cut = 4 if low.endswith(".tif") else 5 if low.endswith(".tiff") else 0
            if not cut:
                if e.is_file():
                    others.append(name)
                continue
            stem = name[:-cut]
            if stem in by_id:
                a, b = sorted((os.path.basename(by_id[stem]), name))
                raise ImageFolderError(f"{folder}: duplicate id {stem} ({a} and {b})")
            by_id[stem] = e.path
    ids = sorted(by_id)
    return TifListing(folder, [by_id[i] for i in ids], ids, sorted(others))
