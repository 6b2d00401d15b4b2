"""Stain amounts to RGB: Beer-Lambert absorption, optical blur, sensor noise.

``I = I0 * 10**-(H*h + E*e + bg)`` per channel, then a Gaussian blur of the
light (defocus mixes photons, not stain) and per-pixel sensor noise. Colour
enters only here, so one scene under two stain matrices differs the way two
labs' slides of the same tissue do.
"""
from __future__ import annotations

import math

import numpy as np

from ..kernels.jit import jit
from .schema import P_H, P_E, P_BG, P_WHITE, P_BLUR, P_NOISE, P_NOISE_X, P_NOISE_Y

LN10 = math.log(10.0)
OD_MAX = 8.0       # OD range of the transmission table (10**-8: black)
OD_BINS = 4096


@jit
def _blur_rows(src, dst, k, r, buf):
    """Convolve every row of ``src`` (h, w, 3) with ``k``; write it transposed into ``dst``.

    Writing transposed lets the same routine blur the columns on a second
    call. ``buf`` (w + 2r, 3) holds one edge-clamped row.
    """
    h = src.shape[0]
    w = src.shape[1]
    for y in range(h):
        for j in range(w + 2 * r):
            xx = j - r
            if xx < 0:
                xx = 0
            elif xx >= w:
                xx = w - 1
            for c in range(3):
                buf[j, c] = src[y, xx, c]
        for x in range(w):
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            for j in range(2 * r + 1):
                kj = k[j]
                a0 += kj * buf[x + j, 0]
                a1 += kj * buf[x + j, 1]
                a2 += kj * buf[x + j, 2]
            dst[x, y, 0] = a0
            dst[x, y, 1] = a1
            dst[x, y, 2] = a2


@jit
def stain_to_rgb(hmap, emap, par, noise, out, img, tmp, buf, trans):
    """Beer-Lambert, optical blur and sensor noise into ``out`` (96, 96, 3) uint8.

    ``img``, ``tmp`` (96, 96, 3) and ``buf`` (96 + 12, 3) are scratch;
    ``trans`` is :func:`transmission_table`.
    """
    s = hmap.shape[0]
    nsz = noise.shape[0]
    inv = OD_BINS / OD_MAX
    for y in range(s):
        r_h = hmap[y]
        r_e = emap[y]
        for x in range(s):
            hv = r_h[x]
            ev = r_e[x]
            for c in range(3):
                od = hv * par[P_H + c] + ev * par[P_E + c] + par[P_BG + c]
                # 10**-od by table lookup: three exp() per pixel were half the paint time.
                u = od * inv
                if u < 0.0:
                    u = 0.0
                elif u > OD_BINS - 1.001:
                    u = OD_BINS - 1.001
                k0 = int(u)
                fr = u - k0
                tr = trans[k0] + fr * (trans[k0 + 1] - trans[k0])
                img[y, x, c] = 255.0 * par[P_WHITE + c] * tr
    sigma = par[P_BLUR]
    if sigma > 0.2:
        # Blur light, not stain: defocus mixes the photons that reach the sensor.
        r = int(math.ceil(2.5 * sigma))
        if r > 6:
            r = 6
        k = np.empty(2 * r + 1)
        tot = 0.0
        for j in range(-r, r + 1):
            k[j + r] = math.exp(-0.5 * (j / sigma) ** 2)
            tot += k[j + r]
        for j in range(2 * r + 1):
            k[j] /= tot
        _blur_rows(img, tmp, k, r, buf)
        _blur_rows(tmp, img, k, r, buf)
    ns = par[P_NOISE]
    ox = int(par[P_NOISE_X]) % nsz
    oy = int(par[P_NOISE_Y]) % nsz
    for y in range(s):
        row = (y + oy) % nsz
        for x in range(s):
            col = x + ox
            if col >= nsz:
                col -= nsz
            for c in range(3):
                v = img[y, x, c] + ns * noise[row, col, c]
                v = math.floor(v + 0.5)
                if v < 0.0:
                    v = 0.0
                elif v > 255.0:
                    v = 255.0
                out[y, x, c] = np.uint8(v)


@jit
def transmission_table():
    """``10**-od`` on OD_BINS steps over [0, OD_MAX] (linear interpolation error < 1e-5)."""
    t = np.empty(OD_BINS)
    for k in range(OD_BINS):
        t[k] = math.exp(-LN10 * k * OD_MAX / OD_BINS)
    return t
