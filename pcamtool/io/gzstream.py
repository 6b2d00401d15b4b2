"""Read an HDF5 file straight out of its ``.gz``, with no decompressed copy on disk.

h5py reads from any Python file object, but HDF5 does not read in order: it
asks for the file's size first, then reads chunk-index nodes that lie ahead
of the chunks they index and comes back for the chunks. ``gzip.GzipFile``
answers a backward seek by decompressing again from the start of the file,
so a 7 GB split would be decompressed over and over. :class:`GzipSeekable`
keeps

* the last :data:`WINDOW` bytes of output, which serve the short back-reads
  (metadata a few hundred KiB behind), and
* a copy of the inflater every :data:`CHECKPOINT` bytes of output
  (``zlib.Decompress.copy()``), so a longer backward seek restarts at most
  that far before its target, never from the start;

and answers the size from the HDF5 superblock (a gzip trailer holds the size
modulo 2^32 only, too little for the 7 GB train split; the two must agree,
which finds most truncated downloads before any work). Reading the x
dataset in chunk order then decompresses the stream about once.

Example::

    import h5py
    with GzipSeekable("camelyonpatch_level_2_split_valid_x.h5.gz") as raw, h5py.File(raw, "r") as f:
        first = f["x"][:512]
"""
from __future__ import annotations

import bisect
import io
import os
import struct
import zlib
from pathlib import Path
from typing import Optional

WINDOW = 16 * 2**20        # recent output kept for short back-reads
CHECKPOINT = 32 * 2**20    # output between two saved inflater states (~50 KiB each)
IN_BLOCK = 2**20           # compressed bytes read at a time
OUT_STEP = 4 * 2**20       # most output one inflate call may make (zeros expand ~1000x)
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def inflater_module():
    """``zlib_ng`` when installed (``pip install 'pcamtool[fastgz]'``: ~1.3x faster inflate, measured), else ``zlib``.

    ``PCAMTOOL_GZIP=zlib`` in the environment keeps the standard library's (for comparisons).
    """
    if os.environ.get("PCAMTOOL_GZIP", "").strip().lower() == "zlib":
        return zlib
    try:
        from zlib_ng import zlib_ng
        return zlib_ng
    except ImportError:
        return zlib


class GzipStreamError(OSError):
    """The ``.gz`` is truncated, damaged, or holds no HDF5 file."""


def _hdf5_size(head: bytes) -> Optional[int]:
    """Size of the HDF5 file whose first bytes are ``head``, from its superblock (None: not HDF5).

    The superblock sits at 0 or, after a user block, at 512, 1024, 2048...;
    its end-of-file address counts from its base address.
    """
    where = 0
    while where + 64 <= len(head):
        if head[where:where + 8] == HDF5_SIGNATURE:
            version = head[where + 8]
            if version in (0, 1):
                size_of_offsets = head[where + 13]
                first = where + (24 if version == 0 else 28)   # base, free space, EOF, driver addresses
            elif version in (2, 3):
                size_of_offsets = head[where + 9]
                first = where + 12                              # base, extension, EOF, root addresses
            else:
                return None
            if size_of_offsets not in (2, 4, 8) or first + 3 * size_of_offsets > len(head):
                return None
            base = int.from_bytes(head[first:first + size_of_offsets], "little")
            eof_at = first + 2 * size_of_offsets
            eof = int.from_bytes(head[eof_at:eof_at + size_of_offsets], "little")
            return base + eof
        where = 512 if where == 0 else where * 2
    return None


