"""One synthetic patch's scene: its choices, fields, cells, fat seeds and paint vector.

:func:`build_scene` is everything about a patch that is drawn before any
pixel is painted.
"""
from __future__ import annotations

import math

import numpy as np

from ..kernels.jit import jit
from .cells import hex_lattice, place_tumour, place_others
from .fields import compose_fields
from .rng import uniform, uniform_in, normal
from .schema import (
    SIZE, MAX_SEEDS, T_NEG, T_PERIPH, T_POS, S_H, S_E, S_WHITE, S_BLUR, S_NOISE, S_ARCHE, S_TUM_R,
    S_CYTO_RATIO, S_BLANK_P, N_RAW, Q_BLANK, Q_EDGE_ON, Q_EDGE_OFF, Q_CRACK_ON,
    Q_CRACK_OFF, Q_FAT_ON, Q_FAT_OFF, Q_FAT_W, Q_S_OFF, Q_S_W, Q_PHASE_AMP, Q_ANGLE0, Q_TUM_MODE,
    Q_TUM_X, Q_TUM_Y, Q_TUM_RHO, Q_TUM_NOISE, Q_TUM_MARGIN, N_Q, P_H, P_E, P_BG, P_WHITE, P_BLUR,
    P_NOISE, P_LYMPH_E, P_LYMPH_H, P_STROMA_E, P_STROMA_H, P_FIBRE_FREQ, P_MEMB_E, P_MEMB_W,
    P_GLASS_E, P_TEX_AMP, P_NOISE_X, P_NOISE_Y, P_TEX_X, P_TEX_Y,
)


@jit
def _scene_vector(st, sl, target, blank):
    """Draw the scene choices ``q`` of one patch."""
    q = np.zeros(N_Q)
    q[Q_BLANK] = 1.0 if blank else 0.0
    r = uniform(st)
    arche = 0
    acc = sl[S_ARCHE]
    while arche < 4 and r >= acc:
        arche += 1
        acc += sl[S_ARCHE + arche]
    # Mostly a full field of tissue; sometimes a tissue edge or clefts.
    if uniform(st) < 0.3:
        q[Q_EDGE_ON] = 1.0
        q[Q_EDGE_OFF] = uniform_in(st, -0.5, 1.8)
    if uniform(st) < 0.3:
        q[Q_CRACK_ON] = 1.0
        q[Q_CRACK_OFF] = uniform_in(st, 1.6, 2.6)
    # Archetypes: 0 lymphoid, 1 lymphoid + stroma, 2 stroma, 3 fat, 4 fat + mixed.
    r = uniform(st)
    if arche == 3:
        q[Q_FAT_ON] = 1.0
        q[Q_FAT_OFF] = -1.2
        q[Q_FAT_W] = 0.12
    elif arche == 4:
        q[Q_FAT_ON] = 1.0
        q[Q_FAT_OFF] = uniform_in(st, -0.6, 0.6)
        q[Q_FAT_W] = 0.1
    elif r < 0.1:
        q[Q_FAT_ON] = 1.0
        q[Q_FAT_OFF] = 1.4
        q[Q_FAT_W] = 0.1
    if arche == 0:
        q[Q_S_OFF] = 1.3
    elif arche == 1:
        q[Q_S_OFF] = uniform_in(st, -0.5, 0.5)
    elif arche == 2:
        q[Q_S_OFF] = -1.3
    else:
        q[Q_S_OFF] = uniform_in(st, -0.6, 0.8)
    q[Q_S_W] = 0.15
    q[Q_PHASE_AMP] = uniform_in(st, 1.5, 3.5)
    q[Q_ANGLE0] = uniform(st) * math.pi
    # Tumour nest: a ragged blob, over the centre for positives, off it for
    # the negatives that carry tumour elsewhere.
    if target == T_POS:
        q[Q_TUM_MODE] = 1.0
        q[Q_TUM_X] = uniform_in(st, 20.0, 76.0)
        q[Q_TUM_Y] = uniform_in(st, 20.0, 76.0)
        q[Q_TUM_RHO] = math.exp(uniform_in(st, math.log(10.0), math.log(110.0)))
    elif target == T_PERIPH:
        a = uniform(st) * 2.0 * math.pi
        d = uniform_in(st, 38.0, 58.0)
        q[Q_TUM_MODE] = 2.0
        q[Q_TUM_X] = 47.5 + d * math.cos(a)
        q[Q_TUM_Y] = 47.5 + d * math.sin(a)
        q[Q_TUM_RHO] = uniform_in(st, 10.0, 30.0)
        q[Q_TUM_MARGIN] = sl[S_TUM_R] * sl[S_CYTO_RATIO]
    q[Q_TUM_NOISE] = uniform_in(st, 3.0, 8.0)
    return q


