"""Numba kernels that build and paint synthetic H&E patches for :mod:`pcamtool.synth`.

A patch is made in two steps, both here so that no per-patch Python runs:

1. :func:`build_scene` draws the tissue of one patch from its slide's style:
   smooth fields (tissue vs glass, fat, stroma vs lymphoid, a tumour nest)
   cut from shared noise tiles, and a list of cells placed on jittered
   hexagonal lattices (lymphocytes, fibroblasts, histiocytes, tumour cells).
2. The painter turns that into two per-pixel stain amounts, hematoxylin
   (nuclei) and eosin (stroma, cytoplasm, membranes), then into light by
   Beer-Lambert (``I = I0 * 10**-(H*h + E*e + bg)``), blurs it like a
   slightly defocused 10x objective and adds sensor noise. Colour enters
   only at that last step, so one scene under two stain matrices differs
   the way two labs' slides of the same tissue do.

Randomness comes from a 32-bit xorshift generator seeded per patch from
``(seed, split, index)``: a patch does not depend on the batch it is painted
in, and the plain-Python kernels (``PCAMTOOL_NUMBA=0``) paint the same bytes
as the jitted ones (all integer steps stay below 2**63, so nothing wraps).
"""
from __future__ import annotations

import math

import numpy as np

from ..kernels.jit import jit

SIZE = 96
CENTRE_LO = 32     # the labelled square: pixel centres 32..63 on both axes
CENTRE_HI = 63
MAX_CELLS = 1024   # per patch; dense lymphoid tissue needs ~400
MAX_SEEDS = 160    # fat-cell Voronoi seeds per patch

# What a patch is asked to be (the label is measured on the result).
T_NEG = 0
T_PERIPH = 1       # negative with tumour off the centre
T_POS = 2

# Entries of a slide's style vector (float64, N_SLIDE), drawn by pcamtool.synth.
S_H = 0            # 3: hematoxylin OD vector * strength
S_E = 3            # 3: eosin OD vector * strength
S_WHITE = 6        # 3: light-source white, 0..1
S_BLUR = 9         # defocus sigma (px)
S_NOISE = 10       # sensor noise (grey levels)
S_ARCHE = 11       # 5: probabilities of lymphoid, lymphoid+stroma, stroma, fat, fat+mixed
S_LYMPH_D = 16     # lymphocyte spacing (px)
S_LYMPH_R = 17     # lymphocyte nucleus radius (px)
S_LYMPH_H = 18     # lymphocyte hematoxylin
S_TUM_R = 19       # tumour nucleus radius (px)
S_TUM_HIN = 20     # tumour chromatin hematoxylin (pale)
S_TUM_RIM = 21     # tumour nuclear-membrane hematoxylin (dark rim)
S_TUM_IRREG = 22   # amplitude of the outline harmonics
S_CYTO_RATIO = 23  # tumour cell radius / nucleus radius
S_CYTO_E = 24
S_CYTO_H = 25
S_NUCL_P = 26      # share of tumour nuclei with a visible nucleolus
S_HISTIO = 27      # histiocyte rate in lymphoid tissue
S_BLANK_P = 28     # chance that a T_NEG patch is bare glass
N_SLIDE = 29

# Planes of the ``fields`` array (float32, (N_FIELDS, 96, 96)).
F_TISSUE = 0   # 1 = tissue, 0 = bare glass (tissue edge, tear, blank)
F_FAT = 1      # 1 = adipose (white holes with membranes)
F_STROMA = 2   # 1 = fibrous stroma, 0 = lymphoid background
F_PHASE = 3    # phase wobble of the collagen fibres (radians)
F_ANGLE = 4    # fibre orientation (radians)
F_TEX = 5      # mid-frequency mottling of the eosin (N(0, 1)-ish)
F_WARP_X = 6   # domain warp (px) that bends the fat-cell walls
F_WARP_Y = 7
N_FIELDS = 8

# Planes of the shared noise tiles ``raw`` (float32, (N_RAW, T, T)): smooth
# N(0, 1) fields at several scales; each patch cuts its own random windows.
G_EDGE = 0
G_CRACK = 1
G_FAT = 2
G_STROMA = 3
G_PHASE = 4
G_ANGLE = 5
G_TEX = 6
G_TUM = 7
G_WARP_X = 8
G_WARP_Y = 9
N_RAW = 10
RAW_SIGMA = (28.0, 9.0, 28.0, 17.0, 9.0, 28.0, 3.5, 9.0, 12.0, 12.0)  # smoothing (px) per plane

