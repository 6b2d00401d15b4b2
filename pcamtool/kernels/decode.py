"""Decode the common uncompressed TIFF layout straight from file bytes.

Kaggle's patches are classic TIFF, one IFD, uncompressed, RGB contiguous, one
strip (tifffile wrote them). Parsing the IFD here instead of calling
``tifffile.imread`` per file is what makes packing ~10x faster. Anything this
parser does not fully understand returns a non-zero status, and the caller
falls back to tifffile, so the fast path never guesses.
"""
from __future__ import annotations

import numpy as np

from .jit import jit, libc
from .stats import channel_sums

OK = 0
FALLBACK = 1  # not the simple layout (or damaged): let tifffile decide
IO_ERROR = 2  # open or read failed: the caller retries in Python, which names the error

# The file syscalls, called from inside the reading kernel. From Python each
# open/read/close holds the GIL between syscalls, so two reading threads ran
# no faster than one; inside a nogil kernel they run side by side (2.4x the
# one-thread Python loop here). None where kernels cannot call C (see libc).
_open = libc("open", "int32", "intp", "int32")
_pread = libc("pread", "intp", "int32", "intp", "intp", "intp")
_preadv = libc("preadv", "intp", "int32", "intp", "int32", "intp")
_close = libc("close", "int32", "int32")
NATIVE_IO = None not in (_open, _pread, _preadv, _close)

PATCH = 96
CHANNELS = 3
PATCH_BYTES = PATCH * PATCH * CHANNELS


@jit
def _u16(b, off, little):
    if little:
        return np.int64(b[off]) | (np.int64(b[off + 1]) << 8)
    return (np.int64(b[off]) << 8) | np.int64(b[off + 1])


@jit
def _u32(b, off, little):
    if little:
        return (np.int64(b[off]) | (np.int64(b[off + 1]) << 8)
                | (np.int64(b[off + 2]) << 16) | (np.int64(b[off + 3]) << 24))
    return ((np.int64(b[off]) << 24) | (np.int64(b[off + 1]) << 16)
            | (np.int64(b[off + 2]) << 8) | np.int64(b[off + 3]))


@jit
def _value(b, n, little, typ, count, field, index):
    """Element ``index`` of a SHORT/LONG tag whose 4-byte field starts at ``field``; -1 if unreadable."""
    if index >= count:  # a tag with fewer values than asked for (count 0 included) has no such value
        return -1
    if typ == 3:
        size = 2
    elif typ == 4:
        size = 4
    else:
        return -1
    if count * size <= 4:
        off = field + index * size
    else:
        off = _u32(b, field, little) + index * size
    if off < 0 or off + size > n:
        return -1
    if size == 2:
        return _u16(b, off, little)
    return _u32(b, off, little)


NO_LAYOUT = (False, -1, 0, -1, -1, 0, 0)
# The tags _layout reads, each with its bit in a "seen" mask.
_READ_TAGS = (256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 284, 339)


@jit
def _tag_bit(tag):
    for k in range(len(_READ_TAGS)):
        if _READ_TAGS[k] == tag:
            return 1 << k
    return 0


