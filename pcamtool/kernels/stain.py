"""Stain normalization kernels: Reinhard (lab-space statistics) and Macenko (stain vectors).

Both work on uint8 RGB images and leave a patch with too little tissue
unchanged (blank glass has no stain to measure): never NaN, never a crash.
The same estimators (:func:`lab_stats`, :func:`macenko_estimate`) serve one
image and the pooled uint8 pixels of a reference sample, so the reference and
the patches are measured alike.

Speed comes from fused per-pixel loops with scalar 3x3 math (no temporaries,
no matmuls on (M, 3) arrays), from float32 fast log/exp where the uint8
output leaves ample room (see :func:`fast_log`), from lookup tables where an
argument is a uint8 channel value, and from a histogram selection instead of
sorting for percentiles. The results stay within one grey level of the float64 numpy
formulas in ``tests/oracles.py`` (the tests check it).
"""
from __future__ import annotations

import math

import numpy as np

from .jit import jit
from .stats import lerp_quantile, percentile_pairs

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

LN10 = math.log(10.0)
# Mean of three integer channel values <= 215.0  <=>  their sum <= 645 (exact in float32).
TISSUE_MAX_SUM = np.float32(3.0 * TISSUE_MAX_MEAN)
# Macenko optical density of each uint8 value, OD = -ln((I + 1) / 256): the same
# float64 expression the numpy formulas evaluate per pixel, so equal bit for bit.
OD_LUT = -np.log((np.arange(256) + 1.0) / 256.0)

# float32 copies for the per-pixel Reinhard math (global arrays are compile-time constants).
_RGB2LMS32 = RGB2LMS.astype(np.float32)
_LMS2LAB32 = LMS2LAB.astype(np.float32)
_LMS2RGB32 = LMS2RGB.astype(np.float32)
_FLOOR32 = np.float32(LMS_FLOOR)
_ZERO32 = np.float32(0.0)
_MAX32 = np.float32(255.0)
_I256 = np.float32(256.0)

# ---- fast float32 natural log and exp ----
#
# Range reduction on the bits (scalar ``.view``, which numba and numpy both
# support) and a short polynomial, branch-free, so LLVM vectorizes the pixel
# loops that call them. The polynomials are minimax fits (Lawson's reweighted
# least squares, rounded to float32) of just the degree the output needs:
# errors below 1e-6 (absolute for ln, relative for exp; tests/test_stain.py
# checks the bounds) move an output value by under 0.01 grey level, so only a
# value within that of a .5 rounding boundary can come out one level off the
# float64 formulas. Constants are float32 so the arithmetic stays float32
# (numba types a bare Python float as float64).
_SQRTHALF_BITS = 0x3F3504F3        # bits of float32 sqrt(0.5)
# ln(1 + f) = f - f^2/2 + f^3 P(f) on f in [sqrt(1/2) - 1, sqrt(2) - 1]: fit error < 4e-7
_LOG_P = (np.float32(0.1170744001865387), np.float32(-0.18495997786521912), np.float32(0.2049364447593689),
          np.float32(-0.2493693232536316), np.float32(0.3331744372844696))
_LN2_HI = np.float32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO, _LN2_HI exact in few bits
_LN2_LO = np.float32(-2.12194440e-4)
_HALF32 = np.float32(0.5)
_ONE32 = np.float32(1.0)
_LOG2E32 = np.float32(1.44269504088896341)
_ROUND_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer
_ROUND_MAGIC_BITS = 0x4B400000
_EXP_LO = np.float32(-87.0)        # keeps 2**n a normal float32: exp(-87) ~ 1.6e-38
_EXP_HI = np.float32(88.0)         # exp(88) ~ 1.7e38, below float32 max
# e^r = 1 + r + r^2 P(r) on |r| <= ln(2) / 2: fit error < 2e-7 relative
_EXP_P = (np.float32(0.008312477730214596), np.float32(0.041890062391757965),
          np.float32(0.16667114198207855), np.float32(0.499992311000824))