# Entries of the scene vector ``q`` of :func:`compose_fields`.
Q_BLANK = 0        # 1: no tissue at all
Q_EDGE_ON = 1      # 1: a tissue edge crosses the patch ...
Q_EDGE_OFF = 2     # ... at this level of G_EDGE (higher = more tissue)
Q_CRACK_ON = 3     # 1: clefts (tears, retraction) in the tissue ...
Q_CRACK_OFF = 4    # ... where G_CRACK < -this
Q_FAT_ON = 5
Q_FAT_OFF = 6      # fat where G_FAT > this
Q_FAT_W = 7        # softness of the fat border (field units)
Q_S_OFF = 8        # stroma where G_STROMA > this
Q_S_W = 9
Q_PHASE_AMP = 10
Q_ANGLE0 = 11
Q_TUM_MODE = 12    # 0 none, 1 a nest, 2 a nest kept off the centre
Q_TUM_X = 13
Q_TUM_Y = 14
Q_TUM_RHO = 15     # nest radius (px)
Q_TUM_NOISE = 16   # raggedness of its border (px)
Q_TUM_MARGIN = 17  # mode 2: nest stays this far (px) from the central square
N_Q = 18

# Entries of the per-patch paint vector ``par`` (float64).
P_H = 0            # 3: hematoxylin OD vector * strength
P_E = 3            # 3: eosin OD vector * strength
P_BG = 6           # 3: OD of the glass + mounting medium
P_WHITE = 9        # 3: light-source white, 0..1 per channel
P_BLUR = 12        # Gaussian blur sigma in pixels (defocus)
P_NOISE = 13       # sensor noise sigma in grey levels
P_LYMPH_E = 14     # eosin of the lymphoid background between nuclei
P_LYMPH_H = 15     # hematoxylin haze of the lymphoid background
P_STROMA_E = 16    # eosin of collagen
P_STROMA_H = 17
P_FIBRE_FREQ = 18  # radians per pixel across the fibres
P_MEMB_E = 19      # eosin of fat-cell membranes
P_MEMB_W = 20      # membrane half-width in pixels
P_GLASS_E = 21     # faint eosin tint of the glass (serum, mounting medium)
P_TEX_AMP = 22     # strength of the eosin mottling
P_NOISE_X = 23     # offsets into the shared noise / chromatin tiles
P_NOISE_Y = 24
P_TEX_X = 25
P_TEX_Y = 26
N_PAR = 27

# Columns of a cell row (float64, N_CELL); coordinates are pixel centres
# (pixel (y, x) sits at (x, y)).
C_X = 0
C_Y = 1
C_A = 2        # nucleus semi-axis along theta (px)
C_B = 3        # nucleus semi-axis across theta (px)
C_THETA = 4
C_KIND = 5
C_HIN = 6      # hematoxylin inside the nucleus (chromatin)
C_HRIM = 7     # extra hematoxylin on the nuclear membrane
C_RIMW = 8     # width of that rim (px)
C_H2A = 9      # outline: r(phi) = 1 + a2 cos(2phi+p2) + a3 cos(3phi+p3)
C_H2P = 10
C_H3A = 11
C_H3P = 12
C_CYR = 13     # cell-body radius (px); 0 = no visible cytoplasm
C_CYE = 14     # eosin of the cytoplasm
C_CYH = 15     # hematoxylin of the cytoplasm (amphophilic tumour cells)
C_NUCL = 16    # nucleolus hematoxylin (0 = none)
C_NDX = 17     # nucleolus offset from the centre
C_NDY = 18
C_CHROM = 19   # chromatin texture strength (coarse, vesicular in tumour)
C_SOFT = 20    # edge softness (px)
N_CELL = 21

KIND_LYMPH = 0
KIND_FIBRO = 1
KIND_TUMOUR = 2
KIND_HISTIO = 3

LN10 = math.log(10.0)
OD_MAX = 8.0       # OD range of the transmission table (10**-8: black)
OD_BINS = 4096
M32 = 0xFFFFFFFF


# ---------------------------------------------------------------- random numbers


@jit
def _mul32(a, b):
    """``a * b mod 2**32`` in 16-bit halves, so no product passes 2**48."""
    return (a * (b & 0xFFFF) + (((a * (b >> 16)) & 0xFFFF) << 16)) & M32


