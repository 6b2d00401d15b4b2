"""Batched augmentation on the device, and the dihedral transforms shared with TTA.

A PCam label does not depend on orientation (tissue has no "up") nor on the
exact stain of the lab that cut it, so training sees random elements of the
dihedral group D4 (the 8 flips/90-degree rotations), colour jitter, a small
shift and HED stain jitter. Everything here is a tensor operation over the
whole batch on whatever device the batch lives on: the same code runs on the
CPU and on a GPU, with no per-sample Python loop, and draws its random
numbers only from the ``torch.Generator`` it is given, so a seeded generator
gives the same batch every time.

Dihedral numbering (shared by :func:`dihedral`, :func:`dihedral_np`, the
per-sample :func:`dihedral_batch` and :func:`tta_transforms`)::

    k = r + 4 * f:  flip the width axis if f == 1, then rotate by r * 90 degrees
                    (np.rot90 / torch.rot90 direction, from the first axis
                    towards the second)

so ``k`` in 0..3 are the rotations and 4..7 the reflections;
``dihedral(dihedral(x, k), dihedral_inverse(k)) == x``.

Example::

    cfg = AugmentConfig()                       # the defaults chosen on real tissue
    gen = torch.Generator().manual_seed(0)
    x01 = augment_batch(to_float01(batch_uint8), cfg, gen)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import PcamError

# --------------------------------------------------------------------- dihedral

TTA_CHOICES = (1, 2, 4, 8)
# Each k as (transpose, flip first spatial axis, flip second spatial axis),
# applied in that order: the form used for per-sample transforms in one pass.
_T = (0, 1, 0, 1, 0, 1, 0, 1)
_FH = (0, 1, 1, 0, 0, 0, 1, 1)
_FW = (0, 0, 1, 1, 1, 0, 0, 1)


def _check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or not 0 <= int(k) <= 7:
        raise PcamError(f"dihedral transform must be an integer in 0..7, got {k!r}")
    return int(k)


def dihedral(x: Tensor, k: int, dims: tuple[int, int] = (-2, -1)) -> Tensor:
    """Element ``k`` (0..7) of the dihedral group applied to the square axes ``dims``.

    ``dims=(-2, -1)`` for NCHW floats, ``dims=(1, 2)`` for NHWC uint8 batches.
    """
    k = _check_k(k)
    if k >= 4:
        x = torch.flip(x, (dims[1],))
    return torch.rot90(x, k % 4, dims) if k % 4 else x


def dihedral_np(x: np.ndarray, k: int, axes: tuple[int, int] = (1, 2)) -> np.ndarray:
    """NumPy twin of :func:`dihedral` (a view; default axes for NHWC batches)."""
    k = _check_k(k)
    if k >= 4:
        x = np.flip(x, axes[1])
    return np.rot90(x, k % 4, axes) if k % 4 else x


def dihedral_inverse(k: int) -> int:
    """The ``j`` with ``dihedral(dihedral(x, k), j) == x``: reflections are their own inverse."""
    k = _check_k(k)
    return k if k >= 4 else (4 - k) % 4


def dihedral_batch(x: Tensor, ks: Tensor) -> Tensor:
    """Image ``i`` of an NCHW batch transformed by ``dihedral(., ks[i])``, in one gather."""
    return _remap(x, ks, None, 0)


def tta_transforms(n: int) -> list[int]:
    """The dihedral ``k`` averaged by TTA x``n``: always a subgroup, so the average is invariant to it.

    1: identity; 2: + horizontal flip; 4: the flips and the half turn
    ({0, 2, 4, 6}); 8: the whole group.
    """
    table = {1: [0], 2: [0, 4], 4: [0, 2, 4, 6], 8: list(range(8))}
    if n not in table:
        raise PcamError(f"--tta must be one of {', '.join(map(str, TTA_CHOICES))}, got {n}")
    return table[n]


def tta_batch(x: Tensor, n: int, dims: tuple[int, int] = (1, 2)) -> Tensor:
    """The ``n`` TTA copies of a batch concatenated ``k``-major: ``(n * B, ...)``.

    Average predictions with ``p.reshape(n, B).mean(0)``. Default ``dims``
    are those of NHWC uint8 batches.
    """
    return torch.cat([dihedral(x, k, dims) for k in tta_transforms(n)])


def tta_batch_np(x: np.ndarray, n: int, axes: tuple[int, int] = (1, 2)) -> np.ndarray:
    """NumPy twin of :func:`tta_batch` (for onnxruntime inputs)."""
    return np.concatenate([dihedral_np(x, k, axes) for k in tta_transforms(n)])


def dihedral_all(x: Tensor, dims: tuple[int, int] = (1, 2)) -> Tensor:
    """All 8 transforms of a batch, ``(8 * B, ...)`` in order ``k = 0..7``."""
    return tta_batch(x, 8, dims)


# ----------------------------------------------------------------------- config


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations training applies, and how strongly (defaults chosen on real tissue).

    Each augmentation has a switch and a strength; strengths are the half
    widths of uniform distributions, drawn independently per image.

    Attributes
    ----------
    flip
        Random element of D4 (flips and 90-degree rotations) per image.
    shift, shift_px
        Random translation by up to ``shift_px`` pixels on each axis, with
        reflected borders. Small, so the central 32x32 that decides the label
        stays in the centre.
    color, brightness, contrast, saturation, hue
        Colour jitter: brightness and contrast and saturation factors in
        ``1 +- strength``; hue rotation by ``+- hue`` turns about the grey axis.
    hed, hed_sigma, hed_bias
        Stain jitter in HED optical density (Tellez et al. 2019): each of the
        haematoxylin, eosin and DAB channels becomes ``alpha * c + beta`` with
        ``alpha ~ U(1 - hed_sigma, 1 + hed_sigma)`` and
        ``beta ~ U(-hed_bias, hed_bias)`` (in scikit-image ``rgb2hed`` units).
    """

    flip: bool = True
    shift: bool = False
    shift_px: int = 4
    color: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    hed: bool = False
    hed_sigma: float = 0.05
    hed_bias: float = 0.01

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(v, (bool, np.bool_)):
                    raise PcamError(f"augment.{f.name} must be true or false, got {v!r}")
            elif not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool) \
                    or not math.isfinite(v) or v < 0:
                raise PcamError(f"augment.{f.name} must be a non-negative number, got {v!r}")
        if self.shift_px != int(self.shift_px) or self.shift_px > 32:
            raise PcamError(f"augment.shift_px must be a whole number of pixels up to 32, got {self.shift_px}")
        for name in ("brightness", "contrast", "saturation", "hed_sigma"):
            if getattr(self, name) >= 1:
                raise PcamError(f"augment.{name} must be below 1 (a factor of 1 +- strength), got {getattr(self, name)}")
        if self.hue > 0.5:
            raise PcamError(f"augment.hue is in turns and must be at most 0.5, got {self.hue}")

    @classmethod
    def off(cls) -> "AugmentConfig":
        """No augmentation at all."""
        return cls(flip=False, shift=False, color=False, hed=False)

    @property
    def enabled(self) -> bool:
        return self.flip or self.shift or self.color or self.hed