@jit(fastmath={"contract"})
def fast_log(x):
    """Natural log of a positive, normal float32; |error| < 1e-6 for x in [2**-10, 2**10].

    ``x = 2**k * m`` with ``m`` in [sqrt(1/2), sqrt(2)) read off the bits, then
    ``ln x = k ln2 + f - f**2/2 + f**3 P(f)`` with ``f = m - 1``.
    """
    i = np.float32(x).view(np.int32)
    k = (i - _SQRTHALF_BITS) >> 23
    f = np.int32(i - (k << 23)).view(np.float32) - _ONE32
    kf = np.float32(k)
    z = f * f
    p = _LOG_P[0]
    p = p * f + _LOG_P[1]
    p = p * f + _LOG_P[2]
    p = p * f + _LOG_P[3]
    p = p * f + _LOG_P[4]
    y = p * f * z + kf * _LN2_LO - _HALF32 * z
    return f + y + kf * _LN2_HI


@jit(fastmath={"contract"})
def fast_exp(x):
    """e**x of a float32 clamped to [-87, 88]; relative error < 3e-7.

    ``x = n ln2 + r`` with ``|r| <= ln2 / 2``: ``n`` by the round-by-adding
    trick, ``e**r`` by the polynomial, ``2**n`` added to the exponent bits.
    """
    x = min(max(np.float32(x), _EXP_LO), _EXP_HI)
    t = x * _LOG2E32 + _ROUND_MAGIC
    n = np.float32(t).view(np.int32) - _ROUND_MAGIC_BITS
    nf = t - _ROUND_MAGIC
    r = x - nf * _LN2_HI - nf * _LN2_LO
    p = _EXP_P[0]
    p = p * r + _EXP_P[1]
    p = p * r + _EXP_P[2]
    p = p * r + _EXP_P[3]
    e = p * (r * r) + r + _ONE32
    return np.int32(np.float32(e).view(np.int32) + (n << 23)).view(np.float32)


@jit
def _to_u8(v):
    """A float32 channel value rounded and clipped to uint8 (the numpy formulas' rint + clip)."""
    return np.uint8(min(_MAX32, max(_ZERO32, np.rint(v))))


# ---- Reinhard ----

@jit(fastmath={"contract"})
def _lab_planes(rgb, lab):
    """``lab`` (3, M) float32 <- the l-alpha-beta of every pixel of ``rgb`` (M, 3) uint8, in
    natural-log units (log10 units times ln 10)."""
    px = rgb.reshape(rgb.size)  # flat, so the loads have a compile-time stride: LLVM vectorizes
    for i in range(rgb.shape[0]):
        r = np.float32(px[3 * i])
        g = np.float32(px[3 * i + 1])
        b = np.float32(px[3 * i + 2])
        ll = fast_log(max(_RGB2LMS32[0, 0] * r + _RGB2LMS32[0, 1] * g + _RGB2LMS32[0, 2] * b, _FLOOR32))
        lm = fast_log(max(_RGB2LMS32[1, 0] * r + _RGB2LMS32[1, 1] * g + _RGB2LMS32[1, 2] * b, _FLOOR32))
        ls = fast_log(max(_RGB2LMS32[2, 0] * r + _RGB2LMS32[2, 1] * g + _RGB2LMS32[2, 2] * b, _FLOOR32))
        lab[0, i] = _LMS2LAB32[0, 0] * ll + _LMS2LAB32[0, 1] * lm + _LMS2LAB32[0, 2] * ls
        lab[1, i] = _LMS2LAB32[1, 0] * ll + _LMS2LAB32[1, 1] * lm + _LMS2LAB32[1, 2] * ls
        lab[2, i] = _LMS2LAB32[2, 0] * ll + _LMS2LAB32[2, 1] * lm + _LMS2LAB32[2, 2] * ls


