"""Writing files so that nothing half-written ever sits under the final name.

:func:`atomic_path` is the one way pcamtool writes an output: the data goes
to a temporary file beside it, named per process
(``.NAME.<pid>.<random>.partial``), which is renamed onto ``NAME`` only when
it is complete. While it writes, the run holds an advisory lock
(``flock``) on ``.NAME.lock``, so a second run to the same output is refused
in one line instead of clobbering the first. The kernel drops the lock when
its process dies, so a killed run never blocks the next one; that next run
removes the temporaries of dead processes it finds beside the output.

Example::

    with atomic_path("data/train.h5", force=False) as tmp:
        write_everything(tmp)          # an exception leaves data/train.h5 untouched
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from ..errors import BusyError, ExistsError, PcamError, few

try:
    import fcntl
except ImportError:  # not POSIX: unique temporaries still keep runs apart
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIX = ".partial"
# Errors that mean "this place cannot take the output", whatever file they name.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def partial_name(path: str | os.PathLike) -> Path:
    """The fixed temporary name ``.NAME.partial`` beside ``path``.

    Kept for code that stages several files itself; a single output should
    use :func:`atomic_path`, whose temporaries are unique per process.
    """
    p = Path(path)
    return p.with_name(f".{p.name}{TEMP_SUFFIX}")


def temp_name(path: str | os.PathLike) -> Path:
    """A temporary name beside ``path`` that no other process uses: ``.NAME.<pid>.<8 hex>.partial``."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def lock_name(path: str | os.PathLike) -> Path:
    """The lock file ``.NAME.lock`` a writer of ``path`` holds while it writes."""
    p = Path(path)
    return p.with_name(f".{p.name}.lock")