@jit
def _mix32(h):
    """MurmurHash3's finaliser: a bijective scramble of 32 bits."""
    h ^= h >> 16
    h = _mul32(h, 0x85EBCA6B)
    h ^= h >> 13
    h = _mul32(h, 0xC2B2AE35)
    h ^= h >> 16
    return h


@jit
def patch_state(seed_lo, seed_hi, code, index):
    """The generator state of one patch, from (seed, split code, patch index)."""
    h = _mix32((seed_lo & M32) ^ 0x9E3779B9)
    h = _mix32(h ^ (seed_hi & M32))
    h = _mix32(h ^ (code & M32))
    h = _mix32(h ^ (index & M32))
    h = _mix32(h ^ ((index >> 32) & M32))
    return h if h != 0 else 0x2545F491


@jit
def _u(st):
    """A uniform in [0, 1) from the xorshift32 state ``st[0]`` (24 bits)."""
    x = st[0] & M32  # any state stays in 32 bits (a stray negative one cannot index out of range)
    x ^= (x << 13) & M32
    x ^= x >> 17
    x ^= (x << 5) & M32
    st[0] = x
    return (x >> 8) * (1.0 / 16777216.0)


@jit
def _uni(st, a, b):
    return a + (b - a) * _u(st)


@jit
def _normal(st):
    """A standard normal (Box-Muller)."""
    u1 = _u(st)
    if u1 < 1e-9:
        u1 = 1e-9
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * _u(st))


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


# ---------------------------------------------------------------- fields


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


# ---------------------------------------------------------------- cells


@jit
def _lattice(st, d, jitter, pad):
    """A jittered, randomly rotated and shifted hexagonal lattice of spacing ``d``.

    Cells packed in tissue neither overlap (as random points would) nor sit
    on a grid; a jittered hex lattice gives that look. Returns the (n, 2)
    points within ``pad`` of the patch.
    """
    ang = _u(st) * math.pi
    ca = math.cos(ang)
    sa = math.sin(ang)
    ox = 47.5 + _uni(st, -d, d)
    oy = 47.5 + _uni(st, -d, d)
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
            x += amp * (2.0 * _u(st) - 1.0)
            y += amp * (2.0 * _u(st) - 1.0)
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
    r = sl[S_LYMPH_R] * _uni(st, 0.85, 1.15)
    e = _uni(st, 0.0, 0.12)
    c[C_A] = r * (1.0 + e)
    c[C_B] = r * (1.0 - e)
    c[C_THETA] = _u(st) * math.pi
    c[C_HIN] = sl[S_LYMPH_H] * _uni(st, 0.75, 1.2)
    c[C_HRIM] = 0.1 * sl[S_LYMPH_H]
    c[C_H2A] = _uni(st, 0.0, 0.07)
    c[C_H2P] = _u(st) * 2.0 * math.pi
    c[C_CHROM] = 0.25
    c[C_SOFT] = 0.9


@jit
def _fibroblast(c, st, sl, x, y, angle):
    """Spindle nucleus lying along the collagen fibres."""
    _new_cell(c, x, y, KIND_FIBRO)
    c[C_A] = _uni(st, 4.0, 9.0)
    c[C_B] = _uni(st, 1.0, 1.6)
    # The sine stripes of the painter run across `angle`; fibres along angle + 90 degrees.
    c[C_THETA] = angle + 0.5 * math.pi + 0.15 * _normal(st)
    c[C_HIN] = 0.75 * sl[S_LYMPH_H] * _uni(st, 0.8, 1.2)
    c[C_HRIM] = 0.1
    c[C_H2A] = _uni(st, 0.0, 0.06)
    c[C_CHROM] = 0.1


@jit
def _histiocyte(c, st, sl, x, y):
    """Sinus histiocyte: large pale bean-shaped nucleus in foamy cytoplasm.

    The benign look-alike of a tumour cell in a lymph node: without it,
    "large pale nucleus" alone would give the label away.
    """
    _new_cell(c, x, y, KIND_HISTIO)
    c[C_A] = _uni(st, 4.0, 6.0)
    c[C_B] = _uni(st, 2.6, 3.8)
    c[C_THETA] = _u(st) * math.pi
    c[C_HIN] = 0.35 * sl[S_LYMPH_H] * _uni(st, 0.8, 1.2)
    c[C_HRIM] = 0.25 * sl[S_LYMPH_H]
    c[C_H2A] = _uni(st, 0.05, 0.15)
    c[C_H2P] = _u(st) * 2.0 * math.pi
    c[C_CYR] = _uni(st, 6.5, 9.0)
    c[C_CYE] = _uni(st, 0.18, 0.3)
    c[C_CYH] = 0.03
    c[C_CHROM] = 0.3


