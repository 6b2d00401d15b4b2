"""What each synthetic patch is to be: staining centres, slides, targets, shared noise tiles.

Patches come from simulated *slides*: each slide draws its stain vectors,
stain strengths, defocus, noise and tumour phenotype once, around the means
of its staining *centre*; many patches share a slide. :func:`plan_split`
draws the slides of a split and each patch's target (positive, negative,
negative with tumour off-centre) and slide; the kernels of
:mod:`pcamtool.synth.render` draw and paint the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import schema

POS_FRACTION = 0.40
PERIPH_FRACTION = 0.08   # negatives that hold tumour outside the centre
BLANK_FRACTION = 0.007   # bare glass; near-empty tissue edges bring it to ~1 %
PATCHES_PER_SLIDE = 150
TUMOUR_SLIDE_FRACTION = 0.6

SPLIT_CODE = {"train": 1, "test": 2}

# ---------------------------------------------------------------- stain centres
# Unit OD vectors (R, G, B). Hematoxylin absorbs red and green (blue-purple
# nuclei); some labs' hematoxylin turns brown-grey (more blue absorption).
# Eosin absorbs green (pink). Strengths scale the amounts painted by the kernel.


@dataclass(frozen=True)
class _Centre:
    h: tuple[float, float, float]
    e: tuple[float, float, float]
    h_scale: float
    e_scale: float
    white: tuple[float, float, float]
    blur: float


TRAIN_CENTRES = (
    _Centre(h=(0.50, 0.76, 0.41), e=(0.20, 0.84, 0.50), h_scale=0.85, e_scale=0.78,
            white=(0.98, 0.95, 0.98), blur=0.5),   # purple hematoxylin, mauve eosin
    _Centre(h=(0.48, 0.68, 0.55), e=(0.22, 0.82, 0.52), h_scale=0.80, e_scale=0.65,
            white=(0.97, 0.94, 0.96), blur=0.65),   # brown-grey hematoxylin, dull pink
    _Centre(h=(0.52, 0.74, 0.42), e=(0.14, 0.90, 0.41), h_scale=0.85, e_scale=0.95,
            white=(0.99, 0.95, 0.98), blur=0.45),   # strong pink eosin
)
# The "other hospital": bluer hematoxylin, a more orange eosin, cooler light.
# Shifted systematically so that train -> test is a real domain shift.
TEST_CENTRE = _Centre(h=(0.56, 0.74, 0.37), e=(0.16, 0.88, 0.44), h_scale=0.90, e_scale=0.75,
                      white=(0.97, 0.96, 0.99), blur=0.55)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.01, None)
    return v / np.linalg.norm(v)


def _draw_slide(rng: np.random.Generator, centre: _Centre) -> np.ndarray:
    """One slide's style vector (``schema.S_*``): its stain around the centre's, its tissue.

    Many patches share a slide, so what is drawn here is what makes patches
    of one slide look alike and patches of two slides differ.
    """
    sl = np.zeros(schema.N_SLIDE)
    sl[schema.S_H:schema.S_H + 3] = (_unit(np.array(centre.h) + rng.normal(0, 0.05, 3))
                           * centre.h_scale * rng.lognormal(0, 0.15))
    sl[schema.S_E:schema.S_E + 3] = (_unit(np.array(centre.e) + rng.normal(0, 0.05, 3))
                           * centre.e_scale * rng.lognormal(0, 0.22))
    sl[schema.S_WHITE:schema.S_WHITE + 3] = np.clip(np.array(centre.white) + rng.normal(0, 0.012, 3), 0.85, 1.0)
    # ~7 % of slides are badly focused; the rest scatter around the centre's optics.
    sl[schema.S_BLUR] = centre.blur * rng.lognormal(0, 0.2) if rng.random() > 0.07 else rng.uniform(0.9, 1.5)
    sl[schema.S_NOISE] = rng.uniform(1.0, 3.0)
    # lymphoid, lymphoid+stroma, stroma, fat, fat+mixed
    sl[schema.S_ARCHE:schema.S_ARCHE + 5] = rng.dirichlet(np.array([0.34, 0.20, 0.14, 0.14, 0.18]) * 12)
    sl[schema.S_LYMPH_D] = rng.uniform(6.2, 8.0)
    sl[schema.S_LYMPH_R] = rng.uniform(2.7, 3.5)
    sl[schema.S_LYMPH_H] = rng.uniform(0.9, 1.35)
    sl[schema.S_TUM_R] = rng.uniform(4.8, 7.2)
    sl[schema.S_TUM_HIN] = rng.uniform(0.4, 0.65)
    sl[schema.S_TUM_RIM] = rng.uniform(0.2, 0.45)
    sl[schema.S_TUM_IRREG] = rng.uniform(0.08, 0.22)
    sl[schema.S_CYTO_RATIO] = rng.uniform(1.5, 2.0)
    sl[schema.S_CYTO_E] = rng.uniform(0.25, 0.5)
    sl[schema.S_CYTO_H] = rng.uniform(0.05, 0.20)
    sl[schema.S_NUCL_P] = rng.uniform(0.2, 0.8)
    sl[schema.S_HISTIO] = rng.uniform(0.02, 0.10)
    sl[schema.S_BLANK_P] = BLANK_FRACTION / (1 - POS_FRACTION - PERIPH_FRACTION)
    return sl


# ---------------------------------------------------------------- noise tiles

_RAW_TILE = 512   # smooth-field tiles: a patch cuts a random 96x96 window of each
_TILE = 256       # chromatin and sensor-noise tiles, read with wrap-around


def _smooth(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise (periodic), scaled to unit variance."""
    w = rng.standard_normal((size, size))
    f = np.fft.fftfreq(size)
    g = np.exp(-2 * (np.pi * sigma) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    out = np.real(np.fft.ifft2(np.fft.fft2(w) * g))
    return (out - out.mean()) / out.std()


@lru_cache(maxsize=4)
def noise_tiles(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The noise tiles shared by a run: smooth fields, chromatin texture, sensor noise.

    Cutting windows from shared tiles costs nothing per patch, where drawing
    eight smooth fields per patch was a third of the time.
    """
    rng = np.random.default_rng([seed, 77])
    raw = np.stack([_smooth(rng, _RAW_TILE, s) for s in schema.RAW_SIGMA]).astype(np.float32)
    tex = _smooth(rng, _TILE, 0.9).astype(np.float32)  # chromatin clumps are ~1-2 px
    noise = rng.standard_normal((_TILE, _TILE, 3)).astype(np.float32)
    return raw, tex, noise


def seed64(seed: int) -> int:
    """Any Python int as a non-negative 64-bit seed (numpy refuses negatives)."""
    return int(seed) % (1 << 64)


@dataclass(frozen=True)
class SplitPlan:
    slides: np.ndarray    # (n_slides, N_SLIDE)
    targets: np.ndarray   # (n,) T_*
    slide_of: np.ndarray  # (n,) slide index


def plan_split(n: int, seed: int, split: str) -> SplitPlan:
    """Slides of a split and, per patch, its target and slide."""
    rng = np.random.default_rng([seed64(seed), SPLIT_CODE[split], 0])
    n_slides = max(2, -(-n // PATCHES_PER_SLIDE))
    centres = TRAIN_CENTRES if split == "train" else (TEST_CENTRE,)
    slides = np.stack([_draw_slide(rng, centres[i % len(centres)]) for i in range(n_slides)])
    tumour = rng.random(n_slides) < TUMOUR_SLIDE_FRACTION
    tumour[0] = True  # positives need at least one tumour slide
    u = rng.random(n)
    targets = np.where(u < POS_FRACTION, schema.T_POS,
                       np.where(u < POS_FRACTION + PERIPH_FRACTION, schema.T_PERIPH, schema.T_NEG))
    # As in Camelyon, tumour (and tumour-bearing negatives) come from tumour slides only.
    tum_ids = np.flatnonzero(tumour)
    slide_of = np.where(targets == schema.T_NEG, rng.integers(0, n_slides, n),
                        tum_ids[rng.integers(0, len(tum_ids), n)])
    return SplitPlan(slides, targets.astype(np.int64), slide_of.astype(np.int64))

