"""PCam benchmark files in the published layout, small, for tests and benchmarks.

``x`` uint8 (N, 96, 96, 3) and ``y`` uint8 (N, 1, 1, 1), gzip-compressed in
HDF5 chunks, and the meta CSV as pandas writes it (an unnamed row-number
column, then ``coord_y,coord_x,tumor_patch,center_tumor_patch,wsi``, flags as
``True``/``False``), each optionally gzipped whole as distributed (``.h5.gz``).
"""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

PREFIX = "camelyonpatch_level_2_split_"


def pcam_patches(n: int, seed: int = 0) -> np.ndarray:
    """Smooth, tissue-like uint8 patches (they gzip about as well as real ones; noise would not compress)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(120, 230, (n, 1, 1, 3)).astype(np.int16)
    yy, xx = np.mgrid[0:96, 0:96]
    waves = (20 * np.sin(xx[None] / rng.uniform(3, 9, (n, 1, 1)) + yy[None] / rng.uniform(3, 9, (n, 1, 1))))
    noise = rng.integers(-6, 7, (n, 96, 96, 3))
    return np.clip(base + waves[..., None].astype(np.int16) + noise, 0, 255).astype(np.uint8)


def write_split(root: Path, split: str = "valid", n: int = 64, seed: int = 0, n_slides: int = 8,
                gz: bool = False, chunks: Optional[tuple] = (1, 96, 96, 3), compression: Optional[str] = "gzip",
                x: Optional[np.ndarray] = None, meta: bool = True) -> dict:
    """Write one split into ``root``; returns its arrays (``x``, ``y``, ``slides``, ``coords``, ``tumor``)."""
    rng = np.random.default_rng(seed + 1)
    root.mkdir(parents=True, exist_ok=True)
    x = pcam_patches(n, seed) if x is None else x
    y = rng.integers(0, 2, n).astype(np.uint8)
    slides = np.array([f"camelyon16_{split}_{'tumor' if s % 2 else 'normal'}_{s:03d}"
                       for s in rng.integers(0, n_slides, n)])
    coords = rng.integers(0, 200_000, (n, 2))
    tumor = y.astype(bool) | (rng.random(n) < 0.2)
    kw = {} if chunks is None else {"chunks": chunks, "maxshape": (None, *chunks[1:]) if chunks is not True else None}
    if chunks is True:
        kw = {"chunks": True, "maxshape": (None, 96, 96, 3)}
    for name, data, key in (("x", x, "x"), ("y", y.reshape(n, 1, 1, 1), "y")):
        path = root / f"{PREFIX}{split}_{name}.h5"
        with h5py.File(path, "w") as f:
            if name == "x":
                f.create_dataset(key, data=data, compression=compression if chunks is not None else None, **kw)
            else:
                f.create_dataset(key, data=data, chunks=(min(n, 1024), 1, 1, 1) if chunks is not None else None,
                                 maxshape=(None, 1, 1, 1) if chunks is not None else None,
                                 compression=compression if chunks is not None else None)
        if gz:
            with open(path, "rb") as src, gzip.open(str(path) + ".gz", "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst)
            path.unlink()
    if meta:
        with open(root / f"{PREFIX}{split}_meta.csv", "w", newline="") as f:
            f.write(",coord_y,coord_x,tumor_patch,center_tumor_patch,wsi\n")
            for i in range(n):
                f.write(f"{i},{coords[i, 0]},{coords[i, 1]},{bool(tumor[i])},{bool(y[i])},{slides[i]}\n")
    return {"x": x, "y": y, "slides": slides, "coords": coords, "tumor": tumor}