# ------------------------------------------------------------------ transforms
#
# All transforms work on the (B, 3, H*W) view of an NCHW batch: the colour and
# stain transforms are one batched 3x3 matrix product each, the geometric ones
# one gather of pixel indices, so each costs about one pass over the batch.
# Measured on one core of the reference CPU, everything together takes ~50 ms
# per batch of 128 (the HED log/exp most of it), against ~400-1200 ms for the
# training step.


def _uniform(gen: torch.Generator, shape: Sequence[int], half_width: float, center: float,
             device: torch.device, dtype: torch.dtype) -> Tensor:
    """U(center - half_width, center + half_width), drawn on the generator's device."""
    u = torch.rand(tuple(shape), generator=gen, device=gen.device)
    return (center + half_width * (2 * u - 1)).to(device=device, dtype=dtype)


@lru_cache(maxsize=8)
def _source_tables(n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For each k, where every output pixel comes from: (8, n*n) int64 rows, columns, flat indices."""
    i = torch.arange(n).view(n, 1).expand(n, n)
    j = torch.arange(n).view(1, n).expand(n, n)
    rows, cols = [], []
    for k in range(8):
        # undo the steps in reverse order: flip axis 1, flip axis 0, transpose
        jj = n - 1 - j if _FW[k] else j
        ii = n - 1 - i if _FH[k] else i
        a, b = (jj, ii) if _T[k] else (ii, jj)
        rows.append(a.reshape(-1))
        cols.append(b.reshape(-1))
    r, c = torch.stack(rows), torch.stack(cols)
    return r.to(device), c.to(device), (r * n + c).to(device)


def _reflect(v: Tensor, n: int) -> Tensor:
    """Index ``v`` reflected into ``0..n-1`` without repeating the edge (``F.pad`` "reflect")."""
    return (n - 1) - ((n - 1) - v.abs()).abs()


def _remap(x: Tensor, ks: Tensor | None, shifts: Tensor | None, max_shift: int) -> Tensor:
    """Per-image dihedral transform ``ks`` after a shift, as a single gather.

    ``shifts`` is ``(2, B)`` in ``0..2*max_shift`` (row and column offsets of
    the crop in the reflect-padded image); ``None`` means no shift, and
    ``ks=None`` no dihedral transform. The index arithmetic is done on
    per-image rows and columns (``B x 96``), not per pixel, and the only
    per-pixel work is two small integer gathers and the gather of the image.
    """
    b, c, h, w = x.shape
    if h != w:
        raise PcamError(f"dihedral transforms need square images, got {tuple(x.shape)}")
    if ks is not None and ks.shape != (b,):
        raise PcamError(f"need one transform per image: {tuple(ks.shape)} for a batch of {b}")
    tab_r, tab_c, tab_flat = _source_tables(h, x.device)
    sel = ks.to(device=x.device, dtype=torch.long) if ks is not None else torch.zeros(b, dtype=torch.long, device=x.device)
    if shifts is None:
        src = tab_flat.index_select(0, sel)                                   # (B, H*W)
    else:
        shifts = shifts.to(device=x.device, dtype=torch.long) - max_shift
        line = torch.arange(h, device=x.device).view(1, h)
        row_of = _reflect(line + shifts[0].view(b, 1), h)                     # (B, H)
        col_of = _reflect(line + shifts[1].view(b, 1), w)
        src = (row_of.gather(1, tab_r.index_select(0, sel)) * w
               + col_of.gather(1, tab_c.index_select(0, sel)))
    src = src.view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(x.reshape(b, c, h * w), 2, src).view(b, c, h, w)


def random_dihedral(x: Tensor, gen: torch.Generator) -> Tensor:
    """A uniformly random element of D4 per image of an NCHW batch."""
    ks = torch.randint(0, 8, (x.shape[0],), generator=gen, device=gen.device)
    return _remap(x, ks, None, 0)


def random_shift(x: Tensor, max_px: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_px`` pixels per axis, borders reflected."""
    if max_px <= 0:
        return x
    off = torch.randint(0, 2 * max_px + 1, (2, x.shape[0]), generator=gen, device=gen.device)
    return _remap(x, None, off, max_px)


# ITU-R BT.601 luma, as torchvision's grayscale
_LUMA = (0.299, 0.587, 0.114)


def color_jitter(x: Tensor, brightness: float, contrast: float, saturation: float, hue: float,
                 gen: torch.Generator) -> Tensor:
    """Brightness, contrast, saturation and hue jitter as one affine colour map per image.

    Saturation, hue and brightness are 3x3 matrices; contrast blends with the
    image's mean luma, which is linear in the image's mean colour, so the
    whole jitter is ``A @ rgb + o`` per image: one batched matrix product.
    Hue is a rotation about the grey axis of RGB space (the CSS
    ``hue-rotate`` construction) instead of a round trip through HSV; it
    keeps grey grey.
    """
    b, c, h, w = x.shape
    dev, dt = x.device, x.dtype
    eye = torch.eye(3, device=dev, dtype=dt).expand(b, 3, 3)
    luma = torch.tensor(_LUMA, device=dev, dtype=dt)
    m = eye
    if saturation > 0:
        s = _uniform(gen, (b, 1, 1), saturation, 1.0, dev, dt)
        m = (s * eye + (1 - s) * luma.view(1, 1, 3)) @ m
    if hue > 0:
        theta = _uniform(gen, (b, 1, 1), hue, 0.0, dev, dt) * (2 * math.pi)
        k = torch.full((3,), 1 / math.sqrt(3), device=dev, dtype=dt)
        kx = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=dev, dtype=dt) / math.sqrt(3)
        rot = torch.cos(theta) * eye + torch.sin(theta) * kx + (1 - torch.cos(theta)) * torch.outer(k, k)
        m = rot @ m
    if brightness > 0:
        m = _uniform(gen, (b, 1, 1), brightness, 1.0, dev, dt) * m
    flat = x.reshape(b, c, h * w)
    out = torch.bmm(m, flat)
    if contrast > 0:
        # (M x - mu) * f + mu with mu = luma . M mean(x): mean luma after the colour matrix
        f = _uniform(gen, (b, 1, 1), contrast, 1.0, dev, dt)
        mu = (luma.view(1, 1, 3) @ m @ flat.mean(2, keepdim=True))          # (B, 1, 1)
        out.mul_(f).add_((1 - f) * mu)
    return out.clamp_(0.0, 1.0).view(b, c, h, w)


