"""Cell placement for synthetic patches: lattices, the four cell kinds, tumour nests.

Cells packed in tissue neither overlap nor sit on a grid, so they are placed
on jittered hexagonal lattices; each kind (lymphocyte, fibroblast,
histiocyte, tumour cell) fills a cell row (``schema.C_*``) from its slide's
style. Tumour cells are placed first, the others keep out of their bodies.
"""
from __future__ import annotations

import math

import numpy as np

from ..kernels.jit import jit
from .fields import centre_distance
from .rng import uniform, uniform_in, normal
from .schema import (
    SIZE, CENTRE_LO, CENTRE_HI, MAX_CELLS, T_PERIPH, T_POS, S_LYMPH_D, S_LYMPH_R, S_LYMPH_H,
    S_TUM_R, S_TUM_HIN, S_TUM_RIM, S_TUM_IRREG, S_CYTO_RATIO, S_CYTO_E, S_CYTO_H, S_NUCL_P,
    S_HISTIO, F_TISSUE, F_FAT, F_STROMA, F_ANGLE, Q_TUM_X, Q_TUM_Y, C_X, C_Y, C_A, C_B, C_THETA,
    C_KIND, C_HIN, C_HRIM, C_RIMW, C_H2A, C_H2P, C_H3A, C_H3P, C_CYR, C_CYE, C_CYH, C_NUCL, C_NDX,
    C_NDY, C_CHROM, C_SOFT, KIND_LYMPH, KIND_FIBRO, KIND_TUMOUR, KIND_HISTIO,
)


@jit
def hex_lattice(st, d, jitter, pad):
    """A jittered, randomly rotated and shifted hexagonal lattice of spacing ``d``.

    Cells packed in tissue neither overlap (as random points would) nor sit
    on a grid; a jittered hex lattice gives that look. Returns the (n, 2)
    points within ``pad`` of the patch.
    """
    ang = uniform(st) * math.pi
    ca = math.cos(ang)
    sa = math.sin(ang)
    ox = 47.5 + uniform_in(st, -d, d)
    oy = 47.5 + uniform_in(st, -d, d)
    reach = (SIZE / 2 + pad) * 1.415 + d
    n = int(reach / (0.866 * d)) + 2
    pts = np.empty(((2 * n + 1) * (2 * n + 1), 2))
    # Uniform jitter of the same variance as N(0, jitter*d): bounded, so
    # lattice sites that cannot reach the patch are skipped undrawn.
    amp = jitter * d * 1.7320508
    lo = -pad - amp
    hi = SIZE - 1 + pad + amp
    cnt = 0
    for j in range(-n, n + 1):
        for i in range(-n, n + 1):
            bx = (i + 0.5 * (j & 1)) * d
            by = j * 0.8660254 * d
            x = ca * bx - sa * by + ox
            y = sa * bx + ca * by + oy
            if not (lo < x < hi and lo < y < hi):
                continue
            x += amp * (2.0 * uniform(st) - 1.0)
            y += amp * (2.0 * uniform(st) - 1.0)
            if -pad < x < SIZE - 1 + pad and -pad < y < SIZE - 1 + pad:
                pts[cnt, 0] = x
                pts[cnt, 1] = y
                cnt += 1
    return pts[:cnt]


@jit
def _pix(v):
    """Nearest pixel index of a coordinate, clamped to the patch."""
    k = int(math.floor(v + 0.5))
    if k < 0:
        return 0
    if k > SIZE - 1:
        return SIZE - 1
    return k


@jit
def _clear_of(cells, n, x, y, margin):
    """True when (x, y) lies outside the bodies of ``cells[:n]`` (+ margin)."""
    for i in range(n):
        r = max(cells[i, C_CYR], cells[i, C_A], cells[i, C_B]) + margin
        dx = x - cells[i, C_X]
        dy = y - cells[i, C_Y]
        if dx * dx + dy * dy <= r * r:
            return False
    return True


@jit
def _copy_row(a, src, dst):
    """``a[dst] = a[src]`` by hand: numba's slice assignment drags in
    seconds of compile time (error-message formatting) for nothing."""
    if src != dst:
        for k in range(a.shape[1]):
            a[dst, k] = a[src, k]


@jit
def _new_cell(c, x, y, kind):
    for k in range(c.shape[0]):
        c[k] = 0.0
    c[C_X] = x
    c[C_Y] = y
    c[C_KIND] = kind
    c[C_RIMW] = 1.0
    c[C_SOFT] = 0.7