@jit
def _tumour_cell(c, st, sl, x, y):
    """Large, irregular, pale-centred but dark-rimmed nucleus in a body of cytoplasm."""
    _new_cell(c, x, y, KIND_TUMOUR)
    r = sl[S_TUM_R] * math.exp(0.15 * _normal(st))
    r = min(max(r, 3.5), 10.0)
    e = _uni(st, 0.0, 0.25)
    c[C_A] = r * (1.0 + e)
    c[C_B] = r * (1.0 - e)
    c[C_THETA] = _u(st) * math.pi
    c[C_HIN] = sl[S_TUM_HIN] * _uni(st, 0.8, 1.2)
    c[C_HRIM] = sl[S_TUM_RIM] * _uni(st, 0.8, 1.2)
    c[C_RIMW] = _uni(st, 0.8, 1.4)
    c[C_H2A] = _uni(st, 0.0, sl[S_TUM_IRREG])
    c[C_H2P] = _u(st) * 2.0 * math.pi
    c[C_H3A] = _uni(st, 0.0, 0.7 * sl[S_TUM_IRREG])
    c[C_H3P] = _u(st) * 2.0 * math.pi
    c[C_CYR] = min(r * sl[S_CYTO_RATIO] * _uni(st, 0.9, 1.1), 16.0)
    c[C_CYE] = sl[S_CYTO_E] * _uni(st, 0.8, 1.2)
    c[C_CYH] = sl[S_CYTO_H]
    if _u(st) < sl[S_NUCL_P]:
        c[C_NUCL] = _uni(st, 0.4, 0.9)
    c[C_NDX] = _uni(st, -0.3, 0.3) * r
    c[C_NDY] = _uni(st, -0.3, 0.3) * r
    c[C_CHROM] = _uni(st, 0.5, 0.8)
    c[C_SOFT] = 1.0


@jit
def _scene_vector(st, sl, target, blank):
    """Draw the scene choices ``q`` of one patch."""
    q = np.zeros(N_Q)
    q[Q_BLANK] = 1.0 if blank else 0.0
    r = _u(st)
    arche = 0
    acc = sl[S_ARCHE]
    while arche < 4 and r >= acc:
        arche += 1
        acc += sl[S_ARCHE + arche]
    # Mostly a full field of tissue; sometimes a tissue edge or clefts.
    if _u(st) < 0.3:
        q[Q_EDGE_ON] = 1.0
        q[Q_EDGE_OFF] = _uni(st, -0.5, 1.8)
    if _u(st) < 0.3:
        q[Q_CRACK_ON] = 1.0
        q[Q_CRACK_OFF] = _uni(st, 1.6, 2.6)
    # Archetypes: 0 lymphoid, 1 lymphoid + stroma, 2 stroma, 3 fat, 4 fat + mixed.
    r = _u(st)
    if arche == 3:
        q[Q_FAT_ON] = 1.0
        q[Q_FAT_OFF] = -1.2
        q[Q_FAT_W] = 0.12
    elif arche == 4:
        q[Q_FAT_ON] = 1.0
        q[Q_FAT_OFF] = _uni(st, -0.6, 0.6)
        q[Q_FAT_W] = 0.1
    elif r < 0.1:
        q[Q_FAT_ON] = 1.0
        q[Q_FAT_OFF] = 1.4
        q[Q_FAT_W] = 0.1
    if arche == 0:
        q[Q_S_OFF] = 1.3
    elif arche == 1:
        q[Q_S_OFF] = _uni(st, -0.5, 0.5)
    elif arche == 2:
        q[Q_S_OFF] = -1.3
    else:
        q[Q_S_OFF] = _uni(st, -0.6, 0.8)
    q[Q_S_W] = 0.15
    q[Q_PHASE_AMP] = _uni(st, 1.5, 3.5)
    q[Q_ANGLE0] = _u(st) * math.pi
    # Tumour nest: a ragged blob, over the centre for positives, off it for
    # the negatives that carry tumour elsewhere.
    if target == T_POS:
        q[Q_TUM_MODE] = 1.0
        q[Q_TUM_X] = _uni(st, 20.0, 76.0)
        q[Q_TUM_Y] = _uni(st, 20.0, 76.0)
        q[Q_TUM_RHO] = math.exp(_uni(st, math.log(10.0), math.log(110.0)))
    elif target == T_PERIPH:
        a = _u(st) * 2.0 * math.pi
        d = _uni(st, 38.0, 58.0)
        q[Q_TUM_MODE] = 2.0
        q[Q_TUM_X] = 47.5 + d * math.cos(a)
        q[Q_TUM_Y] = 47.5 + d * math.sin(a)
        q[Q_TUM_RHO] = _uni(st, 10.0, 30.0)
        q[Q_TUM_MARGIN] = sl[S_TUM_R] * sl[S_CYTO_RATIO]
    q[Q_TUM_NOISE] = _uni(st, 3.0, 8.0)
    return q


