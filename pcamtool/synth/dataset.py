"""Realistic synthetic H&E lymph-node patches in the Kaggle layout.

Example::

    pcamtool synth data/synth --train 20000 --test 5000 --seed 0

writes ``train/<id>.tif``, ``train_labels.csv``, ``test/<id>.tif``,
``sample_submission.csv`` and the answer key ``test_labels.csv``, with tifs
byte-for-byte in the layout of Kaggle's (27,935 bytes, pixels at offset 287).

How a patch is made
-------------------
Patches come from simulated *slides*: each slide draws its stain vectors,
stain strengths, defocus, noise and tumour phenotype once, around the means
of its staining *centre*; many patches share a slide. A patch draws a tissue
scene (lymphoid tissue, fibrous stroma, fat, glass at tissue edges, ~1 %
blank glass), optionally a tumour nest, and a list of cells (lymphocytes,
fibroblasts, histiocytes, tumour cells); :mod:`pcamtool.kernels.render`
paints it through Beer-Lambert optical density.

The label follows the PatchCamelyon rule: 1 when the footprint of a tumour
cell reaches the central 32x32 square. Negatives may hold tumour off-centre,
so a model has to look at the centre. Train labels carry ~1.5 % flips
(annotation noise); the test answer key is clean. The test split comes from
another staining centre than the train split, as Kaggle's leaderboard did.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..io.csvio import format_rows
from ..errors import ExistsError, PcamError
from ..io.fsutil import partial_name
from . import render as R
from ..progress import progress_bar
from ..system import cpu_threads

SIZE = R.SIZE
CENTRE = (32, 64)  # the labelled square: pixels 32..63 on both axes

POS_FRACTION = 0.40
PERIPH_FRACTION = 0.08   # negatives that hold tumour outside the centre
BLANK_FRACTION = 0.007   # bare glass; near-empty tissue edges bring it to ~1 %
LABEL_NOISE = 0.005      # train only: enough to be realistic, little enough not to cap AUC (1.5% capped it near 0.97)
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
    """One slide's style vector (``render.S_*``): its stain around the centre's, its tissue.

    Many patches share a slide, so what is drawn here is what makes patches
    of one slide look alike and patches of two slides differ.
    """
    sl = np.zeros(R.N_SLIDE)
    sl[R.S_H:R.S_H + 3] = (_unit(np.array(centre.h) + rng.normal(0, 0.05, 3))
                           * centre.h_scale * rng.lognormal(0, 0.15))
    sl[R.S_E:R.S_E + 3] = (_unit(np.array(centre.e) + rng.normal(0, 0.05, 3))
                           * centre.e_scale * rng.lognormal(0, 0.22))
    sl[R.S_WHITE:R.S_WHITE + 3] = np.clip(np.array(centre.white) + rng.normal(0, 0.012, 3), 0.85, 1.0)
    # ~7 % of slides are badly focused; the rest scatter around the centre's optics.
    sl[R.S_BLUR] = centre.blur * rng.lognormal(0, 0.2) if rng.random() > 0.07 else rng.uniform(0.9, 1.5)
    sl[R.S_NOISE] = rng.uniform(1.0, 3.0)
    # lymphoid, lymphoid+stroma, stroma, fat, fat+mixed
    sl[R.S_ARCHE:R.S_ARCHE + 5] = rng.dirichlet(np.array([0.34, 0.20, 0.14, 0.14, 0.18]) * 12)
    sl[R.S_LYMPH_D] = rng.uniform(6.2, 8.0)
    sl[R.S_LYMPH_R] = rng.uniform(2.7, 3.5)
    sl[R.S_LYMPH_H] = rng.uniform(0.9, 1.35)
    sl[R.S_TUM_R] = rng.uniform(4.8, 7.2)
    sl[R.S_TUM_HIN] = rng.uniform(0.4, 0.65)
    sl[R.S_TUM_RIM] = rng.uniform(0.2, 0.45)
    sl[R.S_TUM_IRREG] = rng.uniform(0.08, 0.22)
    sl[R.S_CYTO_RATIO] = rng.uniform(1.5, 2.0)
    sl[R.S_CYTO_E] = rng.uniform(0.25, 0.5)
    sl[R.S_CYTO_H] = rng.uniform(0.05, 0.20)
    sl[R.S_NUCL_P] = rng.uniform(0.2, 0.8)
    sl[R.S_HISTIO] = rng.uniform(0.02, 0.10)
    sl[R.S_BLANK_P] = BLANK_FRACTION / (1 - POS_FRACTION - PERIPH_FRACTION)
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
def _tiles(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The noise tiles shared by a run: smooth fields, chromatin texture, sensor noise.

    Cutting windows from shared tiles costs nothing per patch, where drawing
    eight smooth fields per patch was a third of the time.
    """
    rng = np.random.default_rng([seed, 77])
    raw = np.stack([_smooth(rng, _RAW_TILE, s) for s in R.RAW_SIGMA]).astype(np.float32)
    tex = _smooth(rng, _TILE, 0.9).astype(np.float32)  # chromatin clumps are ~1-2 px
    noise = rng.standard_normal((_TILE, _TILE, 3)).astype(np.float32)
    return raw, tex, noise


