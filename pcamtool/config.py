"""Frozen, validated configurations: training and its augmentation.

The CLI turns options into keyword arguments for :class:`TrainConfig`; the
library never sees a parsed-argument namespace. ``config.json`` in a run
folder is ``TrainConfig.to_dict()`` with everything resolved.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import numpy as np

from .errors import PcamError
from .models import DEFAULT_MODEL

@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations training applies, and how strongly (defaults chosen on real tissue).

    Each augmentation has a switch and a strength; strengths are the half
    widths of uniform distributions, drawn independently per image.

    Attributes
    ----------
    flip
        Random element of D4 (flips and 90-degree rotations) per image.
    shift, shift_px
        Random translation by up to ``shift_px`` pixels on each axis, with
        reflected borders. Small, so the central 32x32 that decides the label
        stays in the centre.
    color, brightness, contrast, saturation, hue
        Colour jitter: brightness and contrast and saturation factors in
        ``1 +- strength``; hue rotation by ``+- hue`` turns about the grey axis.
    hed, hed_sigma, hed_bias
        Stain jitter in HED optical density (Tellez et al. 2019): each of the
        haematoxylin, eosin and DAB channels becomes ``alpha * c + beta`` with
        ``alpha ~ U(1 - hed_sigma, 1 + hed_sigma)`` and
        ``beta ~ U(-hed_bias, hed_bias)`` (in scikit-image ``rgb2hed`` units).
    """

    flip: bool = True
    shift: bool = False
    shift_px: int = 4
    color: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    hed: bool = False
    hed_sigma: float = 0.05
    hed_bias: float = 0.01

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(v, (bool, np.bool_)):
                    raise PcamError(f"augment.{f.name} must be true or false, got {v!r}")
            elif not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool) \
                    or not math.isfinite(v) or v < 0:
                raise PcamError(f"augment.{f.name} must be a non-negative number, got {v!r}")
        if self.shift_px != int(self.shift_px) or self.shift_px > 32:
            raise PcamError(f"augment.shift_px must be a whole number of pixels up to 32, got {self.shift_px}")
        for name in ("brightness", "contrast", "saturation", "hed_sigma"):
            if getattr(self, name) >= 1:
                raise PcamError(f"augment.{name} must be below 1 (a factor of 1 +- strength), got {getattr(self, name)}")
        if self.hue > 0.5:
            raise PcamError(f"augment.hue is in turns and must be at most 0.5, got {self.hue}")

    @classmethod
    def off(cls) -> "AugmentConfig":
        """No augmentation at all."""
        return cls(flip=False, shift=False, color=False, hed=False)

    @property
    def enabled(self) -> bool:
        return self.flip or self.shift or self.color or self.hed


OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "onecycle")


# Auto epochs: enough passes to show the model AUTO_SAMPLES training images,
# within [AUTO_MIN_EPOCHS, AUTO_MAX_EPOCHS]. On the 2,499-patch real sample
# plain4 reached validation AUC 0.936-0.942 (three runs) with 24 epochs and
# 0.948-0.950 (two seeds) with 40 (benchmarks/RESULTS.md); on large sets (the
# 176k-row training split of the full Kaggle data, 20k synthetic) 10 passes
# are plenty and what a GPU-epoch budget is planned around.
AUTO_SAMPLES = 100_000
AUTO_MIN_EPOCHS = 10
AUTO_MAX_EPOCHS = 40


def auto_epochs(n_train: int) -> int:
    """Default epoch count for ``n_train`` training rows (small sets get more passes)."""
    if n_train < 1:
        raise PcamError("no training rows")
    return int(min(AUTO_MAX_EPOCHS, max(AUTO_MIN_EPOCHS, round(AUTO_SAMPLES / n_train))))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (defaults chosen on real tissue; see README)."""

    store: str = "data/train.h5"
    out: Optional[str] = None             # run folder; default runs/<time>-<arch>
    arch: str = DEFAULT_MODEL
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: Optional[int] = None          # None: auto_epochs(training rows)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    schedule: str = "onecycle"
    warmup_frac: float = 0.15
    label_smoothing: float = 0.0
    ema: float = 0.0                      # EMA decay per step; 0 switches it off
    device: str = "auto"
    seed: int = 0
    cache: str = "auto"
    val_frac: float = 0.2
    folds: Optional[int] = None
    fold: int = 0
    val_store: Optional[str] = None
    groups: Optional[str] = None
    patience: int = 0                     # epochs without AUC gain before stopping; 0 = never
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    compile: bool = False
    threads: Optional[int] = None         # CPU threads for torch; default all cores
    init_weights: Optional[str] = None
    export: bool = False                  # export best.pt to model.onnx at the end
    max_train: Optional[int] = None       # use at most this many training rows (quick runs)

    def __post_init__(self) -> None:
        checks = [
            (self.epochs is None or self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r} ({', '.join(OPTIMIZERS)})"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r} ({', '.join(SCHEDULES)})"),
            (0 <= self.warmup_frac < 1, f"--warmup must be in [0, 1), got {self.warmup_frac}"),
            (0 <= self.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}"),
            (0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}"),
            (self.patience >= 0, f"--patience must be >= 0, got {self.patience}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PcamError(msg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        d["augment"] = AugmentConfig(**d.get("augment", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
