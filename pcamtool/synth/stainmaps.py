"""Painting a scene into two per-pixel stain amounts: hematoxylin and eosin.

Background (glass, lymphoid haze, collagen fibres, fat-cell membranes), then
cell bodies, then nuclei, each blended over what lies below. Colour does not
enter here: :mod:`pcamtool.synth.optics` turns the stain amounts into light.
"""
from __future__ import annotations

import math

import numpy as np

from ..kernels.jit import jit
from .schema import (
    F_TISSUE, F_FAT, F_STROMA, F_PHASE, F_ANGLE, F_TEX, F_WARP_X, F_WARP_Y, P_LYMPH_E, P_LYMPH_H,
    P_STROMA_E, P_STROMA_H, P_FIBRE_FREQ, P_MEMB_E, P_MEMB_W, P_GLASS_E, P_TEX_AMP, P_TEX_X,
    P_TEX_Y, C_X, C_Y, C_A, C_B, C_THETA, C_KIND, C_HIN, C_HRIM, C_RIMW, C_H2A, C_H2P, C_H3A, C_H3P,
    C_CYR, C_CYE, C_CYH, C_NUCL, C_NDX, C_NDY, C_CHROM, C_SOFT, KIND_TUMOUR,
)


@jit
def _fsin(x):
    """sin(x) to ~0.1 % from two parabolas: texture does not need libm's precision
    and three libm calls per pixel were the slowest part of the stroma."""
    x = x - 6.283185307179586 * math.floor(x * 0.15915494309189535 + 0.5)  # into [-pi, pi)
    y = 1.2732395447 * x - 0.4052847346 * x * abs(x)
    return 0.225 * (y * abs(y) - y) + y


@jit
def _fcos(x):
    return _fsin(x + 0.5 * math.pi)


@jit
def _fat_membranes(seeds, fields, memb):
    """Distance (px) of every pixel to the nearest Voronoi edge of the fat-cell seeds.

    Neighbouring adipocytes meet along the bisector of their two nearest
    seeds. Per 8x8 block only the seeds that can be one of a pixel's two
    nearest are tried: a seed farther from the block centre than the
    second-nearest one plus the block's diameter cannot be.
    """
    s = memb.shape[0]
    ns = seeds.shape[0]
    blk = 8
    hd = (blk - 1) * 0.5 * 1.4142136 + 8.0  # + the largest warp the block may see
    dist = np.empty(ns)
    cand = np.empty(ns, np.int64)
    for by in range(0, s, blk):
        for bx in range(0, s, blk):
            anyfat = False
            for y in range(by, min(by + blk, s)):
                for x in range(bx, min(bx + blk, s)):
                    if fields[F_FAT, y, x] > 0.01:
                        anyfat = True
            if not anyfat:
                continue  # the painter reads memb only where there is fat
            cx = bx + (blk - 1) * 0.5
            cy = by + (blk - 1) * 0.5
            d1 = 1e18
            d2 = 1e18
            for k in range(ns):
                dx = cx - seeds[k, 0]
                dy = cy - seeds[k, 1]
                d = math.sqrt(dx * dx + dy * dy)
                dist[k] = d
                if d < d1:
                    d2 = d1
                    d1 = d
                elif d < d2:
                    d2 = d
            lim = d2 + 2.0 * hd
            nc = 0
            for k in range(ns):
                if dist[k] <= lim:
                    cand[nc] = k
                    nc += 1
            for y in range(by, min(by + blk, s)):
                for x in range(bx, min(bx + blk, s)):
                    e1 = 1e18
                    e2 = 1e18
                    i1 = 0
                    i2 = 0
                    # Warped coordinates: real adipocyte walls are bent, not straight.
                    wx = x + fields[F_WARP_X, y, x]
                    wy = y + fields[F_WARP_Y, y, x]
                    for m in range(nc):
                        k = cand[m]
                        dx = wx - seeds[k, 0]
                        dy = wy - seeds[k, 1]
                        d = dx * dx + dy * dy
                        if d < e1:
                            e2 = e1
                            i2 = i1
                            e1 = d
                            i1 = k
                        elif d < e2:
                            e2 = d
                            i2 = k
                    gx = seeds[i1, 0] - seeds[i2, 0]
                    gy = seeds[i1, 1] - seeds[i2, 1]
                    memb[y, x] = (e2 - e1) / (2.0 * math.sqrt(gx * gx + gy * gy) + 1e-9)


