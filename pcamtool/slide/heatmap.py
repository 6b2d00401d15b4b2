"""A slide's outputs: ``tiles.csv``, ``heatmap.tif`` (the probability map), ``heatmap.png``.

The map has one pixel per grid cell of the tiles (``stride`` model pixels),
row 0 at the top of the slide as in every image: pixel (r, c) is the
probability of the tile whose top-left corner is ``(c, r) * stride``, drawn
over the part of the slide that tile's centre stands for (the stride-sized
square around it). Where no tile was run (glass, unreadable) it is NaN.
``heatmap.tif`` is float32 with resolution tags (pixels per centimetre) and a
JSON description giving the level-0 origin and pixel size, so QuPath,
ImageJ or tifffile can lay it over the slide.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .reader import MODEL_MPP, TILE, Geometry
from .tiles import TileGrid
from .tissue import Tissue


def probability_map(grid: TileGrid, probs: np.ndarray) -> np.ndarray:
    """float32 (rows, cols) of the grid: the tiles' probabilities, NaN where none (or NaN) was run."""
    out = np.full(grid.shape, np.nan, np.float32)
    out[grid.rows, grid.cols] = probs
    return out


def map_extent(grid: TileGrid, geo: Geometry) -> tuple[float, float, float]:
    """Level-0 (x, y) of the map's top-left corner (the same on both axes) and its pixel size."""
    origin = (TILE - grid.stride) / 2 * geo.f0
    return origin, origin, grid.stride * geo.f0


def write_tiles_csv(path: Path, grid: TileGrid, geo: Geometry, probs: np.ndarray) -> None:
    """``x,y,probability``: level-0 top-left corners of the tiles that were run."""
    xy = grid.level0(geo)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "y", "probability"])
        for (x, y), p in zip(xy, probs):
            if np.isfinite(p):
                w.writerow([int(x), int(y), f"{p:.6f}"])


def write_heatmap_tif(path: Path, pmap: np.ndarray, grid: TileGrid, geo: Geometry) -> None:
    import tifffile

    ox, oy, px = map_extent(grid, geo)
    um = px * geo.mpp
    desc = {"pcamtool": "tumour probability map", "level0_origin": [ox, oy], "level0_pixel": px,
            "microns_per_pixel": um, "stride_model_px": grid.stride, "model_mpp": MODEL_MPP,
            "nan": "no tile run here (no tissue, or unreadable)"}
    tifffile.imwrite(path, pmap, photometric="minisblack", resolution=(1e4 / um, 1e4 / um),
                     resolutionunit="CENTIMETER", description=json.dumps(desc), metadata=None)


def write_heatmap_png(path: Path, pmap: np.ndarray, grid: TileGrid, geo: Geometry, tissue: Tissue,
                      title: str) -> None:
    """The map over the thumbnail, in millimetres from the slide's top-left corner, with a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mm = geo.mpp / 1000
    w_mm, h_mm = geo.width * mm, geo.height * mm
    ox, oy, px = map_extent(grid, geo)
    h, w = pmap.shape
    aspect = h_mm / max(w_mm, 1e-9)
    fig, ax = plt.subplots(figsize=(8, max(2.5, min(12, 7 * aspect + 1))), dpi=100)
    try:
        ax.imshow(tissue.thumbnail, extent=(0, w_mm, h_mm, 0), interpolation="bilinear")
        if h and w:
            shown = np.ma.masked_invalid(pmap)
            im = ax.imshow(shown, extent=(ox * mm, (ox + w * px) * mm, (oy + h * px) * mm, oy * mm),
                           cmap="inferno", vmin=0.0, vmax=1.0, alpha=0.6, interpolation="nearest")
        else:
            from matplotlib.cm import ScalarMappable
            from matplotlib.colors import Normalize

            im = ScalarMappable(Normalize(0, 1), cmap="inferno")
        ax.set_xlim(0, w_mm)
        ax.set_ylim(h_mm, 0)
        ax.set_xlabel("mm")
        ax.set_ylabel("mm")
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="tumour probability")
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
