"""Frozen, validated configurations: training and its augmentation.

The CLI hands its options to :meth:`TrainConfig.from_options`; the library
never sees a parsed-argument namespace. Every check lives in the dataclasses
themselves, so a config built in Python or read back from a run's
``config.json`` (``TrainConfig.from_dict(..., source=path)``) is held to the
same rules as one from the command line, and a bad value is one line naming
the option. ``config.json`` in a run folder is ``TrainConfig.to_dict()``
with everything resolved.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import numpy as np

from .errors import PcamError
from .models import DEFAULT_MODEL, is_timm, resolve_model_args, transfer_kwargs
from .system import cpu_threads

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
# The most epochs a run takes: far beyond any useful run (the auto default is at most 40), and a bound
# for a config.json or library caller the command line's own limit does not reach.
MAX_EPOCHS = 10_000
AUTO_MIN_EPOCHS = 10
AUTO_MAX_EPOCHS = 40


def auto_epochs(n_train: int) -> int:
    """Default epoch count for ``n_train`` training rows (small sets get more passes)."""
    if n_train < 1:
        raise PcamError("no training rows")
    return int(min(AUTO_MAX_EPOCHS, max(AUTO_MIN_EPOCHS, round(AUTO_SAMPLES / n_train))))


# Above this many torch threads per core, extra threads only contend; far
# above it libgomp fails to create them (an ImportError or a segfault deep in
# torch, depending on the ulimit).
THREADS_PER_CORE = 4


def max_threads() -> int:
    """The most CPU threads ``--threads`` accepts: THREADS_PER_CORE per usable core."""
    return THREADS_PER_CORE * cpu_threads()


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return _is_int(v) or isinstance(v, (float, np.floating))


# What each annotated type accepts, and how a message calls it.
_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "a whole number"),
    "float": (_is_number, "a number"),
    "str": (lambda v: isinstance(v, str), "text"),
    "bool": (lambda v: isinstance(v, (bool, np.bool_)), "true or false"),
    "dict[str, Any]": (lambda v: isinstance(v, dict), "a mapping"),
    "AugmentConfig": (lambda v: isinstance(v, AugmentConfig), "an AugmentConfig"),
}

# Command-line spelling of the fields whose option is not simply --field-name.
_FLAGS = {"store": "STORE", "out": "--output", "warmup_frac": "--warmup", "model_kwargs": "--model-arg",
          "brightness": "--color-strength",
          "contrast": "--color-strength", "saturation": "--color-strength", "hue": "--color-strength"}


def flag(name: str) -> str:
    """How the user spells the option behind config field ``name`` (``warmup_frac`` -> ``--warmup``)."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def option_flags(overrides: dict[str, Any]) -> list[str]:
    """The options behind an ``overrides`` dict (see :meth:`TrainConfig.from_options`), for messages."""
    names: list[str] = []
    for key, value in overrides.items():
        for k in (value if key == "augment" else [key]):
            if flag(k) not in names:
                names.append(flag(k))
    return names