def utf8_ok(text: str) -> bool:
    """True when ``text`` can be written as UTF-8 (file names of undecodable bytes cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # Python keeps undecodable bytes of file names as lone surrogates
        return False
    return True


def check_writable(path: str | os.PathLike, force: bool) -> None:
    """Refuse an output ``path`` that is a folder, or that exists unless ``force``.

    Raises
    ------
    ExistsError
        ``path`` exists (a file or a link) and ``force`` is false.
    PcamError
        ``path`` is a folder, or its parent is not one.
    """
    p = Path(path)
    if p.is_dir():
        raise PcamError(f"{p}: is a folder; give the name of a file to write")
    if os.path.lexists(p) and not force:
        raise ExistsError(p)
    if p.parent.exists() and not p.parent.is_dir():
        raise PcamError(f"{p}: cannot write there ({p.parent} is not a folder)")


def write_problem(exc: BaseException, tmp: Optional[Path] = None) -> Optional[str]:
    """Why ``exc`` means the output cannot be written (disk full, read-only, ...), or None.

    Understands plain ``OSError`` and h5py's errors (an ``OSError``, or a
    ``RuntimeError`` when closing), whose text carries the C ``errno``
    ("... errno = 28, error message = 'No space left on device' ...").
    Errors naming another file (an input) are not the output's: None.
    """
    if not isinstance(exc, (OSError, RuntimeError)):
        return None
    text = str(exc)
    code = getattr(exc, "errno", None)
    if code is None:
        found = re.search(r"errno = (\d+)", text)
        code = int(found.group(1)) if found else None
    about_tmp = tmp is not None and tmp.name in text
    if getattr(exc, "filename", None) is not None and not about_tmp:
        return None
    if code in _WRITE_ERRNOS and (about_tmp or isinstance(exc, OSError)):
        return os.strerror(code)
    if about_tmp and isinstance(exc, OSError):
        # An h5py error about our file without an errno: its summary, before
        # the details in brackets (which name the temporary, not the output).
        return text.split(" (", 1)[0].strip() or type(exc).__name__
    return None


def _make_parent(final: Path) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PcamError(f"{final}: cannot create its folder {final.parent} ({exc.strerror})") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def remove_dead_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` left by processes that are gone; returns them.

    Only names of the form :func:`temp_name` makes whose pid no longer runs:
    the fixed :func:`partial_name` and the files of live processes stay.
    """
    final = Path(path)
    prefix, removed = f".{final.name}.", []
    pattern = re.compile(r"(\d+)\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        found = pattern.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
        if found and not _alive(int(found.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


class QuietFailingFile:
    """The file HDF5 writes a store through: a failed write is kept here, not reported to HDF5.

    HDF5 2.0 (h5py 3.16) crashes the process (a segfault, no message) when a
    write fails while it closes a file, as on a disk that fills up during a
    compressed pack. So HDF5 is told every write succeeded; the first error
    is kept in :attr:`error`, for the writer to raise after each call into
    h5py and at close (:class:`pcamtool.io.store.StoreWriter` does). The
    file is garbage from then on, and the caller deletes it.
    """

    def __init__(self, path: Path) -> None:
        self._f = open(path, "w+b", buffering=0)
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while self.error is None and done < len(view):
            try:
                done += self._f.write(view[done:])
            except OSError as exc:
                self.error = exc
        return len(view)

    def truncate(self, size: Optional[int] = None) -> int:
        try:
            return self._f.truncate(size)
        except OSError as exc:
            self.error = self.error or exc
            return self._f.tell() if size is None else size

    def read(self, size: int = -1) -> bytes:  # h5py tells file objects by read and seek
        return self._f.read(size)

    def readinto(self, buf: Any) -> Optional[int]:
        return self._f.readinto(buf)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        pass  # unbuffered: nothing to flush

    def close(self) -> None:
        self._f.close()


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the advisory lock of output ``path`` (on ``.NAME.lock``) for the block.

    Raises
    ------
    BusyError
        Another process holds it (the message gives its pid).
    PcamError
        The lock file cannot be made there (read-only, missing permission).
    """
    final = Path(path)
    lock = lock_name(final)
    if fcntl is None:
        yield
        return
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise PcamError(f"{final}: cannot write there ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise BusyError(f"{final}: being written by another process{who}; "
                            "wait for it to finish or write elsewhere") from None
        except OSError:  # no flock on this filesystem: unique temporaries still keep runs apart
            break
        # The holder before us unlinks the lock file when done: if that
        # happened between our open and our flock, we hold a lock nobody else
        # will see. Only the file still under the name counts.
        try:
            st, now = os.fstat(fd), os.stat(lock)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # the pid is for the message only
            # Fixed width over whatever a killed holder left: no ftruncate,
            # which costs ms on ext4 (a truncated file's data is flushed at close).
            os.pwrite(fd, f"{os.getpid():>20}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still held: see the inode check above
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto ``path`` only on success.

    The temporary is unique to this process and removed on any exception
    (Ctrl-C included); a second writer of ``path`` is refused while this one
    runs (:class:`BusyError`).

    Raises
    ------
    ExistsError
        ``path`` exists and ``force`` is false.
    BusyError
        Another process is writing ``path``.
    PcamError
        ``path`` is a folder, cannot be created there, or the disk filled up
        (the message names ``path``, never the temporary).
    """
    final = Path(path)
    check_writable(final, force)
    _make_parent(final)
    with output_lock(final):
        check_writable(final, force)  # another run may have finished it just before us
        remove_dead_temps(final)
        tmp = temp_name(final)
        try:
            yield tmp
            os.replace(tmp, final)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            problem = write_problem(exc, tmp)
            if problem is not None:
                raise PcamError(f"{final}: cannot write ({problem}); nothing was written") from None
            raise


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str | os.PathLike], force: bool = False) -> Iterator[dict[Path, Path]]:
    """:func:`atomic_path` for outputs that belong together: yields ``{final: temporary}``.

    Every output is locked for the whole block and renamed onto its name
    only when the block succeeds, so a run killed half-way leaves none of
    them (only temporaries, which the next run removes) and the same command
    then starts afresh, instead of being refused for the outputs it had
    already finished.

    Raises
    ------
    ExistsError, BusyError, PcamError
        As :func:`atomic_path`, for the first output concerned.
    """
    finals = [Path(p) for p in paths]
    for final in finals:
        check_writable(final, force)
        _make_parent(final)
    with contextlib.ExitStack() as locks:
        for final in finals:
            locks.enter_context(output_lock(final))
        for final in finals:
            check_writable(final, force)  # another run may have finished them just before us
            remove_dead_temps(final)
        tmps = {final: temp_name(final) for final in finals}
        try:
            yield tmps
            for final, tmp in tmps.items():  # each rename is atomic; together they take microseconds
                os.replace(tmp, final)
        except BaseException as exc:
            for tmp in tmps.values():
                with contextlib.suppress(OSError):
                    tmp.unlink()
            for final, tmp in tmps.items():
                problem = write_problem(exc, tmp)
                if problem is not None:
                    raise PcamError(f"{final}: cannot write ({problem}); nothing was written") from None
            raise


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Turn Ctrl-C into a flag the caller polls at a point it chooses; yields the poll.

    Python raises ``KeyboardInterrupt`` in whatever Python code runs next.
    During a compressed write that is often a weakref callback inside h5py,
    where the exception is printed as "ignored" and lost: the pack went on
    and exited 0. A flag read at one known point cannot be lost. A second
    Ctrl-C raises at once, for the impatient. Off the main thread (no
    signals there) or where SIGINT is ignored, nothing changes.
    """
    hits: list[int] = []

    def on_sigint(signum: int, frame: object) -> None:
        if hits:
            raise KeyboardInterrupt
        hits.append(signum)

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


def check_output_folder(out_dir: str | os.PathLike, names: Sequence[str], force: bool, command: str) -> None:
    """Refuse a folder that holds any of ``names`` already (unless ``force``), before a command does its work.

    For commands that write several files into one folder (``eda``,
    ``interpret``): ``command`` names it in the message.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PcamError(f"{out}: not a folder ({command} writes several files into a folder)")
    there = [name for name in names if os.path.lexists(out / name)]
    if there and not force:
        raise ExistsError(out, f"already holds {few(there)}")


class WholeWrites:
    """A binary file whose ``write`` writes everything or raises ``OSError`` naming the file.

    For writers in C++ that take a Python file object: ``torch.save`` to a
    file name reports a full disk as ``[enforce fail at inline_container.cc:672]
    ... unexpected pos`` or ``basic_ios::clear: iostream error``; through this
    object the ``OSError`` (ENOSPC, EDQUOT, ...) reaches the caller, and
    :func:`atomic_path` turns it into one line naming the output. (torch
    turns an exception raised in ``write`` into that same ``RuntimeError``,
    so the first failed write is kept and raised in its place on exit.)

    Example::

        with atomic_path("runs/x/best.pt", force=True) as tmp, WholeWrites(tmp) as f:
            torch.save(state, f)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._f = open(self.path, "wb", buffering=0)
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                # FileIO writes what fits and returns the count; the next call raises the reason
                done += self._f.write(view[done:]) or 0
        except OSError as exc:
            self.error = self.error or OSError(exc.errno, exc.strerror, self.path)
            raise self.error from None
        return len(view)

    def flush(self) -> None:
        pass  # unbuffered

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._f.seek(pos, whence)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "WholeWrites":
        # Ctrl-C is held back while the C++ writer calls write(): a KeyboardInterrupt
        # raised inside it would reach the caller as torch's "[enforce fail ...]"
        self._defer = deferred_interrupt()
        self._interrupted = self._defer.__enter__()
        return self

    def __exit__(self, exc_type: object, exc: Optional[BaseException], tb: object) -> None:
        try:
            self.close()
        finally:
            interrupted = self._interrupted()
            self._defer.__exit__(None, None, None)
        if exc is not None and self.error is not None and exc is not self.error:
            raise self.error from None  # the real reason, not the writer's report of it
        if interrupted and exc is None:
            raise KeyboardInterrupt  # now that the file is whole