@jit
def _lymphocyte(c, st, sl, x, y):
    """Small, round, dense nucleus; no visible cytoplasm."""
    _new_cell(c, x, y, KIND_LYMPH)
    r = sl[S_LYMPH_R] * uniform_in(st, 0.85, 1.15)
    e = uniform_in(st, 0.0, 0.12)
    c[C_A] = r * (1.0 + e)
    c[C_B] = r * (1.0 - e)
    c[C_THETA] = uniform(st) * math.pi
    c[C_HIN] = sl[S_LYMPH_H] * uniform_in(st, 0.75, 1.2)
    c[C_HRIM] = 0.1 * sl[S_LYMPH_H]
    c[C_H2A] = uniform_in(st, 0.0, 0.07)
    c[C_H2P] = uniform(st) * 2.0 * math.pi
    c[C_CHROM] = 0.25
    c[C_SOFT] = 0.9


@jit
def _fibroblast(c, st, sl, x, y, angle):
    """Spindle nucleus lying along the collagen fibres."""
    _new_cell(c, x, y, KIND_FIBRO)
    c[C_A] = uniform_in(st, 4.0, 9.0)
    c[C_B] = uniform_in(st, 1.0, 1.6)
    # The sine stripes of the painter run across `angle`; fibres along angle + 90 degrees.
    c[C_THETA] = angle + 0.5 * math.pi + 0.15 * normal(st)
    c[C_HIN] = 0.75 * sl[S_LYMPH_H] * uniform_in(st, 0.8, 1.2)
    c[C_HRIM] = 0.1
    c[C_H2A] = uniform_in(st, 0.0, 0.06)
    c[C_CHROM] = 0.1


@jit
def _histiocyte(c, st, sl, x, y):
    """Sinus histiocyte: large pale bean-shaped nucleus in foamy cytoplasm.

    The benign look-alike of a tumour cell in a lymph node: without it,
    "large pale nucleus" alone would give the label away.
    """
    _new_cell(c, x, y, KIND_HISTIO)
    c[C_A] = uniform_in(st, 4.0, 6.0)
    c[C_B] = uniform_in(st, 2.6, 3.8)
    c[C_THETA] = uniform(st) * math.pi
    c[C_HIN] = 0.35 * sl[S_LYMPH_H] * uniform_in(st, 0.8, 1.2)
    c[C_HRIM] = 0.25 * sl[S_LYMPH_H]
    c[C_H2A] = uniform_in(st, 0.05, 0.15)
    c[C_H2P] = uniform(st) * 2.0 * math.pi
    c[C_CYR] = uniform_in(st, 6.5, 9.0)
    c[C_CYE] = uniform_in(st, 0.18, 0.3)
    c[C_CYH] = 0.03
    c[C_CHROM] = 0.3


@jit
def _tumour_cell(c, st, sl, x, y):
    """Large, irregular, pale-centred but dark-rimmed nucleus in a body of cytoplasm."""
    _new_cell(c, x, y, KIND_TUMOUR)
    r = sl[S_TUM_R] * math.exp(0.15 * normal(st))
    r = min(max(r, 3.5), 10.0)
    e = uniform_in(st, 0.0, 0.25)
    c[C_A] = r * (1.0 + e)
    c[C_B] = r * (1.0 - e)
    c[C_THETA] = uniform(st) * math.pi
    c[C_HIN] = sl[S_TUM_HIN] * uniform_in(st, 0.8, 1.2)
    c[C_HRIM] = sl[S_TUM_RIM] * uniform_in(st, 0.8, 1.2)
    c[C_RIMW] = uniform_in(st, 0.8, 1.4)
    c[C_H2A] = uniform_in(st, 0.0, sl[S_TUM_IRREG])
    c[C_H2P] = uniform(st) * 2.0 * math.pi
    c[C_H3A] = uniform_in(st, 0.0, 0.7 * sl[S_TUM_IRREG])
    c[C_H3P] = uniform(st) * 2.0 * math.pi
    c[C_CYR] = min(r * sl[S_CYTO_RATIO] * uniform_in(st, 0.9, 1.1), 16.0)
    c[C_CYE] = sl[S_CYTO_E] * uniform_in(st, 0.8, 1.2)
    c[C_CYH] = sl[S_CYTO_H]
    if uniform(st) < sl[S_NUCL_P]:
        c[C_NUCL] = uniform_in(st, 0.4, 0.9)
    c[C_NDX] = uniform_in(st, -0.3, 0.3) * r
    c[C_NDY] = uniform_in(st, -0.3, 0.3) * r
    c[C_CHROM] = uniform_in(st, 0.5, 0.8)
    c[C_SOFT] = 1.0


