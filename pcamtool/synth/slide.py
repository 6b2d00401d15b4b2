"""Synthetic whole-slide images: a pyramidal tiled TIFF that OpenSlide opens, with its answer key.

The slide is a mosaic of cells, one 96x96 patch at PCam's scale (10x,
:data:`PCAM_MPP`) each, painted by the same kernel as the synthetic patch
data set (:func:`pcamtool.synth.render.render_batch`), so a model trained on
``pcamtool synth`` / ``pcamtool demo`` data recognises its tumour. Each cell
is glass, tissue (a negative patch) or tumour (a positive patch): tissue is a
few overlapping ellipses, tumour a few discs inside it, both given in
fractions of the slide so tests can place them ("tumour top-left").

Level 0 is the mosaic upsampled to the asked ``mpp`` (0.243 for 40x,
0.486 for 20x, 0.972 for 10x); each further level halves the one before,
down to a few hundred pixels. Levels are separate TIFF pages with
``SubfileType`` 1 (reduced image), tiled, JPEG or deflate compressed, with
``XResolution``/``YResolution`` in pixels per centimetre: the layout
OpenSlide's generic-tiff reader takes as a pyramid and reads the mpp from
(OpenSlide 4 ignores pyramids stored in SubIFDs). Beside ``NAME.tif`` go
``NAME.mask.png`` (one pixel per cell: 0 glass, 128 tissue, 255 tumour) and
``NAME.json`` (the cell size at level 0 and everything needed to read the mask).

Example::

    write_slide("slides/a.tif", cells=(32, 24), mpp=0.243, tumours=[(0.25, 0.3, 0.12)])
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import PcamError
from ..io.fsutil import atomic_path, check_writable
from . import schema
from .plan import TRAIN_CENTRES, _draw_slide, noise_tiles, seed64
from .render import render_batch

from ..slide.reader import MODEL_MPP as PCAM_MPP   # the scale the patches are painted at

SLIDE_CODE = 3            # patch seeds of slides differ from the train (1) and test (2) splits'
SIZE = schema.SIZE
GLASS, TISSUE, TUMOUR = 0, 128, 255   # values of the mask PNG

# Default layout: two lobes of tissue, one tumour top-left (fractions of width/height).
DEFAULT_TISSUE = ((0.35, 0.4, 0.3, 0.33), (0.66, 0.62, 0.3, 0.34))   # (cx, cy, rx, ry)
DEFAULT_TUMOURS = ((0.28, 0.3, 0.12),)                                 # (cx, cy, r), r in widths


@dataclass
class SyntheticSlide:
    """What :func:`write_slide` wrote, and the answer key (``cells``: the mask at one value per cell)."""

    path: Path
    mask_path: Path
    meta_path: Path
    cells: np.ndarray            # uint8 (rows, cols): GLASS, TISSUE or TUMOUR
    cell_px: float               # a cell's side at level 0, in pixels
    mpp: Optional[float]         # level-0 microns per pixel written in the tags (None: none written)
    level_dimensions: list[tuple[int, int]] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("cells")
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def cell_map(cols: int, rows: int, tissue: Sequence[Sequence[float]] = DEFAULT_TISSUE,
             tumours: Sequence[Sequence[float]] = DEFAULT_TUMOURS) -> np.ndarray:
    """The cells' classes (rows, cols): ellipses of tissue, discs of tumour inside them.

    Cell centres are tested, in fractions of the width (x, and the radius of
    a tumour) and height (y). Tumour outside tissue stays glass.
    """
    x = (np.arange(cols) + 0.5) / cols
    y = (np.arange(rows) + 0.5) / rows
    yy, xx = np.meshgrid(y, x, indexing="ij")
    out = np.full((rows, cols), GLASS, np.uint8)
    for cx, cy, rx, ry in tissue:
        out[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0] = TISSUE
    aspect = cols / rows
    for cx, cy, r in tumours:
        inside = (xx - cx) ** 2 + ((yy - cy) / aspect) ** 2 <= r * r
        out[inside & (out == TISSUE)] = TUMOUR
    return out


def paint_cells(cells: np.ndarray, seed: int = 0, centre: int = 0) -> Iterator[np.ndarray]:
    """Paint the mosaic one row of cells at a time: yields uint8 (96, cols*96, 3) strips.

    One slide style (stain, optics, tumour phenotype) for the whole slide, as
    on a real slide; each cell is its own patch of that style.
    """
    rng = np.random.default_rng([seed64(seed), SLIDE_CODE])
    style = _draw_slide(rng, TRAIN_CENTRES[centre % len(TRAIN_CENTRES)])[None, :]
    s64 = seed64(seed)
    raw, tex, noise = noise_tiles(s64)
    rows, cols = cells.shape
    white = np.clip(style[0, schema.S_WHITE:schema.S_WHITE + 3] * 255, 0, 255)
    for r in range(rows):
        strip = np.empty((SIZE, cols * SIZE, 3), np.uint8)
        glass = rng.normal(white, 1.5, (SIZE, cols * SIZE, 3))
        strip[:] = np.clip(glass, 0, 255).astype(np.uint8)
        todo = np.flatnonzero(cells[r] != GLASS)
        if len(todo):
            targets = np.where(cells[r, todo] == TUMOUR, schema.T_POS, schema.T_NEG).astype(np.int64)
            out = np.empty((len(todo), SIZE, SIZE, 3), np.uint8)
            tmask = np.empty((len(todo), SIZE, SIZE), np.bool_)
            index = (r * cols + todo).astype(np.int64)
            render_batch(style, np.zeros(len(todo), np.int64), targets, index, s64 & 0xFFFFFFFF, s64 >> 32,
                         SLIDE_CODE, raw, tex, noise, out, tmask, np.zeros((0, schema.MAX_CELLS, schema.N_CELL)),
                         np.zeros(0, np.int64))
            for k, c in enumerate(todo):
                strip[:, c * SIZE:(c + 1) * SIZE] = out[k]
        yield strip


def _halve(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    return img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3), dtype=np.float32).round().astype(np.uint8)


def _upsample(strip: np.ndarray, up: float) -> np.ndarray:
    if up == 1:
        return strip
    if abs(up - round(up)) < 1e-6:  # nearest by repetition: exact, and what a blur-free scan of the mosaic looks like
        k = int(round(up))
        return np.repeat(np.repeat(strip, k, 0), k, 1)
    from PIL import Image

    h, w = strip.shape[:2]
    return np.asarray(Image.fromarray(strip).resize((round(w * up), round(h * up)), Image.BILINEAR))


def write_pyramid(path: str | os.PathLike, level0: np.ndarray, mpp: Optional[float], compression: str = "jpeg",
                  min_level_px: int = 256, tile: int = 256, force: bool = False) -> list[tuple[int, int]]:
    """Write uint8 RGB ``level0`` and its halvings as a tiled pyramidal TIFF OpenSlide reads; their (w, h).

    ``mpp`` None writes no resolution tags.
    """
    import tifffile

    if compression not in ("jpeg", "deflate"):
        raise PcamError(f"compression must be jpeg or deflate, not {compression!r}")
    levels = [level0]
    while min(levels[-1].shape[:2]) // 2 >= min_level_px:
        levels.append(_halve(levels[-1]))
    args = dict(tile=(tile, tile), photometric="rgb", compression=compression,
                compressionargs={"level": 90} if compression == "jpeg" else None)
    with atomic_path(path, force) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=level0.nbytes > 2**31) as tw:
            for i, img in enumerate(levels):
                down = level0.shape[1] / img.shape[1]
                res = {} if not mpp else dict(resolution=(1e4 / (mpp * down),) * 2, resolutionunit="CENTIMETER")
                tw.write(img, subfiletype=1 if i else 0, metadata=None, **res, **args)
    return [(int(lv.shape[1]), int(lv.shape[0])) for lv in levels]


def write_slide(path: str | os.PathLike, cells: tuple[int, int] = (32, 24), mpp: Optional[float] = PCAM_MPP / 4,
                tissue: Sequence[Sequence[float]] = DEFAULT_TISSUE,
                tumours: Sequence[Sequence[float]] = DEFAULT_TUMOURS, seed: int = 0,
                compression: str = "jpeg", min_level_px: int = 256, tile: int = 256,
                force: bool = False) -> SyntheticSlide:
    """Paint a pyramidal TIFF slide of ``cells`` = (cols, rows) patches, with its mask and JSON beside it.

    Parameters
    ----------
    mpp
        Level-0 microns per pixel written in the resolution tags; the mosaic
        (painted at :data:`PCAM_MPP`) is upsampled to it. None writes no
        resolution (a slide OpenSlide reports no mpp for), at PCam's scale.
    tissue, tumours
        ``(cx, cy, rx, ry)`` ellipses and ``(cx, cy, r)`` discs in fractions
        (x and r of the width, y of the height); no tissue gives bare glass.
    compression
        ``jpeg`` (quality 90, as scanners write) or ``deflate``.

    Raises
    ------
    ExistsError
        The slide exists and ``force`` is false.
    """
    if compression not in ("jpeg", "deflate"):
        raise PcamError(f"compression must be jpeg or deflate, not {compression!r}")
    cols, rows = cells
    if cols < 1 or rows < 1:
        raise PcamError(f"a slide needs at least one cell, not {cols}x{rows}")
    path = Path(path)
    mask_path, meta_path = path.with_suffix(".mask.png"), path.with_suffix(".json")
    for p in (path, mask_path, meta_path):
        check_writable(p, force)
    grid = cell_map(cols, rows, tissue, tumours)
    up = PCAM_MPP / mpp if mpp else 1.0
    # Level 0 is built in memory from the painted strips; levels below are halvings of it.
    level0 = np.concatenate([_upsample(s, up) for s in paint_cells(grid, seed)], 0)
    dims = write_pyramid(path, level0, mpp, compression, min_level_px, tile, force)
    from PIL import Image

    with atomic_path(mask_path, force) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    out = SyntheticSlide(path, mask_path, meta_path, grid, SIZE * up, mpp, dims)
    with atomic_path(meta_path, force) as tmp:
        meta = {**out.to_json(), "cols": cols, "rows": rows, "tissue": [list(t) for t in tissue],
                "tumours": [list(t) for t in tumours], "seed": seed, "pcam_mpp": PCAM_MPP,
                "mask_values": {"glass": GLASS, "tissue": TISSUE, "tumour": TUMOUR}}
        tmp.write_text(json.dumps(meta, indent=1))
    return out


def read_answer_key(slide: str | os.PathLike) -> tuple[np.ndarray, float]:
    """The cell mask and a cell's side at level 0 written beside ``slide`` by :func:`write_slide`."""
    from PIL import Image

    p = Path(slide)
    meta = json.loads(p.with_suffix(".json").read_text())
    return np.asarray(Image.open(p.with_suffix(".mask.png"))), float(meta["cell_px"])


