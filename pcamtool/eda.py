"""Look at the data: ``pcamtool eda STORE_OR_DIR [-o FOLDER]``.

Writes the figures users otherwise make by hand in notebooks: class balance,
sample patches per class with the central 32x32 square outlined, per-channel
intensity histograms by class, and the blank/outlier patches (near-white
glass, near-black) with their ids in ``outliers.csv``. A folder that already
holds them is refused unless ``force``; unreadable tifs fail the run unless
``skip_bad`` (then they are named in one warning), as in ``pack``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import PcamError, few
from .io.fsutil import atomic_paths, check_output_folder

log = logging.getLogger("pcamtool")

WHITE_MEAN = 220.0   # mean intensity above which a patch is (almost) only glass
WHITE_STD = 12.0     # ... and nearly flat
BLACK_MEAN = 30.0    # mean intensity below which a patch is a scanning artefact
CLASS_NAMES = {0: "normal (0)", 1: "tumour (1)", -1: "unlabelled"}
CLASS_COLOURS = {0: "#3b7dd8", 1: "#d8453b", -1: "#777777"}
OUTPUTS = ("class_balance.png", "samples.png", "channel_histograms.png", "outliers.png", "outliers.csv")


@dataclass(frozen=True)
class EdaReport:
    folder: Path
    figures: list[Path]
    class_counts: dict[str, int]
    outliers_white: list[str] = field(default_factory=list)
    outliers_black: list[str] = field(default_factory=list)


def find_outliers(images: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of near-white (glass) and near-black patches in a uint8 (N, H, W, 3) batch."""
    n = len(images)
    white = np.zeros(n, bool)
    black = np.zeros(n, bool)
    for a in range(0, n, chunk):
        x = images[a:a + chunk].reshape(min(chunk, n - a), -1).astype(np.float32)
        mean, std = x.mean(1), x.std(1)
        white[a:a + chunk] = (mean >= WHITE_MEAN) & (std <= WHITE_STD)
        black[a:a + chunk] = mean <= BLACK_MEAN
    return white, black


def _save(fig, path: Path, staged: dict[Path, Path]) -> Path:
    fig.savefig(staged[path], dpi=110, format="png")  # the temporary's suffix is not .png: say it
    return path


def check_outputs(out_dir: str | os.PathLike, force: bool) -> None:
    """Refuse a folder holding eda's outputs already (unless ``force``), before any work is done."""
    check_output_folder(out_dir, OUTPUTS, force, "eda")


def eda(src: str | os.PathLike, out_dir: str | os.PathLike, limit: Optional[int] = None, seed: int = 0,
        force: bool = False, skip_bad: bool = False) -> EdaReport:
    """Look at a store or tif folder: write the figures and ``outliers.csv`` into ``out_dir``.

    Raises
    ------
    ExistsError
        ``out_dir`` holds eda's outputs already and ``force`` is false.
    PcamError
        Bad source, or an unreadable tif without ``skip_bad``.
    """
    check_outputs(out_dir, force)
    images, labels, ids = load_for_eda(src, limit, seed, skip_bad=skip_bad)
    return run_eda(images, labels, ids, out_dir, seed=seed, title=Path(src).resolve().name, force=force)


def run_eda(images: np.ndarray, labels: Optional[np.ndarray], ids: Sequence[str], out_dir: str | os.PathLike,
            sample_per_class: int = 16, seed: int = 0, title: str = "", force: bool = False) -> EdaReport:
    """Write the EDA figures for ``images`` into ``out_dir`` (existing ones only with ``force``).

    All the outputs appear together at the end or none do (:func:`atomic_paths`):
    a run killed half-way leaves nothing that refuses the same command again.
    """
    out = Path(out_dir)
    if len(images) == 0:
        raise PcamError("no images to look at")
    check_outputs(out, force)
    with atomic_paths([out / name for name in OUTPUTS], force=force) as staged:
        return _draw(images, labels, ids, out, staged, sample_per_class, seed, title)