# Ruifrok & Johnston's stain vectors, as scikit-image's rgb2hed (rows: H, E, DAB).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_OD_FLOOR = 1e-6                     # scikit-image's floor before the log
_OD_SCALE = -math.log(_OD_FLOOR)     # its unit: stains = ln(rgb) / ln(1e-6) @ hed_from_rgb


def rgb_to_hed(x01: Tensor) -> Tensor:
    """NCHW RGB in ``[0, 1]`` -> HED stain concentrations (scikit-image ``rgb2hed`` units, unclipped)."""
    b, c, h, w = x01.shape
    od = torch.log(x01.clamp_min(_OD_FLOOR)).reshape(b, c, h * w) / -_OD_SCALE
    m = torch.as_tensor(HED_FROM_RGB.T, dtype=x01.dtype, device=x01.device)
    return (m @ od).view(b, 3, h, w)


def hed_to_rgb(hed: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hed` (``hed2rgb``), clipped to ``[0, 1]``."""
    b, c, h, w = hed.shape
    m = torch.as_tensor(RGB_FROM_HED.T, dtype=hed.dtype, device=hed.device)
    return torch.exp((m @ hed.reshape(b, c, h * w)) * -_OD_SCALE).clamp_(0.0, 1.0).view(b, 3, h, w)


def hed_jitter(x: Tensor, sigma: float, bias: float, gen: torch.Generator) -> Tensor:
    """Tellez et al. (2019) HED augmentation: ``alpha * c + beta`` per stain channel and image.

    RGB -> HED, scale and shift, HED -> RGB is linear in optical density, so
    it is done as one 3x3 matrix and offset per image in OD space (one log,
    one batched matrix product, one exp). scikit-image clips negative
    concentrations to 0 in ``rgb2hed``; this does not, so strength 0 is the
    identity (up to rounding) and the map stays smooth.
    """
    b, c, h, w = x.shape
    dev, dt = x.device, x.dtype
    alpha = _uniform(gen, (b, 3), sigma, 1.0, dev, dt)
    beta = _uniform(gen, (b, 3), bias, 0.0, dev, dt)
    h2r = torch.as_tensor(RGB_FROM_HED, dtype=dt, device=dev)
    r2h = torch.as_tensor(HED_FROM_RGB, dtype=dt, device=dev)
    # row vectors: od' = od @ (r2h diag(alpha) h2r) + scale * beta @ h2r, with od = -ln(x);
    # as columns on the (B, 3, H*W) view that is mat^T @ od + off^T
    mat_t = (r2h.unsqueeze(0) @ (alpha.unsqueeze(-1) * h2r.unsqueeze(0))).transpose(1, 2)
    off = (_OD_SCALE * (beta @ h2r)).view(b, 3, 1)
    neg_od = x.clamp_min(_OD_FLOOR).log_().reshape(b, c, h * w)          # = -od
    out = torch.baddbmm(-off, mat_t, neg_od)                              # = -od'
    return out.exp_().clamp_(0.0, 1.0).view(b, c, h, w)


def augment_batch(x01: Tensor, cfg: AugmentConfig, generator: torch.Generator) -> Tensor:
    """Augment a float NCHW batch in ``[0, 1]`` as ``cfg`` says, on its own device.

    The order is stain (HED) and colour first, on the tissue as scanned, then
    the geometric transforms (a shift, then a dihedral transform, as one
    gather). Random numbers come only from ``generator``
    (on any device; they are moved to the batch's device), so the result is
    reproducible for a seeded generator. Returns ``x01`` itself when nothing
    is switched on.
    """
    if x01.dim() != 4 or x01.shape[1] != 3 or not x01.is_floating_point():
        raise PcamError(f"augment_batch expects float (B, 3, H, W) in [0, 1], got {x01.dtype} {tuple(x01.shape)}")
    x = x01
    if cfg.hed and (cfg.hed_sigma > 0 or cfg.hed_bias > 0):
        x = hed_jitter(x, cfg.hed_sigma, cfg.hed_bias, generator)
    if cfg.color and (cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue):
        x = color_jitter(x, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, generator)
    ks = shifts = None
    if cfg.flip:
        ks = torch.randint(0, 8, (x.shape[0],), generator=generator, device=generator.device)
    if cfg.shift and cfg.shift_px > 0:
        shifts = torch.randint(0, 2 * int(cfg.shift_px) + 1, (2, x.shape[0]), generator=generator,
                               device=generator.device)
    if ks is not None or shifts is not None:
        # flips and shift are permutations of pixels: one gather does both
        x = _remap(x, ks, shifts, int(cfg.shift_px))
    return x
