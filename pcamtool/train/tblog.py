"""TensorBoard logging of a training run: ``pcamtool train --tensorboard DIR``.

Per epoch: the losses, validation AUC and accuracy, learning rate, images/s
and skipped fp16 steps as scalars, and the validation PR curve and ROC curve
(the ROC as a figure, drawn when the AUC improves); once per run: the
configuration as text and one grid of augmented training images (augmented
with a generator of its own, so training's random stream, and therefore the
run, is the same with and without logging). Each run writes
``DIR/<run folder name>``; the folds of a ``pcamtool cv`` run write
``DIR/<cv folder name>/fold<i>``, so ``tensorboard --logdir DIR`` shows them
side by side.

TensorBoard is the optional extra ``pcamtool[tensorboard]``, imported here
only; :func:`open_log` gives a stand-in that does nothing when no directory
is asked for, so the training loop has no ``if tensorboard`` branches.

Example::

    pcamtool train data/train.h5 --tensorboard tb/
    tensorboard --logdir tb/
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import MissingExtraError, PcamError

# metrics.csv column -> TensorBoard tag: the same names group the same plots across runs
SCALARS = {"train_loss": "loss/train", "val_loss": "loss/validation", "val_auc": "validation/auc",
           "val_acc": "validation/accuracy", "lr": "optimizer/lr", "img_per_s": "speed/images_per_second",
           "skipped_steps": "precision/skipped_fp16_steps", "seconds": "speed/epoch_seconds"}
GRID_IMAGES = 32
INSTALL = "TensorBoard logging needs the tensorboard package: pip install 'pcamtool[tensorboard]'"


class NullLog:
    """Does nothing: what :func:`open_log` returns when no TensorBoard directory is asked for."""

    log_dir: Optional[Path] = None

    def __enter__(self) -> "NullLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self, config: dict[str, Any], store: Any, rows: np.ndarray, augment: Any, seed: int = 0) -> None:
        pass

    def config(self, config: dict[str, Any]) -> None:
        pass

    def augmented_images(self, images: np.ndarray, augment: Any, seed: int = 0) -> None:
        pass

    def epoch(self, row: dict[str, Any], probs: Optional[np.ndarray] = None,
              labels: Optional[np.ndarray] = None, improved: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


def _writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module raises this when the tensorboard package is missing
        raise MissingExtraError(INSTALL) from None
    return SummaryWriter


class TensorBoardLog(NullLog):
    """Writes one run's events under ``log_dir``.

    Raises
    ------
    PcamError
        The tensorboard package is not installed (the message names the
        extra), or ``log_dir`` cannot be created.
    """

    def __init__(self, log_dir: str | os.PathLike) -> None:
        writer = _writer_class()
        self.log_dir = Path(log_dir)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PcamError(f"{self.log_dir}: cannot create the TensorBoard folder ({exc.strerror})") from None
        self.writer = writer(log_dir=str(self.log_dir))

    def start(self, config: dict[str, Any], store: Any, rows: np.ndarray, augment: Any, seed: int = 0) -> None:
        """Once per run: the config as text and a grid of ``store``'s first training ``rows``, augmented."""
        self.config(config)
        self.augmented_images(store.gather(np.sort(np.asarray(rows)[:GRID_IMAGES])), augment, seed)

    def config(self, config: dict[str, Any]) -> None:
        """The resolved configuration, as a JSON block in TensorBoard's Text tab."""
        text = json.dumps(config, indent=2, default=str)
        # four leading spaces make a Markdown code block: the JSON keeps its layout
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

    def augmented_images(self, images: np.ndarray, augment: Any, seed: int = 0) -> None:
        """A grid of up to 32 training images as augmentation turns them (uint8 NHWC in)."""
        import torch

        from ..augment import augment_batch
        from ..contract import to_float01

        x = torch.from_numpy(np.ascontiguousarray(images[:GRID_IMAGES]))
        gen = torch.Generator().manual_seed(seed)   # not training's generator: logging changes no result
        x01 = augment_batch(to_float01(x), augment, gen).clamp(0, 1)
        # white gutters between the tiles: without them neighbouring patches read as one image
        self.writer.add_image("train/augmented", image_grid(x01.numpy()), 0, dataformats="HWC")

    def epoch(self, row: dict[str, Any], probs: Optional[np.ndarray] = None,
              labels: Optional[np.ndarray] = None, improved: bool = False) -> None:
        """One epoch's ``metrics.csv`` row as scalars; with validation ``probs`` and ``labels`` the PR
        curve every epoch and, when ``improved``, the ROC curve as a figure."""
        step = int(row["epoch"])
        for key, tag in SCALARS.items():
            v = row.get(key)
            if v is not None and np.isfinite(float(v)):
                self.writer.add_scalar(tag, float(v), step)
        if probs is not None and labels is not None and len(probs):
            p = np.asarray(probs, np.float64)
            y = np.asarray(labels) >= 0.5
            self.writer.add_pr_curve("validation/pr_curve", y, p, step)
            if improved and 0 < y.sum() < len(y):
                self.writer.add_figure("validation/roc_curve", _roc_figure(p, y, step), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def image_grid(x01: np.ndarray, cols: int = 8, pad: int = 2) -> np.ndarray:
    """Float NCHW images in [0, 1] -> one HWC image, ``cols`` per row, with white gutters."""
    n, c, h, w = x01.shape
    rows = -(-n // cols)
    cols = min(cols, n)
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = \
            x01[i].transpose(1, 2, 0)
    return grid


def _roc_figure(p: np.ndarray, y: np.ndarray, epoch: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    fig = Figure(figsize=(4, 4), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, label=f"AUC {roc_auc_score(y, p):.4f}")
    ax.plot([0, 1], [0, 1], "--", color="0.6", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"validation ROC, epoch {epoch}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def run_log_name(run_dir: Path) -> str:
    """``<run>`` for a run, ``<cv folder>/fold<i>`` for a cv fold: cv folds group under their cv run."""
    run_dir = Path(run_dir).resolve()
    if run_dir.name.startswith("fold") and (run_dir.parent / "cv_config.json").is_file():
        return f"{run_dir.parent.name}/{run_dir.name}"
    return run_dir.name


def open_log(log_root: Optional[str | os.PathLike], run_dir: Path, main: bool = True) -> NullLog:
    """A :class:`TensorBoardLog` writing ``log_root/<run_log_name(run_dir)>``, or a :class:`NullLog`.

    The stand-in comes back when ``log_root`` is None or on a DDP rank other
    than the main one (``main=False``).
    """
    if log_root is None or not main:
        return NullLog()
    return TensorBoardLog(Path(log_root) / run_log_name(run_dir))