class GzipSeekable(io.RawIOBase):
    """A read-only, seekable view of the data inside a gzip file (see the module docstring).

    ``restarts`` counts backward seeks served from a checkpoint and
    ``inflated`` the bytes of output made in all, so a caller can see how
    close to one pass a read pattern came.
    """

    def __init__(self, path: str | os.PathLike, window: int = WINDOW, checkpoint: int = CHECKPOINT) -> None:
        super().__init__()
        self.path = Path(path)
        self._raw = open(self.path, "rb")
        self._raw_size = os.fstat(self._raw.fileno()).st_size
        self.window = int(window)
        self.checkpoint = int(checkpoint)
        self._pos = 0
        self._floor = 0             # the start of the read under way: the window keeps it
        self._size: Optional[int] = None
        self._checkpoints: list[tuple[int, int, object]] = []   # (output offset, input offset, inflater)
        self._keys: list[int] = []                               # output offsets, for bisect
        self._blocks: list[tuple[int, bytes]] = []              # (output offset, bytes): the window
        self.restarts = 0
        self.inflated = 0
        self._zlib = inflater_module()
        self._start(0, 0, self._zlib.decompressobj(16 + zlib.MAX_WBITS))

    # -- the inflater --------------------------------------------------------------

    def _start(self, out_at: int, in_at: int, inflater: object) -> None:
        self._d = inflater
        self._out = out_at          # output made so far by this inflater
        self._in = in_at            # input offset of the next byte to feed
        self._pending = b""         # fed input the inflater has not taken yet
        self._done = False          # the last member ended
        self._blocks = []
        self._raw.seek(in_at)
        if not self._keys or out_at > self._keys[-1]:
            self._save()

    def _save(self) -> None:
        state = self._d.copy()  # type: ignore[attr-defined]
        self._checkpoints.append((self._out, self._in - len(self._pending), state))
        self._keys.append(self._out)

    def _fail(self, problem: str) -> GzipStreamError:
        return GzipStreamError(f"{self.path}: {problem}")

    def _advance(self) -> bool:
        """Inflate the next piece of output into the window; False at the end of the stream."""
        if self._done:
            return False
        d = self._d
        data = self._pending
        if not data:
            data = self._raw.read(IN_BLOCK)
            self._in += len(data)
            if not data:
                raise self._fail(f"truncated .gz (the compressed stream stops after {self._out:,} bytes of data; "
                                 f"download it again)")
        try:
            out = d.decompress(data, OUT_STEP)  # type: ignore[attr-defined]
        except (zlib.error, self._zlib.error) as exc:
            raise self._fail(f"damaged .gz at {self._out:,} bytes of data ({exc})") from None
        self._pending = d.unconsumed_tail  # type: ignore[attr-defined]
        if d.eof:  # type: ignore[attr-defined]
            rest = d.unused_data  # type: ignore[attr-defined]
            while not rest.lstrip(b"\0"):  # zero padding after the last member, as tar leaves
                more = self._raw.read(IN_BLOCK)
                self._in += len(more)
                if not more:
                    break
                rest = more
            rest = rest.lstrip(b"\0")
            if rest[:2] == b"\x1f\x8b":  # another member (pigz -i, cat a.gz b.gz)
                self._d = self._zlib.decompressobj(16 + zlib.MAX_WBITS)
                self._pending = rest
            elif rest:
                raise self._fail(f"data after the end of the gzip stream at {self._out:,} bytes of data")
            else:
                self._done = True
        if out:
            self._blocks.append((self._out, out))
            self._out += len(out)
            self.inflated += len(out)
            # drop the oldest block once the rest covers the window, unless the read under way needs it
            while len(self._blocks) > 1 and self._out - self._blocks[1][0] >= self.window \
                    and self._blocks[1][0] <= self._floor:
                self._blocks.pop(0)
            if self._out - self._keys[-1] >= self.checkpoint and not self._done:
                self._save()
        return not self._done or bool(out)

    def _rewind_to(self, pos: int) -> None:
        k = bisect.bisect_right(self._keys, pos) - 1
        out_at, in_at, state = self._checkpoints[k]
        self.restarts += 1
        self._start(out_at, in_at, state.copy())  # type: ignore[attr-defined]  # the checkpoint stays reusable

    # -- the file interface --------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        view = memoryview(buffer).cast("B")
        want = len(view)
        pos = self._pos
        window_start = self._blocks[0][0] if self._blocks else self._out
        if pos < window_start:
            self._rewind_to(pos)
        got = 0
        # Copy each piece of output as soon as it is made (still in cache), and
        # let the window move on behind the copy: a read of the whole x dataset
        # (hundreds of MB in one call) then never holds it all twice.
        while got < want:
            at = pos + got
            self._floor = at
            if at >= self._out:
                if not self._advance():
                    break
                continue
            for start, block in reversed(self._blocks):   # reading forward: the newest block, mostly
                if start <= at:
                    a = at - start
                    take = min(len(block) - a, want - got)
                    view[got:got + take] = memoryview(block)[a:a + take]
                    got += take
                    break
        self._pos += got
        return got

    @property
    def size(self) -> int:
        """Bytes of the HDF5 file inside (its superblock's end of file), checked against the gzip trailer."""
        if self._size is None:
            self._size = self._find_size()
        return self._size

    def _find_size(self) -> int:
        if self._raw_size < 18:
            raise self._fail("not a gzip file (too short)")
        self._raw.seek(0)
        magic = self._raw.read(2)
        self._raw.seek(self._in)
        if magic != b"\x1f\x8b":
            raise self._fail("not a gzip file (name it .h5 if it is not compressed)")
        saved = self._pos
        self._pos = 0
        head = bytearray(16384)
        n = self.readinto(head)
        self._pos = saved
        size = _hdf5_size(bytes(head[:n]))
        if size is None:
            raise self._fail("the .gz does not hold an HDF5 file")
        with open(self.path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            (trailer,) = struct.unpack("<I", f.read(4))
        if trailer != size % 2**32:
            raise self._fail(f"truncated or damaged .gz (the HDF5 file inside is {size:,} bytes, "
                             f"the gzip trailer says {trailer:,} modulo 2^32; download it again)")
        return size

    def verify(self) -> None:
        """Inflate to the end of the stream: checks its CRC and length (raises :class:`GzipStreamError`)."""
        while self._advance():
            self._blocks = self._blocks[-1:]

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
            self._checkpoints.clear()
            self._blocks = []
        super().close()