# ---------------------------------------------------------------- a split


def _seed64(seed: int) -> int:
    """Any Python int as a non-negative 64-bit seed (numpy refuses negatives)."""
    return int(seed) % (1 << 64)


@dataclass(frozen=True)
class _Plan:
    slides: np.ndarray    # (n_slides, N_SLIDE)
    targets: np.ndarray   # (n,) T_*
    slide_of: np.ndarray  # (n,) slide index


def _plan(n: int, seed: int, split: str) -> _Plan:
    """Slides of a split and, per patch, its target and slide."""
    rng = np.random.default_rng([_seed64(seed), SPLIT_CODE[split], 0])
    n_slides = max(2, -(-n // PATCHES_PER_SLIDE))
    centres = TRAIN_CENTRES if split == "train" else (TEST_CENTRE,)
    slides = np.stack([_draw_slide(rng, centres[i % len(centres)]) for i in range(n_slides)])
    tumour = rng.random(n_slides) < TUMOUR_SLIDE_FRACTION
    tumour[0] = True  # positives need at least one tumour slide
    u = rng.random(n)
    targets = np.where(u < POS_FRACTION, R.T_POS,
                       np.where(u < POS_FRACTION + PERIPH_FRACTION, R.T_PERIPH, R.T_NEG))
    # As in Camelyon, tumour (and tumour-bearing negatives) come from tumour slides only.
    tum_ids = np.flatnonzero(tumour)
    slide_of = np.where(targets == R.T_NEG, rng.integers(0, n_slides, n),
                        tum_ids[rng.integers(0, len(tum_ids), n)])
    return _Plan(slides, targets.astype(np.int64), slide_of.astype(np.int64))


@dataclass
class Rendered:
    """A batch of painted patches with their ground truth.

    ``labels`` are the clean PCam labels measured on the painted tumour
    footprints (``tumour_mask[:, 32:64, 32:64].any()``), before label noise.
    ``cells`` (when asked for) holds each patch's cell rows, columns as in
    :mod:`pcamtool.kernels.render` (``C_X``, ``C_Y``, ``C_KIND``, ``C_CYR`` ...).
    """

    index: np.ndarray        # (n,) patch numbers within the split
    images: np.ndarray       # uint8 (n, 96, 96, 3)
    tumour_mask: np.ndarray  # bool (n, 96, 96)
    labels: np.ndarray       # int8 (n,)
    targets: np.ndarray      # (n,) what each patch was drawn to be (render.T_*)
    slide: np.ndarray        # (n,) slide number within the split
    cells: Optional[list[np.ndarray]] = field(default=None, repr=False)


def iter_split(n: int, seed: int = 0, split: str = "train", batch: int = 256,
               with_cells: bool = False, workers: Optional[int] = None) -> Iterator[Rendered]:
    """Paint the ``n`` patches of a split, ``batch`` at a time, in order.

    Patch ``i`` depends only on ``(seed, split, n, i)`` (``n`` fixes the
    slides), never on the batching or the number of workers.

    Parameters
    ----------
    split
        ``"train"`` (three staining centres) or ``"test"`` (a fourth one).
    with_cells
        Also return every patch's cell list (for tests; costs memory).
    workers
        Threads painting batches side by side (the kernel releases the
        GIL); default: the CPU count, at most 4.
    """
    if split not in SPLIT_CODE:
        raise PcamError(f"split must be 'train' or 'test', not {split!r}")
    plan = _plan(n, seed, split)
    raw, tex, noise = _tiles(_seed64(seed))
    s64 = _seed64(seed)
    lo, hi = s64 & 0xFFFFFFFF, s64 >> 32

    def paint(b0: int) -> Rendered:
        idx = np.arange(b0, min(n, b0 + batch), dtype=np.int64)
        m = len(idx)
        images = np.empty((m, SIZE, SIZE, 3), np.uint8)
        tmask = np.empty((m, SIZE, SIZE), np.bool_)
        cells = np.zeros((m if with_cells else 0, R.MAX_CELLS, R.N_CELL))
        ncell = np.zeros(m if with_cells else 0, np.int64)
        R.render_batch(plan.slides, plan.slide_of[idx], plan.targets[idx], idx, lo, hi,
                       SPLIT_CODE[split], raw, tex, noise, images, tmask, cells, ncell)
        labels = tmask[:, CENTRE[0]:CENTRE[1], CENTRE[0]:CENTRE[1]].any((1, 2)).astype(np.int8)
        cl = [cells[k, :ncell[k]].copy() for k in range(m)] if with_cells else None
        return Rendered(idx, images, tmask, labels, plan.targets[idx], plan.slide_of[idx], cl)

    starts = range(0, n, batch)
    workers = min(4, cpu_threads()) if workers is None else max(1, workers)
    if workers == 1 or len(starts) <= 1:
        for b0 in starts:
            yield paint(b0)
        return
    # Keep at most `workers` batches in flight beyond the one being consumed:
    # bounded memory, and the writer never waits on a cold pipeline.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synth") as pool:
        pending: deque[Future[Rendered]] = deque()
        for b0 in starts:
            pending.append(pool.submit(paint, b0))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def render_split(n: int, seed: int = 0, split: str = "train", with_cells: bool = False) -> Rendered:
    """Paint a whole split in memory (tests and notebooks: ``n`` of a few thousand)."""
    parts = list(iter_split(n, seed, split, batch=256, with_cells=with_cells))
    if not parts:
        e = np.zeros(0, np.int64)
        return Rendered(e, np.zeros((0, SIZE, SIZE, 3), np.uint8), np.zeros((0, SIZE, SIZE), bool),
                        np.zeros(0, np.int8), e, e, [] if with_cells else None)
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    cells = [c for p in parts for c in p.cells] if with_cells else None
    return Rendered(cat("index"), cat("images"), cat("tumour_mask"), cat("labels"),
                    cat("targets"), cat("slide"), cells)


def tumour_touches_centre(cells: np.ndarray) -> bool:
    """The PCam rule checked on geometry: does a tumour footprint cover a centre pixel?

    A tumour cell's footprint is every pixel centre within its body radius
    ``C_CYR``; the centre is pixels 32..63 on both axes. This is computed
    independently of the painter, which marks the same footprints.
    """
    tum = cells[cells[:, R.C_KIND] == R.KIND_TUMOUR]
    if len(tum) == 0:
        return False
    g = np.arange(CENTRE[0], CENTRE[1], dtype=np.float64)
    dx = g[None, :] - tum[:, R.C_X, None]
    dy = g[None, :] - tum[:, R.C_Y, None]
    d2 = dx[:, None, :] ** 2 + dy[:, :, None] ** 2
    return bool((d2 <= (tum[:, R.C_CYR] ** 2)[:, None, None]).any())


# ---------------------------------------------------------------- files


def _tiff_header() -> bytes:
    """The 287 bytes before the pixels of every Kaggle tif.

    Kaggle's files were written by tifffile in 2018: one little-endian IFD of
    15 tags, uncompressed RGB in one strip at offset 287. Today's tifffile
    writes another layout (other tags, other offset), so the header is
    spelled out here; only the pixel bytes differ between files. DateTime
    is fixed so that a seed gives identical bytes.
    """
    desc = b'{"shape": [96, 96, 3]}\x00'
    soft = b"tifffile.py\x00"
    date = b"2018:11:15 17:21:16\x00"
    npix = SIZE * SIZE * 3
    tags = [  # (tag, type, count, value); type 2 ASCII, 3 SHORT, 4 LONG
        (254, 4, 1, 0), (256, 4, 1, SIZE), (257, 4, 1, SIZE), (258, 3, 3, 194), (259, 3, 1, 1),
        (262, 3, 1, 2), (270, 2, len(desc), 200), (273, 4, 1, 287), (277, 3, 1, 3),
        (278, 4, 1, SIZE), (279, 4, 1, npix), (284, 3, 1, 1), (305, 2, len(soft), 255),
        (306, 2, len(date), 267), (339, 3, 1, 1),
    ]
    head = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags))
    for tag, typ, count, value in tags:
        # A SHORT that fits sits left-justified in the 4-byte value field.
        val = struct.pack("<HH", value, 0) if typ == 3 and count == 1 else struct.pack("<I", value)
        head += struct.pack("<HHI", tag, typ, count) + val
    head += struct.pack("<I", 0)                      # no next IFD      -> 194
    head += struct.pack("<HHH", 8, 8, 8)              # BitsPerSample    -> 200
    head += desc + b"\x00" * 32                       # description + tifffile's slack -> 255
    head += soft + date                               # -> 287
    assert len(head) == 287
    return head


