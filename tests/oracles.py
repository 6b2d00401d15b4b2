"""Numpy twins of package code, written independently of it: what tests (and the stain benchmark) compare against.

* :func:`reinhard_numpy`, :func:`macenko_numpy`: the stain normalization
  formulas in float64 numpy, one image at a time (the kernels of
  :mod:`pcamtool.kernels.stain` must stay within one grey level of them; the
  stain benchmark times them as its baseline).
* :func:`tumour_touches_centre`: the PCam label rule on cell geometry, apart
  from the painter that marks the same footprints.
* :func:`render_split`: a whole synthetic split in memory.
"""
from __future__ import annotations

import numpy as np

from pcamtool.kernels import stain as K
from pcamtool.stain import StainReference
from pcamtool.synth import Rendered, iter_split
from pcamtool.synth import schema

SIZE = schema.SIZE


# ---------------------------------------------------------------- stain normalization

def _enough_tissue(count: int, total: int) -> bool:
    return count >= max(16, K.MIN_TISSUE * total)


def reinhard_numpy(image: np.ndarray, reference: StainReference) -> np.ndarray:
    """Reinhard normalization of one uint8 image with vectorized numpy."""
    rgb = image.reshape(-1, 3).astype(np.float64)
    mask = rgb.mean(1) <= K.TISSUE_MAX_MEAN
    if not _enough_tissue(int(mask.sum()), mask.size):
        return image.copy()

    def to_lab(x: np.ndarray) -> np.ndarray:
        return np.log10(np.maximum(x @ K.RGB2LMS.T, K.LMS_FLOOR)) @ K.LMS2LAB.T

    lab_t = to_lab(rgb[mask])
    mean, std = lab_t.mean(0), lab_t.std(0)
    if not (std > 1e-6).all():
        return image.copy()
    lab = (to_lab(rgb) - mean) * (np.asarray(reference.params["std"]) / std) + np.asarray(reference.params["mean"])
    out = (10.0 ** (lab @ K.LAB2LMS.T)) @ K.LMS2RGB.T
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(image.shape)


def macenko_numpy(image: np.ndarray, reference: StainReference) -> np.ndarray:
    """Macenko normalization of one uint8 image with vectorized numpy."""
    od = -np.log((image.reshape(-1, 3).astype(np.float64) + 1.0) / 256.0)
    odh = od[(od >= K.OD_BETA).all(1)]
    if not _enough_tissue(len(odh), len(od)):
        return image.copy()
    vals, vecs = np.linalg.eigh(np.cov(odh.T))
    if not vals[1] > 1e-12:
        return image.copy()
    plane = vecs[:, 1:3] * np.where(vecs[:, 1:3].sum(0) < 0, -1.0, 1.0)
    proj = odh @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, K.ALPHA), np.percentile(phi, 100 - K.ALPHA)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1], axis=1)
    he /= np.linalg.norm(he, axis=0)
    if np.linalg.det(he.T @ he) < 1e-6:
        return image.copy()
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0].T
    max_c = np.percentile(conc, 99, axis=0)
    if not (max_c > 1e-6).all():
        return image.copy()
    ref_he = np.asarray(reference.params["stain_matrix"]).T
    conc *= np.asarray(reference.params["max_concentrations"]) / max_c
    out = 256.0 * np.exp(-(conc @ ref_he.T)) - 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(image.shape)


# ---------------------------------------------------------------- synthetic patches

def tumour_touches_centre(cells: np.ndarray) -> bool:
    """The PCam rule checked on geometry: does a tumour footprint cover a centre pixel?

    A tumour cell's footprint is every pixel centre within its body radius
    ``C_CYR``; the centre is pixels 32..63 on both axes. This is computed
    independently of the painter, which marks the same footprints.
    """
    tum = cells[cells[:, schema.C_KIND] == schema.KIND_TUMOUR]
    if len(tum) == 0:
        return False
    g = np.arange(schema.CENTRE_LO, schema.CENTRE_HI + 1, dtype=np.float64)
    dx = g[None, :] - tum[:, schema.C_X, None]
    dy = g[None, :] - tum[:, schema.C_Y, None]
    d2 = dx[:, None, :] ** 2 + dy[:, :, None] ** 2
    return bool((d2 <= (tum[:, schema.C_CYR] ** 2)[:, None, None]).any())