def label_at(cells: np.ndarray, cell_px: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The mask value at level-0 points ``(x, y)`` (GLASS beyond the mosaic)."""
    c = np.floor(np.asarray(x) / cell_px).astype(int)
    r = np.floor(np.asarray(y) / cell_px).astype(int)
    ok = (c >= 0) & (r >= 0) & (c < cells.shape[1]) & (r < cells.shape[0])
    out = np.full(c.shape, GLASS, np.uint8)
    out[ok] = cells[r[ok], c[ok]]
    return out



def write_repeated_slide(path: str | os.PathLike, n_tiles: int, mpp: float = PCAM_MPP, seed: int = 0,
                         force: bool = False) -> Path:
    """A 10x JPEG slide whose round tissue holds about ``n_tiles`` 96x96 tiles, for timing.

    One 24x24-cell block is painted and repeated (painting 100,000 patches
    would take longer than what is timed); the cells outside a disc are glass.
    """
    side = max(2, math.ceil(math.sqrt(n_tiles / (math.pi / 4))))
    block = np.concatenate(list(paint_cells(cell_map(24, 24, tissue=((0.5, 0.5, 2.0, 2.0),), tumours=()), seed)), 0)
    reps = math.ceil(side / 24)
    level0 = np.tile(block, (reps, reps, 1))[: side * SIZE, : side * SIZE]
    yy, xx = np.mgrid[0:side, 0:side]
    for r, c in zip(*np.nonzero(((xx + 0.5) / side - 0.5) ** 2 + ((yy + 0.5) / side - 0.5) ** 2 > 0.25)):
        level0[r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE] = 245
    up = PCAM_MPP / mpp
    write_pyramid(path, _upsample(level0, up) if up != 1 else level0, mpp, "jpeg", force=force)
    return Path(path)