@jit
def _layout(b, n):
    """Parse the one IFD of a simple 96x96x3 uint8 TIFF whose first ``n`` bytes are in ``b``.

    Returns ``(little, strips_field, strips_type, strips_count, counts_field,
    counts_type, rows_per_strip)``, or ``NO_LAYOUT`` (strips_count -1) for
    anything else. Reads nothing at or past ``n``; the strips themselves are
    not checked.
    """
    if n < 8:
        return NO_LAYOUT
    if b[0] == 0x49 and b[1] == 0x49:
        little = True
    elif b[0] == 0x4D and b[1] == 0x4D:
        little = False
    else:
        return NO_LAYOUT
    if _u16(b, 2, little) != 42:  # 43 is BigTIFF: tifffile handles it
        return NO_LAYOUT
    ifd = _u32(b, 4, little)
    if ifd + 2 > n:
        return NO_LAYOUT
    entries = _u16(b, ifd, little)
    if ifd + 2 + entries * 12 + 4 > n:
        return NO_LAYOUT
    if _u32(b, ifd + 2 + entries * 12, little) != 0:
        return NO_LAYOUT  # several pages: tifffile reads them as a stack
    width = height = spp = -1
    compression = photometric = planar = sampleformat = 1
    rows_per_strip = PATCH
    bits_ok = False
    strips_field = counts_field = -1
    strips_type = counts_type = 0
    strips_count = counts_count = 0
    photometric = -1
    seen = 0  # bit k: the k-th tag this parser reads has been met (a repeat makes the file ambiguous)
    for e in range(entries):
        p = ifd + 2 + e * 12
        tag = _u16(b, p, little)
        typ = _u16(b, p + 2, little)
        count = _u32(b, p + 4, little)
        field = p + 8
        bit = _tag_bit(tag)
        if bit & seen:
            return NO_LAYOUT  # which of two equal tags counts differs between readers: ambiguous
        seen |= bit
        if tag == 256:
            width = _value(b, n, little, typ, count, field, 0)
        elif tag == 257:
            height = _value(b, n, little, typ, count, field, 0)
        elif tag == 258:
            # One value for all samples or one per sample; the loop stops at the first
            # that is not 8 (a crafted count of 2**31 once took 30 s here).
            bits_ok = count == 1 or count == CHANNELS
            for c in range(min(count, CHANNELS)):
                if _value(b, n, little, typ, count, field, c) != 8:
                    bits_ok = False
                    break
        elif tag == 259:
            compression = _value(b, n, little, typ, count, field, 0)
        elif tag == 262:
            photometric = _value(b, n, little, typ, count, field, 0)
        elif tag == 273:
            strips_field, strips_type, strips_count = field, typ, count
        elif tag == 277:
            spp = _value(b, n, little, typ, count, field, 0)
        elif tag == 278:
            rows_per_strip = _value(b, n, little, typ, count, field, 0)
        elif tag == 279:
            counts_field, counts_type, counts_count = field, typ, count
        elif tag == 284:
            planar = _value(b, n, little, typ, count, field, 0)
        elif tag == 339:
            sampleformat = _value(b, n, little, typ, count, field, 0)
        elif tag == 266:
            if _value(b, n, little, typ, count, field, 0) != 1:
                return NO_LAYOUT  # FillOrder 2: tifffile reverses the bits of every byte
        elif tag == 317 or tag == 338 or (tag >= 322 and tag <= 325):
            return NO_LAYOUT  # predictor, extra samples (alpha) or tiles
    if (width != PATCH or height != PATCH or spp != CHANNELS or not bits_ok
            or compression != 1 or photometric != 2 or planar != 1 or sampleformat != 1
            or strips_field < 0 or counts_field < 0 or strips_count != counts_count
            or rows_per_strip <= 0):
        return NO_LAYOUT
    return (little, strips_field, strips_type, strips_count, counts_field, counts_type, rows_per_strip)