@jit(fastmath={"contract", "reassoc"})  # reassoc: lets LLVM vectorize the float64 sums
def _tissue_moments(rgb, lab):
    """Count of the tissue pixels of ``rgb`` and the sums and sums of squares of their ``lab``
    values (float64 accumulators). A loop apart from :func:`_lab_planes`: fused, the two
    ran slower than both (register pressure)."""
    px = rgb.reshape(rgb.size)
    n = 0.0
    s0 = s1 = s2 = 0.0
    q0 = q1 = q2 = 0.0
    for i in range(rgb.shape[0]):
        total = np.float32(px[3 * i]) + np.float32(px[3 * i + 1]) + np.float32(px[3 * i + 2])
        w = 1.0 if total <= TISSUE_MAX_SUM else 0.0  # a weight, not a branch: vectorizes
        # float(): float64 sums in plain Python too (NumPy would keep float32 * float in float32)
        a0, a1, a2 = float(lab[0, i]), float(lab[1, i]), float(lab[2, i])
        n += w
        s0 += w * a0
        s1 += w * a1
        s2 += w * a2
        q0 += w * a0 * a0
        q1 += w * a1 * a1
        q2 += w * a2 * a2
    return n, np.array([s0, s1, s2]), np.array([q0, q1, q2])


@jit
def _lab_stats(rgb, lab):
    """:func:`lab_stats` with the scratch ``lab`` (3, M) float32, left holding every pixel's lab."""
    _lab_planes(rgb, lab)
    n, s, q = _tissue_moments(rgb, lab)
    mean = np.zeros(3)
    std = np.ones(3)
    if n < max(16, MIN_TISSUE * rgb.shape[0]):
        return mean, std, False
    for c in range(3):
        m = s[c] / n
        # E[x^2] - E[x]^2 in float64: lab values are O(10), their spread O(0.01..1), so the
        # cancellation costs a few of float64's 16 digits
        mean[c] = m / LN10
        std[c] = math.sqrt(max(q[c] / n - m * m, 0.0)) / LN10
        if not std[c] > 1e-6:
            return mean, std, False
    return mean, std, True


@jit
def lab_stats(rgb):
    """Mean and std (log10 l-alpha-beta) over the tissue pixels of (M, 3) uint8 RGB; ok=False without tissue."""
    return _lab_stats(rgb, np.empty((3, rgb.shape[0]), np.float32))


@jit(fastmath={"contract"})
def _reinhard_map(lab, a, b, out):
    """out (M, 3) uint8 <- RGB of ``exp(a @ lab + b)`` (the LMS of each pixel after the lab affine)."""
    a00, a01, a02 = np.float32(a[0, 0]), np.float32(a[0, 1]), np.float32(a[0, 2])
    a10, a11, a12 = np.float32(a[1, 0]), np.float32(a[1, 1]), np.float32(a[1, 2])
    a20, a21, a22 = np.float32(a[2, 0]), np.float32(a[2, 1]), np.float32(a[2, 2])
    b0, b1, b2 = np.float32(b[0]), np.float32(b[1]), np.float32(b[2])
    flat = out.reshape(out.size)  # flat, so the stores have a compile-time stride: LLVM vectorizes
    for i in range(out.shape[0]):
        x0, x1, x2 = lab[0, i], lab[1, i], lab[2, i]
        ll = fast_exp(a00 * x0 + a01 * x1 + a02 * x2 + b0)
        lm = fast_exp(a10 * x0 + a11 * x1 + a12 * x2 + b1)
        ls = fast_exp(a20 * x0 + a21 * x1 + a22 * x2 + b2)
        for c in range(3):
            v = _LMS2RGB32[c, 0] * ll + _LMS2RGB32[c, 1] * lm + _LMS2RGB32[c, 2] * ls
            flat[3 * i + c] = _to_u8(v)


