"""Numba kernel that builds and paints synthetic H&E patches for :mod:`pcamtool.synth`.

A patch is made in two steps, both in compiled code so that no per-patch
Python runs (every kernel compiles through :mod:`pcamtool.kernels.jit`):

1. :func:`pcamtool.synth.scene.build_scene` draws the tissue of one patch
   from its slide's style: smooth fields (tissue vs glass, fat, stroma vs
   lymphoid, a tumour nest, :mod:`.fields`) cut from shared noise tiles, and
   a list of cells placed on jittered hexagonal lattices (lymphocytes,
   fibroblasts, histiocytes, tumour cells, :mod:`.cells`).
2. The painter turns that into two per-pixel stain amounts, hematoxylin
   (nuclei) and eosin (stroma, cytoplasm, membranes) (:mod:`.stainmaps`),
   then into light by Beer-Lambert, blurs it like a slightly defocused 10x
   objective and adds sensor noise (:mod:`.optics`).

Randomness comes from :mod:`.rng`, seeded per patch from ``(seed, split,
index)``: a patch does not depend on the batch it is painted in, and the
plain-Python kernels (``PCAMTOOL_NUMBA=0``) paint the same bytes as the
jitted ones.
"""
from __future__ import annotations

import numpy as np

from ..kernels.jit import jit
from .optics import stain_to_rgb, transmission_table
from .rng import patch_state
from .scene import build_scene
from .schema import MAX_CELLS, MAX_SEEDS, N_FIELDS, P_TEX_X, P_TEX_Y, N_PAR, N_CELL
from .stainmaps import paint_background, paint_cytoplasm, paint_nuclei


@jit
def render_batch(slides, slide_of, targets, index, seed_lo, seed_hi, code, raw, tex, noise,
                 out, tmask, cells_out, ncell_out):
    """Build and paint ``out.shape[0]`` patches.

    Parameters
    ----------
    slides : float64 (n_slides, N_SLIDE) slide styles
    slide_of, targets, index : int64 (N,) per patch: its slide, its target, its number in the split
    seed_lo, seed_hi, code : the run's seed (two 32-bit halves) and the split's code
    raw : float32 (N_RAW, T, T) smooth-noise tiles
    tex : float32 (T2, T2) chromatin / cytoplasm texture tile (unit variance)
    noise : float32 (T2, T2, 3) sensor-noise tile (unit variance)
    out : uint8 (N, 96, 96, 3), written
    tmask : bool (N, 96, 96), written: tumour-cell footprints
    cells_out : float64 (N, MAX_CELLS, N_CELL) or (0, ...), written when not empty
    ncell_out : int64 (N,) or (0,), written with it
    """
    n = out.shape[0]
    s = out.shape[1]
    tsz = tex.shape[0]
    st = np.empty(1, np.int64)
    fields = np.empty((N_FIELDS, s, s), np.float32)
    tum = np.empty((s, s))
    cells = np.empty((MAX_CELLS, N_CELL))
    seeds = np.empty((MAX_SEEDS, 2))
    par = np.empty(N_PAR)
    hmap = np.empty((s, s))
    emap = np.empty((s, s))
    memb = np.empty((s, s))
    img = np.empty((s, s, 3))
    tmp = np.empty((s, s, 3))
    buf = np.empty((s + 12, 3))
    trans = transmission_table()
    for i in range(n):
        st[0] = patch_state(seed_lo, seed_hi, code, index[i])
        nc, ns = build_scene(st, slides[slide_of[i]], targets[i], raw, fields, tum, cells, seeds, par, tsz)
        tx = int(par[P_TEX_X])
        ty = int(par[P_TEX_Y])
        mk = tmask[i]
        for y in range(s):
            for x in range(s):
                mk[y, x] = False
        paint_background(fields, par, seeds[:ns], hmap, emap, memb, tex)
        paint_cytoplasm(cells[:nc], hmap, emap, tex, tx, ty, tmask[i])
        paint_nuclei(cells[:nc], hmap, emap, tex, tx, ty)
        stain_to_rgb(hmap, emap, par, noise, out[i], img, tmp, buf, trans)
        if cells_out.shape[0] > 0:
            for j in range(nc):
                for k in range(N_CELL):
                    cells_out[i, j, k] = cells[j, k]
            ncell_out[i] = nc