def _draw(images: np.ndarray, labels: Optional[np.ndarray], ids: Sequence[str], out: Path,
          staged: dict[Path, Path], sample_per_class: int, seed: int, title: str) -> EdaReport:
    """Draw every output of :func:`run_eda` into its temporary ``staged[out / name]``."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from .io.csvio import format_table

    y = np.full(len(images), -1, np.int8) if labels is None else np.asarray(labels, np.int8)
    classes = [c for c in (0, 1, -1) if (y == c).any()]
    counts = {CLASS_NAMES[c]: int((y == c).sum()) for c in classes}
    figs: list[Path] = []
    rng = np.random.default_rng(seed)

    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    bars = ax.bar(list(counts), list(counts.values()), color=[CLASS_COLOURS[c] for c in classes])
    for b, v in zip(bars, counts.values()):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,}\n({100 * v / len(y):.1f}%)", ha="center", va="bottom")
    ax.set_ylabel("patches")
    ax.set_ylim(0, max(counts.values()) * 1.2)
    ax.set_title(f"Class balance{' - ' + title if title else ''} (n={len(y):,})")
    fig.tight_layout()
    figs.append(_save(fig, out / "class_balance.png", staged))

    cols = 8
    rows_per = -(-sample_per_class // cols)
    fig = Figure(figsize=(cols * 1.3, len(classes) * rows_per * 1.45 + 0.4))
    for ci, c in enumerate(classes):
        idx = np.flatnonzero(y == c)
        pick = rng.choice(idx, min(sample_per_class, len(idx)), replace=False)
        for j, i in enumerate(pick):
            ax = fig.add_subplot(len(classes) * rows_per, cols, ci * rows_per * cols + j + 1)
            ax.imshow(images[i])
            ax.add_patch(Rectangle((31.5, 31.5), 32, 32, fill=False, lw=1.2, ec=CLASS_COLOURS[c]))
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(CLASS_NAMES[c], fontsize=8)
    fig.suptitle("Sample patches (the label is about the outlined central 32x32)", fontsize=10)
    fig.tight_layout()
    figs.append(_save(fig, out / "samples.png", staged))

    fig = Figure(figsize=(12, 3.6))
    bins = np.arange(257)
    for k, name in enumerate(("red", "green", "blue")):
        ax = fig.add_subplot(1, 3, k + 1)
        for c in classes:
            sel = images[y == c][..., k]
            hist = np.bincount(sel.ravel(), minlength=256) / max(sel.size, 1)
            ax.plot(bins[:-1], hist, color=CLASS_COLOURS[c], label=CLASS_NAMES[c])
        ax.set_title(f"{name} channel")
        ax.set_xlabel("intensity")
        ax.set_xlim(0, 255)
        if k == 0:
            ax.set_ylabel("fraction of pixels")
            ax.legend(fontsize=8)
    fig.suptitle("Per-channel intensity by class", fontsize=10)
    fig.tight_layout()
    figs.append(_save(fig, out / "channel_histograms.png", staged))

    white, black = find_outliers(images)
    bad = np.flatnonzero(white | black)
    means = images.reshape(len(images), -1).mean(1)
    staged[out / "outliers.csv"].write_text(format_table(
        ("id", "kind", "mean"), ((ids[i], "white" if white[i] else "black", f"{means[i]:.1f}") for i in bad)),
        encoding="utf-8", newline="")
    # up to 24 tiles shared between the kinds, so a few near-black ones still show beside many white ones
    w_idx, b_idx = np.flatnonzero(white), np.flatnonzero(black)
    k_black = min(len(b_idx), max(12, 24 - len(w_idx)))
    show = np.concatenate([w_idx[:24 - k_black], b_idx[:k_black]])
    fig = Figure(figsize=(cols * 1.3, max(1, -(-len(show) // cols)) * 1.5 + 0.5))
    if len(show):
        for j, i in enumerate(show):
            ax = fig.add_subplot(-(-len(show) // cols), cols, j + 1)
            ax.imshow(images[i])
            ax.set_title(f"{ids[i][:8]} {'white' if white[i] else 'black'}", fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"Outliers: {int(white.sum())} near-white (glass), {int(black.sum())} near-black "
                     f"(all listed in outliers.csv)", fontsize=10)
    else:
        fig.text(0.5, 0.5, "no near-white or near-black patches", ha="center")
    fig.tight_layout()
    figs.append(_save(fig, out / "outliers.png", staged))
    return EdaReport(out, figs, counts, [ids[i] for i in np.flatnonzero(white)], [ids[i] for i in np.flatnonzero(black)])


def load_for_eda(src: str | os.PathLike, limit: Optional[int] = None, seed: int = 0, skip_bad: bool = False
                 ) -> tuple[np.ndarray, Optional[np.ndarray], list[str]]:
    """Images, labels and ids from a store or a tif folder (a random ``limit`` of them if given).

    Raises
    ------
    BadImageError
        The first unreadable tif, unless ``skip_bad`` (then one warning names them).
    """
    from .io.sources import ImageSource

    source = ImageSource(src)
    if limit and limit < len(source):
        keep = np.sort(np.random.default_rng(seed).choice(len(source), limit, replace=False))
        source = source.subset(keep)
    images = np.empty((len(source), 96, 96, 3), np.uint8)
    ok = np.ones(len(source), bool)
    pos = 0
    bad: list[str] = []
    for batch, errors in source.batches(512):
        images[pos:pos + len(batch)] = batch
        ok[pos:pos + len(batch)] = [e is None for e in errors]
        pos += len(batch)
        found = [e for e in errors if e is not None]
        if found and not skip_bad:
            raise found[0]
        bad.extend(os.path.basename(e.path) for e in found)
    if bad:
        log.warning("%s: skipped %d unreadable image(s): %s", src, len(bad), few(bad))
    labels = source.labels()
    ids = [i for i, k in zip(source.ids, ok) if k]
    return images[ok], (labels[ok] if labels is not None else None), ids