def render_split(n: int, seed: int = 0, split: str = "train", with_cells: bool = False) -> Rendered:
    """Paint a whole split in memory (``n`` of a few thousand at most)."""
    parts = list(iter_split(n, seed, split, batch=256, with_cells=with_cells))
    if not parts:
        e = np.zeros(0, np.int64)
        return Rendered(e, np.zeros((0, SIZE, SIZE, 3), np.uint8), np.zeros((0, SIZE, SIZE), bool),
                        np.zeros(0, np.int8), e, e, [] if with_cells else None)

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])

    cells = [c for p in parts for c in p.cells] if with_cells else None
    return Rendered(cat("index"), cat("images"), cat("tumour_mask"), cat("labels"),
                    cat("targets"), cat("slide"), cells)


# ---------------------------------------------------------------- training parts

def lr_multipliers(total: int, warmup_frac: float, schedule: str, steps: int | None = None) -> np.ndarray:
    """The learning-rate multiplier of steps ``0..steps-1`` (default ``0..total``), built as whole arrays.

    The warm-up is a straight line from the start value (1/25 of the peak
    for one-cycle, 0 for cosine) that reaches the peak on step ``warm - 1``;
    then half a cosine period from the peak down to the floor (1/25,000 of the
    peak for one-cycle, 0 for cosine), flat at the floor past ``total``.
    """
    warm = max(1, int(warmup_frac * total))
    start, floor = (0.04, 4e-5) if schedule == "onecycle" else (0.0, 0.0)
    steps = np.arange(total + 1 if steps is None else steps, dtype=np.float64)
    ramp = np.interp(steps + 1, [0.0, float(warm)], [start, 1.0])
    frac = np.clip((steps - warm) / max(1, total - warm), 0.0, 1.0)
    decay = floor + (1.0 - floor) * (np.cos(np.pi * frac) + 1.0) / 2.0
    return np.where(steps < warm, ramp, decay)


def bce_with_logits(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean binary cross-entropy of float64 logits against soft targets (the log-sum-exp form)."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(targets, np.float64)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


# ---------------------------------------------------------------- augmentation

def color_jitter_numpy(x: np.ndarray, brightness: float, contrast: float, saturation: float, hue: float,
                       u: dict[str, np.ndarray]) -> np.ndarray:
    """Colour jitter of float NCHW images in float64, one image at a time, from the uniform draws ``u``.

    ``u[name]`` holds each image's U(0, 1) draw for that jitter. Saturation
    blends with BT.601 luma grey, hue rotates about the grey axis by
    Rodrigues' formula, brightness scales, contrast blends with the mean luma
    of the jittered image; the result is clipped to [0, 1].
    """
    luma = np.array([0.299, 0.587, 0.114])
    k = np.ones(3) / np.sqrt(3.0)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    out = np.empty_like(x, dtype=np.float64)
    for i, img in enumerate(x.astype(np.float64)):
        rgb = img.reshape(3, -1)
        m = np.eye(3)
        if saturation > 0:
            s = 1 + saturation * (2 * u["saturation"][i] - 1)
            m = (s * np.eye(3) + (1 - s) * np.tile(luma, (3, 1))) @ m
        if hue > 0:
            th = hue * (2 * u["hue"][i] - 1) * 2 * np.pi
            m = (np.cos(th) * np.eye(3) + np.sin(th) * kx + (1 - np.cos(th)) * np.outer(k, k)) @ m
        if brightness > 0:
            m = (1 + brightness * (2 * u["brightness"][i] - 1)) * m
        y = m @ rgb
        if contrast > 0:
            f = 1 + contrast * (2 * u["contrast"][i] - 1)
            y = (y - luma @ y.mean(1)) * f + luma @ y.mean(1)
        out[i] = np.clip(y, 0, 1).reshape(img.shape)
    return out


def hed_jitter_numpy(x: np.ndarray, sigma: float, bias: float, u_alpha: np.ndarray, u_beta: np.ndarray,
                     rgb_from_hed: np.ndarray) -> np.ndarray:
    """Tellez HED jitter by way of scikit-image's rgb2hed / hed2rgb formulas (no clipping of stains), float64.

    ``u_alpha``, ``u_beta``: ``(B, 3)`` U(0, 1) draws; alpha = 1 + sigma (2u - 1), beta = bias (2u - 1).
    """
    hed_from_rgb = np.linalg.inv(rgb_from_hed)
    log_adjust = np.log(1e-6)
    out = np.empty_like(x, dtype=np.float64)
    for i, img in enumerate(x.astype(np.float64)):
        rgb = img.reshape(3, -1).T                                       # pixels x RGB
        hed = (np.log(np.maximum(rgb, 1e-6)) / log_adjust) @ hed_from_rgb
        hed = hed * (1 + sigma * (2 * u_alpha[i] - 1)) + bias * (2 * u_beta[i] - 1)
        back = np.exp((hed * log_adjust) @ rgb_from_hed)
        out[i] = np.clip(back, 0, 1).T.reshape(img.shape)
    return out