@jit
def paint_background(fields, par, seeds, hmap, emap, memb, grain):
    """Fill the stain maps with everything that is not a cell.

    ``memb`` is scratch; ``grain`` is the fine (1-2 px) texture tile, whose
    speckle keeps flat eosin from looking airbrushed.
    """
    s = hmap.shape[0]
    gsz = grain.shape[0]
    gx = int(par[P_TEX_Y]) % gsz  # another window of the tile than the nuclei's
    gy = int(par[P_TEX_X]) % gsz
    fat = seeds.shape[0] >= 2
    if fat:
        _fat_membranes(seeds, fields, memb)
    gE = par[P_GLASS_E]
    lE = par[P_LYMPH_E]
    lH = par[P_LYMPH_H]
    sE = par[P_STROMA_E]
    sH = par[P_STROMA_H]
    freq = par[P_FIBRE_FREQ]
    memE = par[P_MEMB_E]
    memW = par[P_MEMB_W]
    tamp = par[P_TEX_AMP]
    for y in range(s):
        r_t = fields[F_TISSUE, y]
        r_f = fields[F_FAT, y]
        r_s = fields[F_STROMA, y]
        r_tex = fields[F_TEX, y]
        r_an = fields[F_ANGLE, y]
        r_ph = fields[F_PHASE, y]
        r_m = memb[y]
        r_e = emap[y]
        r_h = hmap[y]
        r_g = grain[(y + gy) % gsz]
        for x in range(s):
            t = r_t[x]
            f = r_f[x]
            st = r_s[x]
            tex = r_tex[x]
            m = 0.0
            if fat and f > 0.01:
                w = memW * (1.0 + 0.35 * tex)
                if w < 0.3:
                    w = 0.3
                q = r_m[x] * (1.0 / w)
                if q < 3.0:
                    m = math.exp(-q * q)
            # Collagen: wavy parallel fibres, a sine across the local
            # orientation with a smoothly varying phase.
            col = 0.7
            if st > 0.003:
                ang = r_an[x]
                ph = freq * (x * _fcos(ang) + y * _fsin(ang)) + r_ph[x]
                fib = 0.5 + 0.5 * _fsin(ph)
                # Fibre contrast comes and goes: bundles, then smudged collagen.
                c = 0.45 + 0.3 * tex
                c = min(max(c, 0.05), 0.9)
                col = (1.0 - c) * 0.75 + c * (0.35 + 0.8 * fib * fib)
            e_soft = (1.0 - st) * lE + st * sE * col
            h_soft = (1.0 - st) * lH + st * sH
            e_fat = m * memE + (1.0 - m) * gE
            col = x + gx
            if col >= gsz:
                col -= gsz
            e_tis = f * e_fat + (1.0 - f) * e_soft * (1.0 + tamp * tex + 0.18 * r_g[col])
            if e_tis < 0.0:
                e_tis = 0.0
            r_e[x] = (1.0 - t) * gE + t * e_tis
            r_h[x] = t * (1.0 - f) * h_soft * (1.0 + 0.5 * tamp * tex)


@jit
def paint_cytoplasm(cells, hmap, emap, tex, tx, ty, tmask):
    """Paint cell bodies (tumour, histiocytes) and mark tumour footprints.

    The tumour footprint of a cell is every pixel centre within its
    cytoplasm radius: ``(x - cx)**2 + (y - cy)**2 <= r**2``, which is the
    exact rule ``tests/oracles.py:tumour_touches_centre`` re-checks.
    """
    s = hmap.shape[0]
    tsz = tex.shape[0]
    txo = (tx + 11) % tsz  # tex lookups wrap with one subtraction, not a modulo per pixel
    for i in range(cells.shape[0]):
        r = cells[i, C_CYR]
        if r <= 0.0:
            continue
        cx = cells[i, C_X]
        cy = cells[i, C_Y]
        ce = cells[i, C_CYE]
        ch = cells[i, C_CYH]
        tum = cells[i, C_KIND] == KIND_TUMOUR
        x0 = max(0, int(math.floor(cx - r - 1.0)))
        x1 = min(s - 1, int(math.ceil(cx + r + 1.0)))
        y0 = max(0, int(math.floor(cy - r - 1.0)))
        y1 = min(s - 1, int(math.ceil(cy + r + 1.0)))
        for y in range(y0, y1 + 1):
            row = (y + ty + 37) % tsz
            for x in range(x0, x1 + 1):
                dx = x - cx
                dy = y - cy
                d2 = dx * dx + dy * dy
                if tum and d2 <= r * r:
                    tmask[y, x] = True
                a = r - math.sqrt(d2) + 0.5
                if a <= 0.0:
                    continue
                if a > 1.0:
                    a = 1.0
                # A pale seam at the cell border: neighbouring cells' bodies
                # meet with a faint membrane line instead of merging.
                seam = 1.0 - 0.2 * math.exp(-(r - math.sqrt(d2)) ** 2 / 0.8)
                col = x + txo
                if col >= tsz:
                    col -= tsz
                g = 1.0 + 0.25 * tex[row, col]
                emap[y, x] = emap[y, x] * (1.0 - a) + a * ce * seam * g
                hmap[y, x] = hmap[y, x] * (1.0 - a) + a * ch * seam


