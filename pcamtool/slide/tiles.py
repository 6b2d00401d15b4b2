"""The grid of tiles over a slide's tissue, and the blocks they are read in.

Tiles are 96x96 at the model's scale, their top-left corners on a grid of
``stride`` model pixels from the slide's origin. A tile is kept when at least
``min_tissue`` of its area is tissue on the thumbnail mask (an integral image
makes that one lookup per tile). With ``stride`` 32 the decisive central
32x32 squares of neighbouring tiles abut, so the heatmap has no gaps.

Example::

    grid = tile_grid(tissue, geo, stride=96)
    for idx in blocks(grid, stride=96):
        read_tiles(slide, geo, grid.xy[idx])
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .reader import TILE, Geometry
from .tissue import Tissue

DEFAULT_STRIDE = TILE
MIN_TISSUE = 0.25         # fraction of a tile's area that must be tissue
BLOCK_PX = 1024           # a read covers about this many model pixels across: few calls, modest memory


@dataclass(frozen=True)
class TileGrid:
    """Tissue tiles: their grid cells and top-left corners in model pixels, and the grid's shape."""

    rows: np.ndarray          # int64 (n,)
    cols: np.ndarray          # int64 (n,)
    stride: int
    shape: tuple[int, int]    # (rows, cols) of the whole grid

    @property
    def xy(self) -> np.ndarray:
        """int64 (n, 2): top-left corners (x, y) in model pixels."""
        return np.stack([self.cols, self.rows], 1) * self.stride

    def level0(self, geo: Geometry) -> np.ndarray:
        """int64 (n, 2): top-left corners at level 0 (what tiles.csv records)."""
        return np.round(self.xy * geo.f0).astype(np.int64)

    def __len__(self) -> int:
        return len(self.rows)


def tile_grid(tissue: Tissue, geo: Geometry, stride: int = DEFAULT_STRIDE,
              min_tissue: float = MIN_TISSUE) -> TileGrid:
    """Every tile inside the slide with at least ``min_tissue`` of it on tissue, in row-major order."""
    mw, mh = geo.model_size
    n_cols = max(0, (mw - TILE) // stride + 1)
    n_rows = max(0, (mh - TILE) // stride + 1)
    if n_cols == 0 or n_rows == 0 or not tissue.mask.any():
        return TileGrid(np.zeros(0, np.int64), np.zeros(0, np.int64), stride, (n_rows, n_cols))
    integral = np.zeros((tissue.mask.shape[0] + 1, tissue.mask.shape[1] + 1), np.int64)
    integral[1:, 1:] = tissue.mask.cumsum(0).cumsum(1)
    # Each tile's footprint on the thumbnail, in whole thumbnail pixels (at least one).
    sx, sy = geo.f0 / tissue.px_x, geo.f0 / tissue.px_y        # thumbnail pixels per model pixel
    c = np.arange(n_cols)
    r = np.arange(n_rows)
    x0 = np.clip(np.floor(c * stride * sx), 0, tissue.mask.shape[1] - 1).astype(np.int64)
    x1 = np.clip(np.ceil((c * stride + TILE) * sx), x0 + 1, tissue.mask.shape[1]).astype(np.int64)
    y0 = np.clip(np.floor(r * stride * sy), 0, tissue.mask.shape[0] - 1).astype(np.int64)
    y1 = np.clip(np.ceil((r * stride + TILE) * sy), y0 + 1, tissue.mask.shape[0]).astype(np.int64)
    inside = (integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0])
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    rows, cols = np.nonzero(inside >= min_tissue * area)
    return TileGrid(rows.astype(np.int64), cols.astype(np.int64), stride, (n_rows, n_cols))


def blocks(grid: TileGrid, block_px: int = BLOCK_PX) -> list[np.ndarray]:
    """Tile indices grouped into square blocks of about ``block_px`` model pixels, row-major.

    Tiles of one block are read with one OpenSlide call; tiles far apart
    never share one, so no read covers much glass.
    """
    if len(grid) == 0:
        return []
    per = max(1, block_px // grid.stride)
    key = (grid.rows // per) * (grid.shape[1] // per + 1) + grid.cols // per
    order = np.argsort(key, kind="stable")
    cuts = np.flatnonzero(np.diff(key[order])) + 1
    return np.split(order, cuts)