@jit
def decode_tiff(b, n, out):
    """Copy the pixels of one simple 96x96x3 uint8 TIFF held in ``b[:n]`` into ``out``.

    Returns ``OK`` or ``FALLBACK``; ``out`` is only meaningful on ``OK``.
    """
    little, strips_field, strips_type, strips_count, counts_field, counts_type, rows_per_strip = _layout(b, n)
    if strips_count < 0:
        return FALLBACK
    flat = out.reshape(PATCH_BYTES)
    row_bytes = PATCH * CHANNELS
    done = 0
    for s in range(strips_count):
        start = _value(b, n, little, strips_type, strips_count, strips_field, s)
        size = _value(b, n, little, counts_type, strips_count, counts_field, s)
        rows = min(rows_per_strip, PATCH - done // row_bytes)
        want = rows * row_bytes
        # Offset 0 is the header, no place for pixels; tifffile reads such a file its own way.
        if start <= 0 or size < want or start + want > n or done + want > PATCH_BYTES:
            return FALLBACK  # truncated or inconsistent: tifffile names the problem
        # An explicit loop over two views, not a slice assignment: numba's
        # slice copy (and a loop indexing b[start + j], whose sign numba cannot
        # prove, so it adds a wraparound branch) copies a byte at a time,
        # ~2 GB/s; this loop vectorizes (~10 GB/s).
        src = b[start:start + want]
        dst = flat[done:done + want]
        for j in range(want):
            dst[j] = src[j]
        done += want
    if done != PATCH_BYTES:
        return FALLBACK
    return OK


@jit
def pixel_offset(b, n):
    """Where the pixels of the simple TIFF whose first ``n`` bytes are in ``b`` start, if in one run.

    That is, its strips lie back to back with exactly the 96x96x3 bytes; -1
    otherwise. The pixel bytes themselves need not be in ``b`` (the reader
    checks a header read apart from the pixels with it).
    """
    little, strips_field, strips_type, strips_count, counts_field, counts_type, rows_per_strip = _layout(b, n)
    if strips_count < 1:
        return -1
    row_bytes = PATCH * CHANNELS
    first = _value(b, n, little, strips_type, strips_count, strips_field, 0)
    done = 0
    for s in range(strips_count):
        start = _value(b, n, little, strips_type, strips_count, strips_field, s)
        size = _value(b, n, little, counts_type, strips_count, counts_field, s)
        want = min(rows_per_strip, PATCH - done // row_bytes) * row_bytes
        if start <= 0 or start != first + done or size != want:
            return -1
        done += want
    return first if done == PATCH_BYTES else -1


@jit
def decode_batch(buf, lengths, out, status):
    """Decode ``buf[i, :lengths[i]]`` into ``out[i]`` for every i; status per file."""
    for i in range(buf.shape[0]):
        if lengths[i] < 0:
            status[i] = FALLBACK
        else:
            status[i] = decode_tiff(buf[i], lengths[i], out[i])


@jit
def read_decode(names, flags, slot, out, status, stats, sums, sqsums):
    """Open, read and decode the files named in ``names``, one per row of ``out``.

    ``names`` holds the encoded paths back to back, each ending in a NUL byte.
    With ``stats``, the channel sums of every decoded image are added to
    ``sums``/``sqsums``. ``status[i]`` is OK, FALLBACK or IO_ERROR. Only
    callable where ``NATIVE_IO``.

    The files of a folder share one layout (Kaggle's: a 287-byte header, then
    the pixels, then the end of the file). Once a file has shown it, the next
    ones are read with one ``preadv`` that puts the header in ``slot`` and the
    pixels straight into ``out[i]``, where the check of the header says they
    belong: no copy of the pixels in user space. A file that does not fit is
    read again whole into ``slot`` and decoded from there (or left to tifffile).
    """
    base = names.ctypes.data
    slot_ptr = slot.ctypes.data
    cap = slot.shape[0]
    flat = out.reshape(out.shape[0], PATCH_BYTES)
    iov = np.empty(6, np.int64)  # struct iovec[3]: (base, length) pairs
    keep = np.ones(1, np.bool_)
    head = 0  # the pixel offset of the last file read whole, if header-then-pixels
    pos = 0
    for i in range(out.shape[0]):
        fd = _open(base + pos, flags)
        while names[pos] != 0:
            pos += 1
        pos += 1
        if fd < 0:
            status[i] = IO_ERROR
            continue
        status[i] = FALLBACK
        if head > 0:
            # header | pixels | anything after them (which must be nothing)
            iov[0], iov[1] = slot_ptr, head
            iov[2], iov[3] = flat[i].ctypes.data, PATCH_BYTES
            iov[4], iov[5] = slot_ptr + head, cap - head
            got = _preadv(fd, iov.ctypes.data, 3, 0)
            if got == head + PATCH_BYTES and pixel_offset(slot, head) == head:
                status[i] = OK
        if status[i] != OK:
            got = _pread(fd, slot_ptr, cap, 0)
            if got < 0:
                status[i] = IO_ERROR
            elif got < cap:
                status[i] = decode_tiff(slot, got, out[i])
                start = pixel_offset(slot, got) if status[i] == OK else -1
                head = start if start > 0 and start + PATCH_BYTES == got else 0
        _close(fd)
        if stats and status[i] == OK:
            channel_sums(out[i:i + 1], keep, sums, sqsums)