@jit
def _place_tumour(st, sl, target, q, tum, cells):
    """Tumour cells on a tight lattice inside the nest; returns their count."""
    n = 0
    pts = _lattice(st, 2.0 * sl[S_TUM_R] * sl[S_CYTO_RATIO] * _uni(st, 0.72, 0.9), 0.18, 8.0)
    for k in range(pts.shape[0]):
        x = pts[k, 0]
        y = pts[k, 1]
        if tum[_pix(y), _pix(x)] <= 0.0 or _u(st) >= 0.95 or n >= MAX_CELLS - 1:
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
            x = min(max(q[Q_TUM_X], CENTRE_LO), CENTRE_HI) + _uni(st, -2.0, 2.0)
            y = min(max(q[Q_TUM_Y], CENTRE_LO), CENTRE_HI) + _uni(st, -2.0, 2.0)
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
def _place_others(st, sl, fields, cells, n):
    """Histiocytes, lymphocytes and fibroblasts around the tumour cells ``cells[:n]``."""
    nt = n
    t = fields[F_TISSUE]
    f = fields[F_FAT]
    s = fields[F_STROMA]
    pts = _lattice(st, 18.0, 0.3, 8.0)
    for k in range(pts.shape[0]):
        x = pts[k, 0]
        y = pts[k, 1]
        iy = _pix(y)
        ix = _pix(x)
        p = t[iy, ix] * (1.0 - f[iy, ix]) * (1.0 - s[iy, ix]) * sl[S_HISTIO]
        if _u(st) < p and n < MAX_CELLS and _clear_of(cells, nt, x, y, 0.0):
            _histiocyte(cells[n], st, sl, x, y)
            n += 1
    big = n  # cells with bodies: lymphocytes and fibroblasts keep out of them
    dens = _uni(st, 0.85, 0.98)
    pts = _lattice(st, sl[S_LYMPH_D] * _uni(st, 0.92, 1.08), 0.22, 8.0)
    for k in range(pts.shape[0]):
        x = pts[k, 0]
        y = pts[k, 1]
        iy = _pix(y)
        ix = _pix(x)
        p = t[iy, ix] * (1.0 - f[iy, ix]) * (1.0 - 0.9 * s[iy, ix]) * dens
        if _u(st) < p and n < MAX_CELLS and _clear_of(cells, big, x, y, 0.5):
            _lymphocyte(cells[n], st, sl, x, y)
            n += 1
    pts = _lattice(st, 11.0, 0.35, 8.0)
    for k in range(pts.shape[0]):
        x = pts[k, 0]
        y = pts[k, 1]
        iy = _pix(y)
        ix = _pix(x)
        p = t[iy, ix] * (1.0 - f[iy, ix]) * s[iy, ix] * 0.35
        if _u(st) < p and n < MAX_CELLS and _clear_of(cells, big, x, y, 1.0):
            _fibroblast(cells[n], st, sl, x, y, fields[F_ANGLE, iy, ix])
            n += 1
    return n


