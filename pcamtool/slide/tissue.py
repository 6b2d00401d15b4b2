"""Finding tissue on a slide's thumbnail: Otsu on saturation, holes filled, specks removed.

Glass is bright and grey, stained tissue is coloured, so the saturation of
HSV separates them whatever the stain's hue; Otsu picks the cut per slide
(staining differs between slides), with a floor (:data:`MIN_SATURATION`) so
that a slide of bare glass, whose saturation is all noise, finds no tissue
instead of half its glass. Holes (fat, lumina, tears inside tissue) are
filled and components smaller than a tile removed, as the CAMELYON
pipelines do.

Example::

    thumb, mpp_t = slide_thumbnail(slide, geo)
    mask = tissue_mask(thumb, mpp_t)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .reader import MODEL_MPP, TILE, Geometry

THUMB_MPP = 8.0           # microns per thumbnail pixel: a tile is ~12 pixels there
MIN_SATURATION = 0.08     # glass under any white balance stays below; H&E tissue is 0.2-0.7
MIN_SPECK_UM2 = (TILE * MODEL_MPP) ** 2   # specks smaller than one tile are dust or debris


@dataclass(frozen=True)
class Tissue:
    """A slide's tissue mask on its thumbnail, and what a thumbnail pixel is at level 0."""

    thumbnail: np.ndarray     # uint8 (h, w, 3)
    mask: np.ndarray          # bool (h, w)
    px_x: float               # level-0 pixels per thumbnail pixel, across
    px_y: float               # and down (thumbnails are rounded to whole pixels)
    threshold: float          # the saturation cut used

    def area_mm2(self, mpp0: float) -> float:
        return float(self.mask.sum() * self.px_x * self.px_y * mpp0 * mpp0 / 1e6)


def slide_thumbnail(slide: Any, geo: Geometry, mpp: float = THUMB_MPP) -> tuple[np.ndarray, float, float]:
    """An RGB thumbnail at about ``mpp`` microns per pixel, and its level-0 pixels per pixel (x, y)."""
    from .reader import rgba_to_rgb

    size = (max(1, round(geo.width * geo.mpp / mpp)), max(1, round(geo.height * geo.mpp / mpp)))
    thumb = slide.get_thumbnail(size)
    rgb = np.asarray(thumb.convert("RGBA"))
    rgb = rgba_to_rgb(rgb)
    return rgb, geo.width / rgb.shape[1], geo.height / rgb.shape[0]


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] ((max - min) / max; 0 where black)."""
    rgb = rgb.astype(np.float32)
    hi, lo = rgb.max(-1), rgb.min(-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1), 0.0).astype(np.float32)


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1]: the cut maximizing the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(rgb: np.ndarray, mpp: float, min_speck_um2: float = MIN_SPECK_UM2) -> tuple[np.ndarray, float]:
    """Tissue (True) on a thumbnail of ``mpp`` microns per pixel, and the saturation threshold used."""
    from scipy import ndimage

    sat = saturation(rgb)
    cut = max(otsu(sat), MIN_SATURATION)
    mask = ndimage.binary_fill_holes(sat > cut)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes * mpp * mpp >= min_speck_um2
        keep[0] = False
        mask = keep[labels]
    return mask.astype(bool), cut


def find_tissue(slide: Any, geo: Geometry, mpp: float = THUMB_MPP) -> Tissue:
    """Thumbnail and tissue mask of an open slide."""
    thumb, px_x, px_y = slide_thumbnail(slide, geo, mpp)
    mask, cut = tissue_mask(thumb, geo.mpp * (px_x + px_y) / 2)
    return Tissue(thumb, mask, px_x, px_y, cut)
