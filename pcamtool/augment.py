"""Training augmentation, batched on the device: dihedral, shift, colour and HED stain jitter.

A PCam label does not depend on orientation (tissue has no "up") nor on the
exact stain of the lab that cut it, so training sees random elements of the
dihedral group D4 (:mod:`pcamtool.tta`), colour jitter, a small shift and HED
stain jitter. Everything here is a tensor operation over the whole batch on
whatever device the batch lives on: the same code runs on the CPU and on a
GPU, with no per-sample Python loop, and draws its random numbers only from
the ``torch.Generator`` it is given, so a seeded generator gives the same
batch every time.

Example::

    cfg = AugmentConfig()                       # the defaults chosen on real tissue
    gen = torch.Generator().manual_seed(0)
    x01 = augment_batch(to_float01(batch_uint8), cfg, gen)
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import PcamError
from .config import AugmentConfig
from .tta import remap


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


def random_shift(x: Tensor, max_px: int, gen: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_px`` pixels per axis, borders reflected."""
    if max_px <= 0:
        return x
    off = torch.randint(2 * max_px + 1, (2, x.shape[0]), generator=gen, device=gen.device)
    return remap(x, None, off, max_px)


# ITU-R BT.601 luma, as torchvision's grayscale
_LUMA = (0.299, 0.587, 0.114)
# hue rotation about the grey axis k = (1, 1, 1) / sqrt(3): its cross-product matrix
_HUE_KX = ((0.0, -1.0, 1.0), (1.0, 0.0, -1.0), (-1.0, 1.0, 0.0))


@lru_cache(maxsize=None)
def _colour_constants(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Identity, luma row, hue cross-product matrix and ``k k^T``, made once per device and dtype.

    Built per batch they would be a host-to-device copy each, which on a GPU
    waits for the copy (a synchronisation inside the training step).
    """
    eye = torch.eye(3, device=device, dtype=dtype)
    luma = torch.tensor(_LUMA, device=device, dtype=dtype)
    kx = torch.tensor(_HUE_KX, device=device, dtype=dtype) / math.sqrt(3)
    kk = torch.full((3, 3), 1 / 3, device=device, dtype=dtype)
    return eye, luma, kx, kk


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
    eye3, luma, kx, kk = _colour_constants(dev, dt)
    eye = eye3.expand(b, 3, 3)
    m = eye
    if saturation > 0:
        s = _uniform(gen, (b, 1, 1), saturation, 1.0, dev, dt)
        m = (s * eye + (1 - s) * luma) @ m
    if hue > 0:
        theta = _uniform(gen, (b, 1, 1), hue, 0.0, dev, dt) * (2 * math.pi)
        rot = torch.cos(theta) * eye + torch.sin(theta) * kx + (1 - torch.cos(theta)) * kk
        m = rot @ m
    if brightness > 0:
        m = _uniform(gen, (b, 1, 1), brightness, 1.0, dev, dt) * m
    flat = x.reshape(b, c, h * w)
    out = torch.bmm(m, flat)
    if contrast > 0:
        # (M x - mu) * f + mu with mu = luma . M mean(x): mean luma after the colour matrix
        f = _uniform(gen, (b, 1, 1), contrast, 1.0, dev, dt)
        mu = (luma.view(1, 3) @ m @ flat.mean(2, keepdim=True))             # (B, 1, 1)
        out.mul_(f).add_((1 - f) * mu)
    return out.clamp_(0.0, 1.0).view(b, c, h, w)


# Ruifrok & Johnston's stain vectors, as scikit-image's rgb2hed (rows: H, E, DAB).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_OD_FLOOR = 1e-6                     # scikit-image's floor before the log
_OD_SCALE = -math.log(_OD_FLOOR)     # its unit: stains = ln(rgb) / ln(1e-6) @ hed_from_rgb


@lru_cache(maxsize=None)
def _hed_matrices(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``RGB_FROM_HED`` and ``HED_FROM_RGB`` on ``device``, copied there once."""
    return (torch.as_tensor(RGB_FROM_HED, dtype=dtype, device=device),
            torch.as_tensor(HED_FROM_RGB, dtype=dtype, device=device))


def rgb_to_hed(x01: Tensor) -> Tensor:
    """NCHW RGB in ``[0, 1]`` -> HED stain concentrations (scikit-image ``rgb2hed`` units, unclipped)."""
    b, c, h, w = x01.shape
    od = torch.log(x01.clamp_min(_OD_FLOOR)).reshape(b, c, h * w) / -_OD_SCALE
    m = _hed_matrices(x01.device, x01.dtype)[1].T
    return (m @ od).view(b, 3, h, w)


def hed_to_rgb(hed: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hed` (``hed2rgb``), clipped to ``[0, 1]``."""
    b, c, h, w = hed.shape
    m = _hed_matrices(hed.device, hed.dtype)[0].T
    # exp is never negative: only the top of [0, 1] needs a clip
    return torch.exp((m @ hed.reshape(b, c, h * w)) * -_OD_SCALE).clamp_(max=1.0).view(b, 3, h, w)


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
    h2r, r2h = _hed_matrices(dev, dt)
    # row vectors: od' = od @ (r2h diag(alpha) h2r) + scale * beta @ h2r, with od = -ln(x);
    # as columns on the (B, 3, H*W) view that is mat^T @ od + off^T
    mat_t = (r2h.unsqueeze(0) @ (alpha.unsqueeze(-1) * h2r.unsqueeze(0))).transpose(1, 2)
    off = (_OD_SCALE * (beta @ h2r)).view(b, 3, 1)
    neg_od = x.clamp_min(_OD_FLOOR).log_().reshape(b, c, h * w)          # = -od
    out = torch.baddbmm(-off, mat_t, neg_od)                              # = -od'
    # exp is never negative: only the top of [0, 1] needs a clip
    return out.exp_().clamp_(max=1.0).view(b, c, h, w)


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
        ks = torch.randint(8, (x.shape[0],), generator=generator, device=generator.device)
    if cfg.shift and cfg.shift_px > 0:
        shifts = torch.randint(2 * int(cfg.shift_px) + 1, (2, x.shape[0]), generator=generator,
                               device=generator.device)
    if ks is not None or shifts is not None:
        # flips and shift are permutations of pixels: one gather does both
        x = remap(x, ks, shifts, int(cfg.shift_px))
    return x