@jit
def _reinhard_into(img, ref_mean, ref_std, out, lab):
    h, w, _ = img.shape
    rgb = img.reshape(h * w, 3)
    mean, std, ok = _lab_stats(rgb, lab)
    if not ok:
        out[...] = img
        return False
    # lab' = (lab - mean) * ref_std / std + ref_mean (log10 units) composes with lab -> log LMS into
    # one affine map on the natural-log lab the first pass left in ``lab``:
    #   ln LMS' = LAB2LMS diag(k) lab_n + LAB2LMS (ln10 ref_mean - k ln10 mean),  k = ref_std / std
    k = ref_std / std
    a = LAB2LMS * k.reshape(1, 3)
    b = LAB2LMS @ (LN10 * (ref_mean - k * mean))
    _reinhard_map(lab, a, b, out.reshape(h * w, 3))
    return True


@jit
def reinhard_batch(images, ref_mean, ref_std, out, changed):
    lab = np.empty((3, images.shape[1] * images.shape[2]), np.float32)
    for i in range(images.shape[0]):
        changed[i] = _reinhard_into(images[i], ref_mean, ref_std, out[i], lab)


# ---- Macenko ----

@jit(error_model="numpy")  # no zero-division check (the divisor is guarded): the pixel loop vectorizes
def _pseudo_angle(x, y):
    """An increasing function of ``atan2(y, x)`` on [-pi, pi], with values in [-2, 2]: ordering
    by it orders by angle (ties only where the angles tie in float64), without an atan2 per
    pixel."""
    d = abs(x) + abs(y)
    t = x / (d if d > 0.0 else 1.0)  # falls from 1 to -1 as the angle turns from 0 to +-pi
    p = 1.0 - t if math.copysign(1.0, y) > 0.0 else t - 1.0  # copysign: atan2(-0., -1) = -pi
    return 0.0 if d == 0.0 else p  # atan2(0, 0) = 0 (selects, not branches: the caller vectorizes)


@jit
def _angle(p):
    """``atan2`` of the direction whose pseudo-angle is ``p`` (inverse of :func:`_pseudo_angle`)."""
    if p >= 0.0:
        t = 1.0 - p
        return math.atan2(1.0 - abs(t), t)
    t = p + 1.0
    return math.atan2(-(1.0 - abs(t)), t)  # -0.0 at p = -2: atan2(-0., -1) = -pi


@jit
def _optical_density(rgb, od):
    """``od`` (3, M) <- the optical density planes of ``rgb`` (M, 3) uint8, by table: the
    passes below then read contiguous float64 and vectorize."""
    px = rgb.reshape(rgb.size)
    for i in range(rgb.shape[0]):
        od[0, i] = OD_LUT[px[3 * i]]
        od[1, i] = OD_LUT[px[3 * i + 1]]
        od[2, i] = OD_LUT[px[3 * i + 2]]


@jit
def _stained(o0, o1, o2):
    """A pixel carries stain: OD at least OD_BETA in every channel."""
    return (o0 >= OD_BETA) & (o1 >= OD_BETA) & (o2 >= OD_BETA)


@jit(fastmath={"contract", "reassoc"})  # reassoc: lets LLVM vectorize the float64 sums
def _od_moments(od):
    """Count, sums (3) and sums of products (3, 3) of the OD of the stained pixels."""
    n = 0.0
    s0 = s1 = s2 = 0.0
    q00 = q11 = q22 = q01 = q02 = q12 = 0.0
    for i in range(od.shape[1]):
        o0, o1, o2 = od[0, i], od[1, i], od[2, i]
        w = 1.0 if _stained(o0, o1, o2) else 0.0  # a weight, not a branch: vectorizes
        n += w
        s0 += w * o0
        s1 += w * o1
        s2 += w * o2
        q00 += w * o0 * o0
        q11 += w * o1 * o1
        q22 += w * o2 * o2
        q01 += w * o0 * o1
        q02 += w * o0 * o2
        q12 += w * o1 * o2
    return n, np.array([s0, s1, s2]), np.array([[q00, q01, q02], [q01, q11, q12], [q02, q12, q22]])