@jit
def _paint_vector(st, sl, par, tsz):
    """Per-patch stain and texture parameters around the slide's."""
    # Within a slide, staining still drifts a little from field to field.
    gh = math.exp(0.05 * normal(st))
    ge = math.exp(0.07 * normal(st))
    for c in range(3):
        par[P_H + c] = sl[S_H + c] * gh
        par[P_E + c] = sl[S_E + c] * ge
        par[P_BG + c] = uniform_in(st, 0.0, 0.02)
        par[P_WHITE + c] = sl[S_WHITE + c]
    par[P_BLUR] = sl[S_BLUR] * math.exp(0.1 * normal(st))
    par[P_NOISE] = sl[S_NOISE]
    par[P_LYMPH_E] = uniform_in(st, 0.08, 0.22)
    par[P_LYMPH_H] = uniform_in(st, 0.06, 0.16)
    par[P_STROMA_E] = uniform_in(st, 0.25, 0.6)
    par[P_STROMA_H] = uniform_in(st, 0.0, 0.06)
    par[P_FIBRE_FREQ] = uniform_in(st, 0.6, 1.6)
    par[P_MEMB_E] = uniform_in(st, 0.2, 0.5)
    par[P_MEMB_W] = uniform_in(st, 0.35, 0.7)
    par[P_GLASS_E] = uniform_in(st, 0.0, 0.04)
    par[P_TEX_AMP] = uniform_in(st, 0.1, 0.35)
    par[P_NOISE_X] = int(uniform(st) * tsz)
    par[P_NOISE_Y] = int(uniform(st) * tsz)
    par[P_TEX_X] = int(uniform(st) * tsz)
    par[P_TEX_Y] = int(uniform(st) * tsz)


@jit
def build_scene(st, sl, target, raw, fields, tum, cells, seeds, par, tsz):
    """Draw one patch: its fields, cells, fat seeds and paint vector.

    Parameters
    ----------
    st : int64 (1,) generator state (see :func:`.rng.patch_state`), advanced
    sl : float64 (N_SLIDE,) the slide's style
    target : T_NEG, T_PERIPH or T_POS
    raw : float32 (N_RAW, T, T) shared smooth-noise tiles
    fields, tum, cells, seeds, par : written (see :func:`.render.render_batch`)
    tsz : size of the chromatin / sensor-noise tiles

    Returns
    -------
    (n_cells, n_seeds)
    """
    blank = target == T_NEG and uniform(st) < sl[S_BLANK_P]
    q = _scene_vector(st, sl, target, blank)
    span = raw.shape[1] - SIZE
    off = np.empty((N_RAW, 2), np.int64)
    for p in range(N_RAW):
        off[p, 0] = int(uniform(st) * span)
        off[p, 1] = int(uniform(st) * span)
    compose_fields(raw, off, q, fields, tum)
    # Most specific cells first: later kinds avoid the bodies of earlier ones.
    n = 0
    if target != T_NEG:
        n = place_tumour(st, sl, target, q, tum, cells)
    if not blank:
        n = place_others(st, sl, fields, cells, n)
    ns = 0
    if q[Q_FAT_ON] > 0.5:
        fd = uniform_in(st, 34.0, 62.0)  # adipocytes are 50-100 um: 50-100 px at PCam's 0.97 um/px
        pts = hex_lattice(st, fd, 0.3, fd)
        ns = min(pts.shape[0], MAX_SEEDS)
        for k in range(ns):
            seeds[k, 0] = pts[k, 0]
            seeds[k, 1] = pts[k, 1]
    _paint_vector(st, sl, par, tsz)
    return n, ns
