"""Tissue fields of a synthetic patch: where tissue, fat, stroma and a tumour nest are.

Each field is a smooth random window cut from the shared noise tiles and
thresholded softly according to the scene's choices.
"""
from __future__ import annotations

import math

from ..kernels.jit import jit
from .schema import (
    CENTRE_LO, CENTRE_HI, F_TISSUE, F_FAT, F_STROMA, F_PHASE, F_ANGLE, F_TEX, F_WARP_X, F_WARP_Y,
    G_EDGE, G_CRACK, G_FAT, G_STROMA, G_PHASE, G_ANGLE, G_TEX, G_TUM, G_WARP_X, G_WARP_Y,
    Q_BLANK, Q_EDGE_ON, Q_EDGE_OFF, Q_CRACK_ON, Q_CRACK_OFF, Q_FAT_ON, Q_FAT_OFF, Q_FAT_W,
    Q_S_OFF, Q_S_W, Q_PHASE_AMP, Q_ANGLE0, Q_TUM_MODE, Q_TUM_X, Q_TUM_Y, Q_TUM_RHO, Q_TUM_NOISE,
    Q_TUM_MARGIN,
)


@jit
def _step(x, k):
    """A cheap logistic: 0 -> 1 over ``1 / k`` around 0 (smoothstep).

    ``k = 1 / (4.4 w)`` mimics a logistic of scale ``w``; callers pass the
    reciprocal because a division per pixel and field was measurable.
    """
    u = x * k + 0.5
    if u <= 0.0:
        return 0.0
    if u >= 1.0:
        return 1.0
    return u * u * (3.0 - 2.0 * u)


@jit
def centre_distance(x, y):
    """Euclidean distance from (x, y) to the central square of pixel centres."""
    dx = max(CENTRE_LO - x, x - CENTRE_HI, 0.0)
    dy = max(CENTRE_LO - y, y - CENTRE_HI, 0.0)
    return math.sqrt(dx * dx + dy * dy)


@jit
def compose_fields(raw, off, q, fields, tum):
    """Turn windows of the noise tiles and a scene vector into tissue fields.

    Parameters
    ----------
    raw : float32 (N_RAW, T, T) smooth N(0, 1) tiles
    off : int64 (N_RAW, 2) the (x, y) corner of this patch's window in each tile
    q : float64 (N_Q,) the scene's choices
    fields : float32 (N_FIELDS, 96, 96), written (what the painter reads)
    tum : float64 (96, 96), written: signed "inside the tumour nest" in pixels
    """
    s = fields.shape[1]
    mode = int(q[Q_TUM_MODE])
    edge = q[Q_EDGE_ON] > 0.5
    crack = q[Q_CRACK_ON] > 0.5
    fat = q[Q_FAT_ON] > 0.5
    t0 = 0.0 if q[Q_BLANK] > 0.5 else 1.0
    k_edge = 1.0 / (4.4 * 0.06)
    k_crack = 1.0 / (4.4 * 0.08)
    k_fat = 1.0 / (4.4 * max(q[Q_FAT_W], 1e-3))
    k_s = 1.0 / (4.4 * max(q[Q_S_W], 1e-3))
    k_occ = 1.0 / (4.4 * 2.0)
    tx = q[Q_TUM_X]
    ty = q[Q_TUM_Y]
    amp = q[Q_TUM_NOISE]
    rho = q[Q_TUM_RHO]
    for y in range(s):
        # One row of each tile window: plain 1-D reads in the pixel loop.
        r_edge = raw[G_EDGE, y + off[G_EDGE, 1], off[G_EDGE, 0]:off[G_EDGE, 0] + s]
        r_crack = raw[G_CRACK, y + off[G_CRACK, 1], off[G_CRACK, 0]:off[G_CRACK, 0] + s]
        r_fat = raw[G_FAT, y + off[G_FAT, 1], off[G_FAT, 0]:off[G_FAT, 0] + s]
        r_s = raw[G_STROMA, y + off[G_STROMA, 1], off[G_STROMA, 0]:off[G_STROMA, 0] + s]
        r_tum = raw[G_TUM, y + off[G_TUM, 1], off[G_TUM, 0]:off[G_TUM, 0] + s]
        r_ph = raw[G_PHASE, y + off[G_PHASE, 1], off[G_PHASE, 0]:off[G_PHASE, 0] + s]
        r_an = raw[G_ANGLE, y + off[G_ANGLE, 1], off[G_ANGLE, 0]:off[G_ANGLE, 0] + s]
        r_tex = raw[G_TEX, y + off[G_TEX, 1], off[G_TEX, 0]:off[G_TEX, 0] + s]
        r_wx = raw[G_WARP_X, y + off[G_WARP_X, 1], off[G_WARP_X, 0]:off[G_WARP_X, 0] + s]
        r_wy = raw[G_WARP_Y, y + off[G_WARP_Y, 1], off[G_WARP_Y, 0]:off[G_WARP_Y, 0] + s]
        for x in range(s):
            t = t0
            if edge:
                t = _step(r_edge[x] + q[Q_EDGE_OFF], k_edge)
            if crack:
                t *= _step(r_crack[x] + q[Q_CRACK_OFF], k_crack)
            f = 0.0
            if fat:
                f = _step(r_fat[x] - q[Q_FAT_OFF], k_fat)
            st = _step(r_s[x] - q[Q_S_OFF], k_s)
            v = -1e9
            occ = 0.0
            if mode > 0:
                dx = x - tx
                dy = y - ty
                v = rho - math.sqrt(dx * dx + dy * dy) + amp * r_tum[x]
                if mode == 2:
                    v = min(v, centre_distance(x, y) - q[Q_TUM_MARGIN])
                occ = _step(v, k_occ)
            tum[y, x] = v
            # A tumour nest is solid tissue: it displaces fat, stroma and glass.
            fields[F_TISSUE, y, x] = max(t, occ)
            fields[F_FAT, y, x] = f * (1.0 - occ)
            fields[F_STROMA, y, x] = st * (1.0 - occ)
            fields[F_PHASE, y, x] = q[Q_PHASE_AMP] * r_ph[x]
            fields[F_ANGLE, y, x] = q[Q_ANGLE0] + 0.5 * r_an[x]
            fields[F_TEX, y, x] = r_tex[x]
            if fat:  # only the fat walls read the warp
                fields[F_WARP_X, y, x] = 2.5 * r_wx[x]
                fields[F_WARP_Y, y, x] = 2.5 * r_wy[x]