@jit
def _stain_angles(od, plane, ang):
    """``ang[i]`` <- pseudo-angle of pixel i's OD projected on the two columns of ``plane``,
    inf where the pixel carries no stain (so those sort after every stained pixel)."""
    p00, p10, p20 = plane[0, 0], plane[1, 0], plane[2, 0]
    p01, p11, p21 = plane[0, 1], plane[1, 1], plane[2, 1]
    for i in range(od.shape[1]):
        o0, o1, o2 = od[0, i], od[1, i], od[2, i]
        p = _pseudo_angle(o0 * p00 + o1 * p10 + o2 * p20, o0 * p01 + o1 * p11 + o2 * p21)
        ang[i] = p if _stained(o0, o1, o2) else np.inf


@jit
def _concentrations(od, unmix, c0, c1):
    """Least-squares H and E concentrations of every pixel: ``unmix`` (2, 3) @ OD."""
    u00, u01, u02 = unmix[0, 0], unmix[0, 1], unmix[0, 2]
    u10, u11, u12 = unmix[1, 0], unmix[1, 1], unmix[1, 2]
    for i in range(od.shape[1]):
        o0, o1, o2 = od[0, i], od[1, i], od[2, i]
        c0[i] = u00 * o0 + u01 * o1 + u02 * o2
        c1[i] = u10 * o0 + u11 * o1 + u12 * o2


@jit
def _unmix(he):
    """(2, 3) least-squares unmixing matrix ``(he^T he)^-1 he^T`` of a (3, 2) stain matrix."""
    g00 = he[0, 0] * he[0, 0] + he[1, 0] * he[1, 0] + he[2, 0] * he[2, 0]
    g11 = he[0, 1] * he[0, 1] + he[1, 1] * he[1, 1] + he[2, 1] * he[2, 1]
    g01 = he[0, 0] * he[0, 1] + he[1, 0] * he[1, 1] + he[2, 0] * he[2, 1]
    det = g00 * g11 - g01 * g01
    p = np.empty((2, 3))
    for c in range(3):
        p[0, c] = (g11 * he[c, 0] - g01 * he[c, 1]) / det
        p[1, c] = (g00 * he[c, 1] - g01 * he[c, 0]) / det
    return p


@jit
def _macenko_estimate(rgb, work):
    """:func:`macenko_estimate` with the scratch ``work`` (6, M) float64."""
    he = np.zeros((3, 2))
    max_c = np.ones(2)
    m = rgb.shape[0]
    od = work[0:3]
    _optical_density(rgb, od)
    n, s, q = _od_moments(od)
    if n < max(16, MIN_TISSUE * m):
        return he, max_c, False
    cnt = int(n)
    mean = s / n
    cov = (q - n * np.outer(mean, mean)) / (n - 1)  # np.cov's, from the sums (OD is O(1): no cancellation)
    vals, vecs = np.linalg.eigh(cov)
    if not vals[1] > 1e-12:
        return he, max_c, False
    plane = np.ascontiguousarray(vecs[:, 1:3])
    for j in range(2):  # the sign of an eigenvector is arbitrary: point into positive OD
        if plane[0, j] + plane[1, j] + plane[2, j] < 0:
            plane[:, j] = -plane[:, j]
    # The robust extreme angles of the stained pixels in that plane. Pseudo-angles order the
    # pixels as atan2 would, so their order statistics are the same pixels; only the (up to)
    # four selected ones go through atan2, then numpy's interpolation.
    ang = work[3]
    _stain_angles(od, plane, ang)
    below, above, t = percentile_pairs(ang, cnt, -2.0, 2.0, np.array([ALPHA / 100.0, (100.0 - ALPHA) / 100.0]))
    lo = lerp_quantile(_angle(below[0]), _angle(above[0]), t[0])
    hi = lerp_quantile(_angle(below[1]), _angle(above[1]), t[1])
    v1 = plane @ np.array([math.cos(lo), math.sin(lo)])
    v2 = plane @ np.array([math.cos(hi), math.sin(hi)])
    if v1[0] > v2[0]:  # hematoxylin absorbs red the most
        h_vec, e_vec = v1, v2
    else:
        h_vec, e_vec = v2, v1
    he[:, 0] = h_vec / math.sqrt((h_vec ** 2).sum())
    he[:, 1] = e_vec / math.sqrt((e_vec ** 2).sum())
    gram = he.T @ he
    if gram[0, 0] * gram[1, 1] - gram[0, 1] * gram[1, 0] < 1e-6:
        return he, max_c, False  # one stain only: the two vectors coincide
    # the 99th percentile of every pixel's concentrations
    unmix = _unmix(he)
    _concentrations(od, unmix, work[4], work[5])
    for j in range(2):
        # bounds of any concentration: OD lies in [0, OD_LUT[0]] in every channel
        lo = hi = 0.0
        for k in range(3):
            lo += min(0.0, unmix[j, k] * OD_LUT[0])
            hi += max(0.0, unmix[j, k] * OD_LUT[0])
        below, above, t = percentile_pairs(work[4 + j], m, lo, hi, np.array([0.99]))
        max_c[j] = lerp_quantile(below[0], above[0], t[0])
        if not max_c[j] > 1e-6:
            return he, max_c, False
    return he, max_c, True


