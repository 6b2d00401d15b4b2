"""Reading whole-slide images with OpenSlide at the model's scale (10x, ~0.97 um per pixel).

OpenSlide (``pip install 'pcamtool[slides]'``) is imported here and nowhere
else, when a slide is first opened. A slide's microns per pixel come from its
properties (``openslide.mpp-x``/``-y``) or from ``--mpp``; :func:`choose_level`
picks the pyramid level to read, and :class:`Geometry` says how a 96x96 tile
at the model's scale maps onto it (read as is when the level matches within
:data:`MATCH_TOLERANCE`, else read larger or smaller and resampled).

Example::

    slide = open_slide("a.svs")
    geo = slide_geometry(slide, "a.svs")
    tiles = read_tiles(slide, geo, [(0, 0), (96, 0)])   # uint8 (2, 96, 96, 3)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import MissingExtraError, PcamError

MODEL_MPP = 0.972         # PCam: CAMELYON's 40x scans (0.243 um/px) downsampled 4x
TILE = 96                 # the model's input side, in pixels at MODEL_MPP
MATCH_TOLERANCE = 0.02    # a level within 2 % of MODEL_MPP is read as is (no resampling)
UPSAMPLE_LIMIT = 1.1      # prefer a finer level to shrink over a coarser one to enlarge by more than this
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                  ".dcm")
INSTALL_HINT = "reading whole slides needs OpenSlide: pip install 'pcamtool[slides]'"


class SlideError(PcamError):
    """A slide cannot be opened, has no mpp, or cannot be read."""


def openslide_module() -> Any:
    """The ``openslide`` module, or one line naming the extra to install."""
    try:
        import openslide
    except ImportError:
        raise MissingExtraError(INSTALL_HINT) from None
    return openslide


def open_slide(path: str | os.PathLike) -> Any:
    """An ``openslide.OpenSlide`` for ``path``; one-line :class:`SlideError` if OpenSlide cannot open it."""
    openslide = openslide_module()
    p = Path(path)
    if not p.exists():
        raise SlideError(f"{p}: slide not found")
    if p.is_dir():
        raise SlideError(f"{p}: is a folder, not a slide")
    try:
        return openslide.OpenSlide(str(p))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"{p}: OpenSlide cannot open it (not a slide format it knows)") from None
    except (openslide.OpenSlideError, OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SlideError(f"{p}: OpenSlide cannot open it ({msg})") from None


def slide_mpp(slide: Any, path: str | os.PathLike, override: Optional[float] = None) -> float:
    """Level-0 microns per pixel: ``override`` (``--mpp``) if given, else the slide's own.

    Raises
    ------
    SlideError
        Neither is known, or the slide's value is not a positive number.
    """
    if override is not None:
        if not (math.isfinite(override) and override > 0):
            raise SlideError(f"--mpp {override}: must be a positive number of microns per pixel")
        return float(override)
    props = slide.properties
    vals = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        raw = props.get(key)
        if raw is None:
            raise SlideError(f"{path}: the slide does not record its microns per pixel; give --mpp")
        try:
            vals.append(float(raw))
        except ValueError:
            raise SlideError(f"{path}: {key} is {raw!r}, not a number; give --mpp") from None
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise SlideError(f"{path}: microns per pixel {vals[0]} x {vals[1]} are not positive; give --mpp")
    return float(np.mean(vals))   # square pixels in every format we know; a mean hides rounding of the tags


def choose_level(level_mpps: Sequence[float], target: float = MODEL_MPP) -> int:
    """The pyramid level to read tiles from: the coarsest one not coarser than ``target`` (within 10 %).

    Shrinking a finer level loses nothing, enlarging a coarser one invents
    pixels; so a level slightly coarser than ``target`` (up to
    :data:`UPSAMPLE_LIMIT`) still counts, a much coarser one only when
    nothing finer exists.
    """
    ok = [i for i, m in enumerate(level_mpps) if m <= target * UPSAMPLE_LIMIT]
    if not ok:
        return int(np.argmin(level_mpps))
    return max(ok, key=lambda i: level_mpps[i])


@dataclass(frozen=True)
class Geometry:
    """How the model's pixels map onto a slide.

    ``f0``: level-0 pixels per model pixel. ``scale``: pixels of the read
    level per model pixel (1.0 when no resampling is needed).
    """

    mpp: float                 # level 0
    width: int                 # level 0
    height: int
    level: int
    level_mpp: float
    downsample: float          # of the read level
    scale: float
    resample: bool

    @property
    def f0(self) -> float:
        return MODEL_MPP / self.mpp

    @property
    def model_size(self) -> tuple[int, int]:
        """The slide's size in model pixels (width, height)."""
        return int(self.width / self.f0), int(self.height / self.f0)


def slide_geometry(slide: Any, path: str | os.PathLike, mpp: Optional[float] = None) -> Geometry:
    """The level to read and how to scale it, from the slide's mpp (or ``mpp``) and its pyramid."""
    mpp0 = slide_mpp(slide, path, mpp)
    downs = [float(d) for d in slide.level_downsamples]
    level = choose_level([mpp0 * d for d in downs])
    level_mpp = mpp0 * downs[level]
    scale = MODEL_MPP / level_mpp
    resample = abs(scale - 1.0) > MATCH_TOLERANCE
    w, h = slide.dimensions
    return Geometry(mpp0, int(w), int(h), level, level_mpp, downs[level], scale if resample else 1.0, resample)


def rgba_to_rgb(region: Any) -> np.ndarray:
    """uint8 RGB from OpenSlide's RGBA region; transparent pixels (outside the scan) become white glass."""
    a = np.asarray(region)
    rgb = a[..., :3].copy()
    rgb[a[..., 3] == 0] = 255
    return rgb


def read_model_region(slide: Any, geo: Geometry, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The ``w`` x ``h`` model-pixel region at model coordinates ``(x, y)``, as uint8 (h, w, 3).

    Read from ``geo.level`` and resampled (area-averaged when shrinking,
    bilinear when enlarging) when that level is not at the model's scale.
    """
    loc = (int(round(x * geo.f0)), int(round(y * geo.f0)))
    if not geo.resample:
        return rgba_to_rgb(slide.read_region(loc, geo.level, (w, h)))
    from PIL import Image

    size = (max(1, int(round(w * geo.scale))), max(1, int(round(h * geo.scale))))
    region = slide.read_region(loc, geo.level, size).convert("RGBA")
    rgb = Image.fromarray(rgba_to_rgb(region))
    method = Image.BOX if geo.scale > 1 else Image.BILINEAR
    return np.asarray(rgb.resize((w, h), method))


def read_tiles(slide: Any, geo: Geometry, xy: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """The 96x96 tiles whose top-left corners are ``xy`` (model pixels): uint8 (n, 96, 96, 3).

    The bounding box of all of them is read once and cut, so pass tiles that
    lie close together (:func:`pcamtool.slide.tiles.blocks` groups them).
    """
    xy = np.asarray(xy, np.int64).reshape(-1, 2)
    x0, y0 = xy.min(0)
    x1, y1 = xy.max(0) + TILE
    region = read_model_region(slide, geo, int(x0), int(y0), int(x1 - x0), int(y1 - y0))
    out = np.empty((len(xy), TILE, TILE, 3), np.uint8)
    for k, (x, y) in enumerate(xy - (x0, y0)):
        out[k] = region[y:y + TILE, x:x + TILE]
    return out
