"""The Kaggle tif byte layout the generator writes: one fixed header, then the pixels.

A synthetic tif is byte-for-byte in the layout of Kaggle's (27,935 bytes,
pixels at offset 287), and its id is a 40-hex digest like Kaggle's.
"""
from __future__ import annotations

import hashlib
import struct

import numpy as np

from .schema import SIZE


def _tiff_header() -> bytes:
    """The 287 bytes before the pixels of every Kaggle tif.

    Kaggle's files were written by tifffile in 2018: one little-endian IFD of
    15 tags, uncompressed RGB in one strip at offset 287. Today's tifffile
    writes another layout (other tags, other offset), so the header is
    spelled out here; only the pixel bytes differ between files. DateTime
    is fixed so that a seed gives identical bytes.
    """
    desc = b'{"shape": [96, 96, 3]}\x00'
    soft = b"tifffile.py\x00"
    date = b"2018:11:15 17:21:16\x00"
    npix = SIZE * SIZE * 3
    tags = [  # (tag, type, count, value); type 2 ASCII, 3 SHORT, 4 LONG
        (254, 4, 1, 0), (256, 4, 1, SIZE), (257, 4, 1, SIZE), (258, 3, 3, 194), (259, 3, 1, 1),
        (262, 3, 1, 2), (270, 2, len(desc), 200), (273, 4, 1, 287), (277, 3, 1, 3),
        (278, 4, 1, SIZE), (279, 4, 1, npix), (284, 3, 1, 1), (305, 2, len(soft), 255),
        (306, 2, len(date), 267), (339, 3, 1, 1),
    ]
    head = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags))
    for tag, typ, count, value in tags:
        # A SHORT that fits sits left-justified in the 4-byte value field.
        val = struct.pack("<HH", value, 0) if typ == 3 and count == 1 else struct.pack("<I", value)
        head += struct.pack("<HHI", tag, typ, count) + val
    head += struct.pack("<I", 0)                      # no next IFD      -> 194
    head += struct.pack("<HHH", 8, 8, 8)              # BitsPerSample    -> 200
    head += desc + b"\x00" * 32                       # description + tifffile's slack -> 255
    head += soft + date                               # -> 287
    assert len(head) == 287
    return head


TIFF_HEADER = _tiff_header()
TIFF_SIZE = len(TIFF_HEADER) + SIZE * SIZE * 3  # 27,935


def encode_tiff(image: np.ndarray) -> bytes:
    """The bytes of a Kaggle-layout tif holding ``image`` (96, 96, 3) uint8."""
    return TIFF_HEADER + np.ascontiguousarray(image, dtype=np.uint8).tobytes()


def patch_id(seed: int, split: str, index: int) -> str:
    """A deterministic 40-hex id, like Kaggle's (which are SHA-1 digests)."""
    return hashlib.sha1(f"pcamtool-synth:{seed}:{split}:{index}".encode()).hexdigest()