@jit
def macenko_estimate(rgb):
    """Stain matrix (3, 2; H then E, unit columns) and 99th-percentile concentrations of the
    (M, 3) uint8 pixels ``rgb``.

    Returns ``(he, max_c, ok)``; ``ok`` is False when too few pixels carry
    stain or their covariance is degenerate.
    """
    return _macenko_estimate(rgb, np.empty((6, rgb.shape[0])))


@jit(fastmath={"contract"})
def _macenko_map(od, t, out):
    """out (M, 3) uint8 <- ``256 exp(-t @ OD) - 1`` of each pixel, from the OD planes (3, M).

    float32 and :func:`fast_exp`: OD' is at most O(10), so its float32 rounding and the
    exp's error move the output by ~1e-3 grey level. A huge OD' saturates at 255 (exp clamps
    its argument; 256 * exp(88) is inf in float32, clipped), never NaN.
    """
    t00, t01, t02 = np.float32(-t[0, 0]), np.float32(-t[0, 1]), np.float32(-t[0, 2])
    t10, t11, t12 = np.float32(-t[1, 0]), np.float32(-t[1, 1]), np.float32(-t[1, 2])
    t20, t21, t22 = np.float32(-t[2, 0]), np.float32(-t[2, 1]), np.float32(-t[2, 2])
    flat = out.reshape(out.size)  # flat, so the stores have a compile-time stride: LLVM vectorizes
    for i in range(od.shape[1]):
        o0, o1, o2 = np.float32(od[0, i]), np.float32(od[1, i]), np.float32(od[2, i])
        v0 = _I256 * fast_exp(t00 * o0 + t01 * o1 + t02 * o2) - _ONE32
        v1 = _I256 * fast_exp(t10 * o0 + t11 * o1 + t12 * o2) - _ONE32
        v2 = _I256 * fast_exp(t20 * o0 + t21 * o1 + t22 * o2) - _ONE32
        flat[3 * i] = _to_u8(v0)
        flat[3 * i + 1] = _to_u8(v1)
        flat[3 * i + 2] = _to_u8(v2)


@jit
def _macenko_into(img, ref_he, ref_max_c, out, work):
    h, w, _ = img.shape
    rgb = img.reshape(h * w, 3)
    he, max_c, ok = _macenko_estimate(rgb, work)
    if not ok:
        out[...] = img
        return False
    # OD' = ref_he diag(ref_max_c / max_c) unmix(he) OD: one 3x3 map on the OD planes in work
    p = _unmix(he)
    for j in range(2):
        p[j] *= ref_max_c[j] / max_c[j]
    _macenko_map(work[0:3], ref_he @ p, out.reshape(h * w, 3))
    return True


@jit
def macenko_batch(images, ref_he, ref_max_c, out, changed):
    work = np.empty((6, images.shape[1] * images.shape[2]))
    for i in range(images.shape[0]):
        changed[i] = _macenko_into(images[i], ref_he, ref_max_c, out[i], work)