# Options of `pcamtool train` that are not TrainConfig fields by the same name.
_RENAMED = {"compile_": "compile", "export_": "export"}
# Fields holding file or folder paths (compared as resolved paths, converted from Path objects).
PATH_FIELDS = ("store", "out", "val_store", "groups", "init_weights", "pretrained")
_COLOR = ("brightness", "contrast", "saturation", "hue")
# Model arguments that a training option of the same name overwrites (timm networks: TrainConfig.img_size
# is always passed on), so --model-arg would be recorded and ignored. (--model-arg pretrained=... is
# passed on when --pretrained is not given, so it stays allowed.)
_OPTION_ARGS = ("img_size",)
# Options that choose the validation split; --val-store replaces the split.
_SPLIT = ("val_frac", "folds", "fold", "groups")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run (defaults chosen on real tissue; see README).

    Raises
    ------
    PcamError
        On construction, a value of the wrong type or out of range, naming
        the command-line option (``--lr must be a finite positive number``),
        an unknown model or model argument, or a ``groups`` file that does
        not exist.
    """

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
    pretrained: Optional[str] = None      # timm: networks: "hub" (timm's download) or a local weights file
    img_size: int = 96                    # timm: networks: side the network sees (upscaled inside the graph)
    freeze_epochs: Optional[int] = None   # None: train.finetune.default_recipe (1 with pretrained weights, else 0)
    lr_backbone_mult: Optional[float] = None  # None: default_recipe (0.1 with pretrained weights, else 1)
    tensorboard: Optional[str] = None     # TensorBoard log folder (pcamtool.train.tblog); None: no logging

    def __post_init__(self) -> None:
        self._check_types()
        folds = self.folds
        checks = [
            (self.epochs is None or self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.epochs is None or self.epochs <= MAX_EPOCHS,
             f"--epochs must be at most {MAX_EPOCHS:,}, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be a finite positive number, got {self.lr}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"--weight-decay must be a finite number >= 0, got {self.weight_decay}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r} ({', '.join(OPTIMIZERS)})"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r} ({', '.join(SCHEDULES)})"),
            (0 <= self.warmup_frac < 1, f"--warmup must be in [0, 1), got {self.warmup_frac}"),
            (0 <= self.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}"),
            (0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}"),
            (self.patience >= 0, f"--patience must be >= 0, got {self.patience}"),
            (0 < self.val_frac < 1, f"--val-frac must be between 0 and 1 (both excluded), got {self.val_frac}"),
            (folds is not None or self.fold == 0, f"--fold {self.fold} needs --folds (the number of folds)"),
            (folds is None or folds >= 2, f"--folds must be at least 2, got {folds}"),
            (folds is None or 0 <= self.fold < folds,
             f"--fold {self.fold} is not one of the {folds} folds (0 to {(folds or 1) - 1})"),
            (self.threads is None or 1 <= self.threads <= max_threads(),
             f"--threads must be between 1 and {max_threads()} ({THREADS_PER_CORE} per core this process "
             f"may use), got {self.threads}"),
            (self.max_train is None or self.max_train >= 1, f"--max-train must be at least 1, got {self.max_train}"),
            (self.groups is None or not os.path.isdir(self.groups),
             f"--groups {self.groups}: is a folder, expected an id,group CSV file"),
            (self.groups is None or os.path.isfile(self.groups), f"--groups {self.groups}: file not found"),
            (self.freeze_epochs is None or self.freeze_epochs >= 0,
             f"--freeze-epochs must be >= 0, got {self.freeze_epochs}"),
            (self.lr_backbone_mult is None or 0 < self.lr_backbone_mult <= 1,
             f"--lr-backbone-mult must be in (0, 1], got {self.lr_backbone_mult}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PcamError(msg)
        for key in _OPTION_ARGS:
            # the option of the same name decides it (transfer_kwargs overwrites the argument with the
            # option's value), so an argument would be recorded in config.json yet ignored
            if key in self.model_kwargs and is_timm(self.arch):   # built-in models refuse it themselves
                raise PcamError(f"--model-arg {key}={self.model_kwargs[key]}: {key} is set with {flag(key)}, "
                                f"not as a model argument")
        self.resolved_model_args()

    def resolved_model_args(self) -> dict[str, Any]:
        """Every argument of the model factory, defaults filled in (what checkpoints record)."""
        return resolve_model_args(self.arch, transfer_kwargs(self.arch, self.model_kwargs, self.pretrained,
                                                             self.img_size))

    def _check_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = str(f.type)
            if kind.startswith("Optional["):
                if value is None:
                    continue
                kind = kind[len("Optional["):-1]
            accepts, what = _TYPES[kind]
            if not accepts(value):
                raise PcamError(f"{flag(f.name)} must be {what}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: Optional[str | os.PathLike] = None) -> "TrainConfig":
        """The config ``to_dict`` wrote (unknown keys ignored, so older files still load).

        ``source`` (e.g. the ``config.json`` path) prefixes every error message.

        Raises
        ------
        PcamError
            ``d`` is not a mapping, or a value fails validation.
        """
        where = f"{source}: " if source is not None else ""
        if not isinstance(d, dict) or not isinstance(d.get("augment", {}), dict):
            raise PcamError(f"{where}not a training configuration (expected a JSON object with an "
                            f"'augment' object)")
        known = {f.name for f in dataclasses.fields(cls)}
        aug_known = {f.name for f in dataclasses.fields(AugmentConfig)}
        try:
            augment = AugmentConfig(**{k: v for k, v in d.get("augment", {}).items() if k in aug_known})
            return cls(**{**{k: v for k, v in d.items() if k in known}, "augment": augment})
        except PcamError as exc:
            raise PcamError(f"{where}{exc}") from None

    @classmethod
    def from_options(cls, **opts: Any) -> tuple["TrainConfig", dict[str, Any]]:
        """A validated config from the options of ``pcamtool train``, and which of them the user gave.

        Parameters
        ----------
        **opts
            The command's options by their Python names: TrainConfig field
            names, ``compile_`` and ``export_`` (the CLI's names for
            ``compile`` and ``export``), the AugmentConfig field names
            (``flip``, ``hed_sigma``, ...) and ``color_strength`` (scales
            the four colour jitters of the default recipe). None or ``{}``
            means not given; paths may be ``Path`` objects.

        Returns
        -------
        (TrainConfig, dict)
            The config, and ``overrides``: each option the user gave, by
            TrainConfig field name, with the value it got (``"store"`` when
            a store was given; ``"augment"`` maps to the AugmentConfig fields
            given, ``--color-strength`` showing as the four it scales).
            :func:`option_flags` spells them back as options for messages.

        Raises
        ------
        PcamError
            As the constructor; also ``--fold`` without ``--folds``,
            split options beside ``--val-store`` (which replaces the split),
            a ``--color-strength`` the colour jitters cannot take, or an
            option this config does not know.
        """
        given = {_RENAMED.get(k, k): v for k, v in opts.items() if v is not None and v != {}}
        aug_names = {f.name for f in fields(AugmentConfig)}
        known = {f.name for f in fields(cls)} - {"augment"}
        unknown = sorted(set(given) - known - aug_names - {"color_strength"})
        if unknown:
            raise PcamError(f"unknown training option(s): {', '.join(unknown)}")
        if "fold" in given and "folds" not in given:
            raise PcamError(f"--fold {given['fold']} needs --folds (the number of folds)")
        if "val_frac" in given and "folds" in given:   # make_split takes 1/K per fold and ignores val_frac
            raise PcamError(f"--val-frac {given['val_frac']} has no effect with --folds {given['folds']} "
                            f"(each fold validates on 1/{given['folds']} of the store): give one of them")
        split = [flag(k) for k in _SPLIT if k in given]
        if "val_store" in given and split:
            raise PcamError(f"--val-store replaces the train/validation split: {', '.join(split)} "
                            f"would have no effect")
        aug: dict[str, Any] = {}
        strength = given.pop("color_strength", None)
        if strength is not None:
            base = {k: getattr(AugmentConfig(), k) for k in _COLOR}
            limit = 1 / max(base.values())  # a jitter factor of 1 +- strength must stay positive
            if not _is_number(strength) or not 0 <= strength < limit:
                raise PcamError(f"--color-strength must be >= 0 and below {limit:g}, got {strength}")
            aug = {k: v * strength for k, v in base.items()}
        aug.update({k: given.pop(k) for k in list(given) if k in aug_names})
        for key in PATH_FIELDS:
            if key in given:
                given[key] = os.fspath(given[key])
        overrides = dict(given)
        if aug:
            overrides["augment"] = dict(aug)
        return cls(**given, augment=AugmentConfig(**aug)), overrides
