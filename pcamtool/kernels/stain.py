"""Stain normalization kernels: Reinhard (lab-space statistics) and Macenko (stain vectors).

Both work on uint8 RGB images and leave a patch with too little tissue
unchanged (blank glass has no stain to measure): never NaN, never a crash.
The same per-pixel-array estimators serve one image and the pooled pixels of
a reference sample, so the reference and the patches are measured alike.
"""
from __future__ import annotations

import numpy as np

from .jit import jit

# Reinhard et al. 2001: RGB -> LMS -> log10 -> l-alpha-beta (decorrelated).
RGB2LMS = np.array([[0.3811, 0.5783, 0.0402],
                    [0.1967, 0.7244, 0.0782],
                    [0.0241, 0.1288, 0.8444]])
LMS2LAB = np.array([[1 / np.sqrt(3), 0.0, 0.0], [0.0, 1 / np.sqrt(6), 0.0], [0.0, 0.0, 1 / np.sqrt(2)]]) @ \
    np.array([[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]])
LMS2RGB = np.linalg.inv(RGB2LMS)
LAB2LMS = np.linalg.inv(LMS2LAB)

TISSUE_MAX_MEAN = 215.0   # a pixel brighter than this on average is glass
MIN_TISSUE = 0.05         # fraction of tissue pixels below which a patch passes unchanged
OD_BETA = 0.15            # Macenko: optical density below this in any channel is background
ALPHA = 1.0               # Macenko: robust extreme-angle percentile
LMS_FLOOR = 1.0 / 255.0   # keeps log10 finite on black pixels


@jit
def rgb_to_lab(rgb):
    """(M, 3) float64 RGB in 0..255 -> (M, 3) l-alpha-beta."""
    lms = rgb @ RGB2LMS.T
    for i in range(lms.shape[0]):
        for c in range(3):
            lms[i, c] = np.log10(max(lms[i, c], LMS_FLOOR))
    return lms @ LMS2LAB.T


@jit
def lab_to_rgb(lab):
    """Inverse of :func:`rgb_to_lab` (values may leave 0..255: callers clip)."""
    lms = lab @ LAB2LMS.T
    for i in range(lms.shape[0]):
        for c in range(3):
            lms[i, c] = 10.0 ** lms[i, c]
    return lms @ LMS2RGB.T


@jit
def tissue_mask(rgb):
    """Pixels that are not glass: mean of the three channels at most TISSUE_MAX_MEAN."""
    return (rgb[:, 0] + rgb[:, 1] + rgb[:, 2]) / 3.0 <= TISSUE_MAX_MEAN


@jit
def lab_stats(rgb):
    """Mean and std of l-alpha-beta over the tissue pixels of (M, 3) RGB; ok=False without tissue."""
    mask = tissue_mask(rgb)
    n = mask.sum()
    mean = np.zeros(3)
    std = np.ones(3)
    if n < max(16, MIN_TISSUE * rgb.shape[0]):
        return mean, std, False
    lab = rgb_to_lab(rgb[mask])
    for c in range(3):
        mean[c] = lab[:, c].mean()
        std[c] = lab[:, c].std()
        if not std[c] > 1e-6:
            return mean, std, False
    return mean, std, True


@jit
def reinhard_image(img, ref_mean, ref_std, out):
    """Match the tissue lab statistics of one (H, W, 3) uint8 image to the reference."""
    h, w, _ = img.shape
    rgb = img.reshape(h * w, 3).astype(np.float64)
    mean, std, ok = lab_stats(rgb)
    if not ok:
        out[...] = img
        return False
    lab = rgb_to_lab(rgb)
    for c in range(3):
        lab[:, c] = (lab[:, c] - mean[c]) * (ref_std[c] / std[c]) + ref_mean[c]
    res = lab_to_rgb(lab)
    flat = out.reshape(h * w, 3)
    for i in range(h * w):
        for c in range(3):
            flat[i, c] = np.uint8(min(255.0, max(0.0, np.rint(res[i, c]))))
    return True