TIFF_HEADER = _tiff_header()
TIFF_SIZE = len(TIFF_HEADER) + SIZE * SIZE * 3  # 27,935


def encode_tiff(image: np.ndarray) -> bytes:
    """The bytes of a Kaggle-layout tif holding ``image`` (96, 96, 3) uint8."""
    return TIFF_HEADER + np.ascontiguousarray(image, dtype=np.uint8).tobytes()


def patch_id(seed: int, split: str, index: int) -> str:
    """A deterministic 40-hex id, like Kaggle's (which are SHA-1 digests)."""
    return hashlib.sha1(f"pcamtool-synth:{seed}:{split}:{index}".encode()).hexdigest()


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate` wrote."""

    out: Path
    train_dir: Path
    test_dir: Path
    train_labels: Path
    test_labels: Path
    sample_submission: Path
    n_train: int
    n_test: int
    train_positive_fraction: float   # of the written (noisy) train labels
    test_positive_fraction: float    # of the answer key
    train_label_flips: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.n_train} train ({self.train_positive_fraction:.1%} positive, "
                f"{self.train_label_flips} noisy labels) + {self.n_test} test "
                f"({self.test_positive_fraction:.1%} positive) patches in {self.out} "
                f"({self.seconds:.1f} s)")


def _write_split(folder: Path, n: int, seed: int, split: str, bar,
                 workers: Optional[int]) -> tuple[list[str], np.ndarray]:
    ids: list[str] = []
    labels = np.zeros(n, np.int8)
    for part in iter_split(n, seed, split, workers=workers):
        for k, i in enumerate(part.index):
            pid = patch_id(seed, split, int(i))
            ids.append(pid)
            # One write per file: creating files is what this loop waits on.
            with open(folder / f"{pid}.tif", "wb") as fh:
                fh.write(encode_tiff(part.images[k]))
        labels[part.index] = part.labels
        bar.update(len(part.index))
    return ids, labels


def _swap_in(tmp: Path, final: Path) -> None:
    """Move a finished folder onto its final name, replacing an old one."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _ours(name: str) -> bool:
    """Leftovers of a killed run of ours, which never make ``out`` count as used."""
    return name in (".train.partial", ".test.partial", ".train.old", ".test.old") or (
        name.startswith(".") and name.endswith(".csv.partial"))


def generate(out: str | os.PathLike, n_train: int = 2000, n_test: int = 500, seed: int = 0,
             force: bool = False, progress: bool = True, workers: Optional[int] = None) -> SynthSummary:
    """Write a synthetic Kaggle-layout data set into ``out``.

    Parameters
    ----------
    out
        Output folder; created if missing.
    n_train, n_test
        Number of train and test patches (either may be 0).
    seed
        Same seed, same bytes.
    force
        Write into an existing non-empty ``out``, replacing its ``train/``,
        ``test/`` and the four CSVs (nothing else there is touched).
    progress
        Show a progress bar on stderr.
    workers
        Painting threads (default: CPU count, at most 4); the bytes do not
        depend on it.

    Returns
    -------
    SynthSummary

    Raises
    ------
    ExistsError
        ``out`` exists, is not empty, and ``force`` is false.
    PcamError
        Negative counts.

    Notes
    -----
    Images go to hidden ``.train.partial`` / ``.test.partial`` folders and the
    CSVs to ``.<name>.partial`` files; everything is renamed onto its final
    name only at the end, so a killed run leaves no half data set behind.
    """
    t0 = time.perf_counter()
    if n_train < 0 or n_test < 0:
        raise PcamError(f"patch counts must be >= 0 (got train={n_train}, test={n_test})")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise PcamError(f"{root}: exists and is not a folder")
    if root.exists() and not force and any(not _ours(p.name) for p in root.iterdir()):
        raise ExistsError(root)
    root.mkdir(parents=True, exist_ok=True)

    tmp_dirs = {s: root / f".{s}.partial" for s in ("train", "test")}
    for d in tmp_dirs.values():
        if d.exists():
            shutil.rmtree(d)  # leftover of a killed run
        d.mkdir()
    try:
        with progress_bar(total=n_train + n_test, desc="synth", unit="img", enabled=progress) as bar:
            train_ids, train_y = _write_split(tmp_dirs["train"], n_train, seed, "train", bar, workers)
            test_ids, test_y = _write_split(tmp_dirs["test"], n_test, seed, "test", bar, workers)
    except BaseException:
        for d in tmp_dirs.values():
            shutil.rmtree(d, ignore_errors=True)
        raise

    # Annotation noise on the train labels only: the answer key stays the truth.
    flips = np.random.default_rng([_seed64(seed), 5]).random(n_train) < LABEL_NOISE
    train_noisy = np.where(flips, 1 - train_y, train_y)

    csvs = {
        "train_labels.csv": format_rows(train_ids, train_noisy.tolist()),
        "test_labels.csv": format_rows(test_ids, test_y.tolist()),
        "sample_submission.csv": format_rows(test_ids, [0] * len(test_ids)),
    }
    for name, text in csvs.items():
        partial_name(root / name).write_text(text, encoding="utf-8")
    for s, d in tmp_dirs.items():
        _swap_in(d, root / s)
    for name in csvs:  # CSVs last: they are what marks a data set complete
        os.replace(partial_name(root / name), root / name)

    return SynthSummary(
        out=root, train_dir=root / "train", test_dir=root / "test",
        train_labels=root / "train_labels.csv", test_labels=root / "test_labels.csv",
        sample_submission=root / "sample_submission.csv", n_train=n_train, n_test=n_test,
        train_positive_fraction=float(train_noisy.mean()) if n_train else 0.0,
        test_positive_fraction=float(test_y.mean()) if n_test else 0.0,
        train_label_flips=int(flips.sum()), seconds=time.perf_counter() - t0,
    )