@jit
def place_tumour(st, sl, target, q, tum, cells):
    """Tumour cells on a tight lattice inside the nest; returns their count."""
    n = 0
    pts = hex_lattice(st, 2.0 * sl[S_TUM_R] * sl[S_CYTO_RATIO] * uniform_in(st, 0.72, 0.9), 0.18, 8.0)
    for k in range(pts.shape[0]):
        x = pts[k, 0]
        y = pts[k, 1]
        if tum[_pix(y), _pix(x)] <= 0.0 or uniform(st) >= 0.95 or n >= MAX_CELLS - 1:
            continue
        _tumour_cell(cells[n], st, sl, x, y)
        # Belt and braces: no tumour footprint may reach the centre of a negative.
        if target == T_PERIPH and centre_distance(x, y) <= cells[n, C_CYR] + 0.5:
            continue
        n += 1
    if target == T_POS:
        hit = False
        for i in range(n):
            if centre_distance(cells[i, C_X], cells[i, C_Y]) <= cells[i, C_CYR] - 0.5:
                hit = True
                break
        if not hit:
            # The ragged nest missed the centre: seed one cell at the rim of
            # the square nearest the nest (so it joins it) and push aside
            # the neighbours it lands on. The patch is then the positive it
            # was drawn to be.
            x = min(max(q[Q_TUM_X], CENTRE_LO), CENTRE_HI) + uniform_in(st, -2.0, 2.0)
            y = min(max(q[Q_TUM_Y], CENTRE_LO), CENTRE_HI) + uniform_in(st, -2.0, 2.0)
            _tumour_cell(cells[n], st, sl, x, y)
            r = max(cells[n, C_CYR], cells[n, C_A], cells[n, C_B])
            m = 0
            for i in range(n + 1):  # keep the cells clear of it, then itself (row n)
                dx = cells[i, C_X] - x
                dy = cells[i, C_Y] - y
                if i == n or dx * dx + dy * dy > r * r:
                    _copy_row(cells, i, m)
                    m += 1
            n = m
    return n


@jit
def place_others(st, sl, fields, cells, n):
    """Histiocytes, lymphocytes and fibroblasts around the tumour cells ``cells[:n]``."""
    nt = n
    t = fields[F_TISSUE]
    f = fields[F_FAT]
    s = fields[F_STROMA]
    pts = hex_lattice(st, 18.0, 0.3, 8.0)
    for k in range(pts.shape[0]):
        x = pts[k, 0]
        y = pts[k, 1]
        iy = _pix(y)
        ix = _pix(x)
        p = t[iy, ix] * (1.0 - f[iy, ix]) * (1.0 - s[iy, ix]) * sl[S_HISTIO]
        if uniform(st) < p and n < MAX_CELLS and _clear_of(cells, nt, x, y, 0.0):
            _histiocyte(cells[n], st, sl, x, y)
            n += 1
    big = n  # cells with bodies: lymphocytes and fibroblasts keep out of them
    dens = uniform_in(st, 0.85, 0.98)
    pts = hex_lattice(st, sl[S_LYMPH_D] * uniform_in(st, 0.92, 1.08), 0.22, 8.0)
    for k in range(pts.shape[0]):
        x = pts[k, 0]
        y = pts[k, 1]
        iy = _pix(y)
        ix = _pix(x)
        p = t[iy, ix] * (1.0 - f[iy, ix]) * (1.0 - 0.9 * s[iy, ix]) * dens
        if uniform(st) < p and n < MAX_CELLS and _clear_of(cells, big, x, y, 0.5):
            _lymphocyte(cells[n], st, sl, x, y)
            n += 1
    pts = hex_lattice(st, 11.0, 0.35, 8.0)
    for k in range(pts.shape[0]):
        x = pts[k, 0]
        y = pts[k, 1]
        iy = _pix(y)
        ix = _pix(x)
        p = t[iy, ix] * (1.0 - f[iy, ix]) * s[iy, ix] * 0.35
        if uniform(st) < p and n < MAX_CELLS and _clear_of(cells, big, x, y, 1.0):
            _fibroblast(cells[n], st, sl, x, y, fields[F_ANGLE, iy, ix])
            n += 1
    return n