@jit
def optical_density(rgb):
    """OD = -ln((I + 1) / 256): finite for every uint8 value."""
    return -np.log((rgb + 1.0) / 256.0)


@jit
def macenko_estimate(od):
    """Stain matrix (3, 2; H then E, unit columns) and 99th-percentile concentrations of OD pixels.

    Returns ``(he, max_c, ok)``; ``ok`` is False when too few pixels carry
    stain or their covariance is degenerate.
    """
    he = np.zeros((3, 2))
    max_c = np.ones(2)
    keep = (od[:, 0] >= OD_BETA) & (od[:, 1] >= OD_BETA) & (od[:, 2] >= OD_BETA)
    n = keep.sum()
    if n < max(16, MIN_TISSUE * od.shape[0]):
        return he, max_c, False
    odh = od[keep]
    centred = odh - np.array([odh[:, 0].mean(), odh[:, 1].mean(), odh[:, 2].mean()])
    cov = centred.T @ centred / (n - 1)
    vals, vecs = np.linalg.eigh(cov)
    if not vals[1] > 1e-12:
        return he, max_c, False
    plane = np.ascontiguousarray(vecs[:, 1:3])
    for j in range(2):  # the sign of an eigenvector is arbitrary: point into positive OD
        if plane[:, j].sum() < 0:
            plane[:, j] = -plane[:, j]
    proj = odh @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo = np.percentile(phi, ALPHA)
    hi = np.percentile(phi, 100 - ALPHA)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    if v1[0] > v2[0]:  # hematoxylin absorbs red the most
        h_vec, e_vec = v1, v2
    else:
        h_vec, e_vec = v2, v1
    he[:, 0] = h_vec / np.sqrt((h_vec ** 2).sum())
    he[:, 1] = e_vec / np.sqrt((e_vec ** 2).sum())
    gram = he.T @ he
    if gram[0, 0] * gram[1, 1] - gram[0, 1] * gram[1, 0] < 1e-6:
        return he, max_c, False  # one stain only: the two vectors coincide
    conc = concentrations(od, he)
    for j in range(2):
        max_c[j] = np.percentile(conc[:, j], 99.0)
        if not max_c[j] > 1e-6:
            return he, max_c, False
    return he, max_c, True


@jit
def concentrations(od, he):
    """Least-squares stain concentrations (M, 2) of OD pixels (M, 3) under ``he`` (3, 2)."""
    gram = he.T @ he
    det = gram[0, 0] * gram[1, 1] - gram[0, 1] * gram[1, 0]
    inv = np.array([[gram[1, 1], -gram[0, 1]], [-gram[1, 0], gram[0, 0]]]) / det
    return od @ (inv @ he.T).T


@jit
def macenko_image(img, ref_he, ref_max_c, out):
    """Re-stain one (H, W, 3) uint8 image with the reference stain matrix and concentrations."""
    h, w, _ = img.shape
    od = optical_density(img.reshape(h * w, 3).astype(np.float64))
    he, max_c, ok = macenko_estimate(od)
    if not ok:
        out[...] = img
        return False
    conc = concentrations(od, he)
    for j in range(2):
        conc[:, j] *= ref_max_c[j] / max_c[j]
    od_new = conc @ ref_he.T
    flat = out.reshape(h * w, 3)
    for i in range(h * w):
        for c in range(3):
            v = 256.0 * np.exp(-od_new[i, c]) - 1.0
            flat[i, c] = np.uint8(min(255.0, max(0.0, np.rint(v))))
    return True


@jit
def reinhard_batch(images, ref_mean, ref_std, out, changed):
    for i in range(images.shape[0]):
        changed[i] = reinhard_image(images[i], ref_mean, ref_std, out[i])


@jit
def macenko_batch(images, ref_he, ref_max_c, out, changed):
    for i in range(images.shape[0]):
        changed[i] = macenko_image(images[i], ref_he, ref_max_c, out[i])