@jit
def _paint_vector(st, sl, par, tsz):
    """Per-patch stain and texture parameters around the slide's."""
    # Within a slide, staining still drifts a little from field to field.
    gh = math.exp(0.05 * _normal(st))
    ge = math.exp(0.07 * _normal(st))
    for c in range(3):
        par[P_H + c] = sl[S_H + c] * gh
        par[P_E + c] = sl[S_E + c] * ge
        par[P_BG + c] = _uni(st, 0.0, 0.02)
        par[P_WHITE + c] = sl[S_WHITE + c]
    par[P_BLUR] = sl[S_BLUR] * math.exp(0.1 * _normal(st))
    par[P_NOISE] = sl[S_NOISE]
    par[P_LYMPH_E] = _uni(st, 0.08, 0.22)
    par[P_LYMPH_H] = _uni(st, 0.06, 0.16)
    par[P_STROMA_E] = _uni(st, 0.25, 0.6)
    par[P_STROMA_H] = _uni(st, 0.0, 0.06)
    par[P_FIBRE_FREQ] = _uni(st, 0.6, 1.6)
    par[P_MEMB_E] = _uni(st, 0.2, 0.5)
    par[P_MEMB_W] = _uni(st, 0.35, 0.7)
    par[P_GLASS_E] = _uni(st, 0.0, 0.04)
    par[P_TEX_AMP] = _uni(st, 0.1, 0.35)
    par[P_NOISE_X] = int(_u(st) * tsz)
    par[P_NOISE_Y] = int(_u(st) * tsz)
    par[P_TEX_X] = int(_u(st) * tsz)
    par[P_TEX_Y] = int(_u(st) * tsz)


@jit
def build_scene(st, sl, target, raw, fields, tum, cells, seeds, par, tsz):
    """Draw one patch: its fields, cells, fat seeds and paint vector.

    Parameters
    ----------
    st : int64 (1,) generator state (see :func:`patch_state`), advanced
    sl : float64 (N_SLIDE,) the slide's style
    target : T_NEG, T_PERIPH or T_POS
    raw : float32 (N_RAW, T, T) shared smooth-noise tiles
    fields, tum, cells, seeds, par : written (see :func:`render_batch`)
    tsz : size of the chromatin / sensor-noise tiles

    Returns
    -------
    (n_cells, n_seeds)
    """
    blank = target == T_NEG and _u(st) < sl[S_BLANK_P]
    q = _scene_vector(st, sl, target, blank)
    span = raw.shape[1] - SIZE
    off = np.empty((N_RAW, 2), np.int64)
    for p in range(N_RAW):
        off[p, 0] = int(_u(st) * span)
        off[p, 1] = int(_u(st) * span)
    compose_fields(raw, off, q, fields, tum)
    # Most specific cells first: later kinds avoid the bodies of earlier ones.
    n = 0
    if target != T_NEG:
        n = _place_tumour(st, sl, target, q, tum, cells)
    if not blank:
        n = _place_others(st, sl, fields, cells, n)
    ns = 0
    if q[Q_FAT_ON] > 0.5:
        fd = _uni(st, 34.0, 62.0)  # adipocytes are 50-100 um: 50-100 px at PCam's 0.97 um/px
        pts = _lattice(st, fd, 0.3, fd)
        ns = min(pts.shape[0], MAX_SEEDS)
        for k in range(ns):
            seeds[k, 0] = pts[k, 0]
            seeds[k, 1] = pts[k, 1]
    _paint_vector(st, sl, par, tsz)
    return n, ns


# ---------------------------------------------------------------- painting


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
def _background(fields, par, seeds, hmap, emap, memb, grain):
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
def _cytoplasm(cells, hmap, emap, tex, tx, ty, tmask):
    """Paint cell bodies (tumour, histiocytes) and mark tumour footprints.

    The tumour footprint of a cell is every pixel centre within its
    cytoplasm radius: ``(x - cx)**2 + (y - cy)**2 <= r**2``, which is the
    exact rule :func:`pcamtool.synth.tumour_touches_centre` re-checks.
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
def _nuclei(cells, hmap, emap, tex, tx, ty):
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
def _to_rgb(hmap, emap, par, noise, out, img, tmp, buf, trans):
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
        _background(fields, par, seeds[:ns], hmap, emap, memb, tex)
        _cytoplasm(cells[:nc], hmap, emap, tex, tx, ty, tmask[i])
        _nuclei(cells[:nc], hmap, emap, tex, tx, ty)
        _to_rgb(hmap, emap, par, noise, out[i], img, tmp, buf, trans)
        if cells_out.shape[0] > 0:
            for j in range(nc):
                for k in range(N_CELL):
                    cells_out[i, j, k] = cells[j, k]
            ncell_out[i] = nc