@jit
def paint_nuclei(cells, hmap, emap, tex, tx, ty):
    """Paint every nucleus: an irregular ellipse of chromatin with a rim.

    The outline is ``r(phi) = 1 + a2 cos(2 phi + p2) + a3 cos(3 phi + p3)`` in
    the ellipse's own frame; the harmonics come from the unit direction by
    the double- and triple-angle formulas, so no pixel pays for atan2/cos.
    """
    s = hmap.shape[0]
    tsz = tex.shape[0]
    for i in range(cells.shape[0]):
        cx = cells[i, C_X]
        cy = cells[i, C_Y]
        a = cells[i, C_A]
        b = cells[i, C_B]
        th = cells[i, C_THETA]
        hin = cells[i, C_HIN]
        hrim = cells[i, C_HRIM]
        rimw = cells[i, C_RIMW]
        a2 = cells[i, C_H2A]
        c2 = math.cos(cells[i, C_H2P])
        s2 = math.sin(cells[i, C_H2P])
        a3 = cells[i, C_H3A]
        c3 = math.cos(cells[i, C_H3P])
        s3 = math.sin(cells[i, C_H3P])
        nucl = cells[i, C_NUCL]
        nx = cx + cells[i, C_NDX]
        ny = cy + cells[i, C_NDY]
        chrom = cells[i, C_CHROM]
        soft = cells[i, C_SOFT]
        scale = math.sqrt(a * b)
        rmax = 1.0 + abs(a2) + abs(a3) + 0.5 * soft / scale  # beyond: alpha is 0
        rmax2 = rmax * rmax
        ia = 1.0 / a
        ib = 1.0 / b
        isoft = 1.0 / soft
        irim = 1.0 / rimw
        ext = max(a, b) * rmax + 1.0
        x0 = max(0, int(math.floor(cx - ext)))
        x1 = min(s - 1, int(math.ceil(cx + ext)))
        y0 = max(0, int(math.floor(cy - ext)))
        y1 = min(s - 1, int(math.ceil(cy + ext)))
        ct = math.cos(th)
        st = math.sin(th)
        txo = tx % tsz
        for y in range(y0, y1 + 1):
            row = (y + ty) % tsz
            for x in range(x0, x1 + 1):
                dx = x - cx
                dy = y - cy
                un = (dx * ct + dy * st) * ia
                vn = (-dx * st + dy * ct) * ib
                r2 = un * un + vn * vn
                if r2 >= rmax2:
                    continue
                rr = math.sqrt(r2)
                if rr > 1e-9:
                    ir = 1.0 / rr
                    cu = un * ir
                    su = vn * ir
                else:
                    cu = 1.0
                    su = 0.0
                cos2 = cu * cu - su * su
                sin2 = 2.0 * cu * su
                cos3 = cu * (4.0 * cu * cu - 3.0)
                sin3 = su * (3.0 - 4.0 * su * su)
                edge = 1.0 + a2 * (cos2 * c2 - sin2 * s2) + a3 * (cos3 * c3 - sin3 * s3)
                depth = (edge - rr) * scale  # ~pixels inside the membrane
                al = depth * isoft + 0.5
                if al <= 0.0:
                    continue
                if al > 1.0:
                    al = 1.0
                dpos = depth if depth > 0.0 else 0.0
                q = dpos * irim
                col = x + txo
                if col >= tsz:
                    col -= tsz
                c = tex[row, col]
                dens = hin * (1.0 + chrom * c)
                if q < 3.0:
                    dens += hrim * math.exp(-q * q)
                if nucl > 0.0:
                    ex = x - nx
                    ey = y - ny
                    e2 = ex * ex + ey * ey
                    if e2 < 9.0:
                        dens += nucl * math.exp(-e2 * 0.8333333)
                if dens < 0.0:
                    dens = 0.0
                hmap[y, x] = hmap[y, x] * (1.0 - al) + al * dens
                # Chromatin displaces cytoplasm: less eosin under a nucleus.
                emap[y, x] = emap[y, x] * (1.0 - 0.6 * al)
