"""The model contract: :class:`Checkpoint`, written by training and read by export, quantize, cv and infer.

A checkpoint says everything a later stage needs to rebuild and use the
model from the file alone: the model factory's name and arguments, the
weights, the normalization statistics, the stain reference (a typed
:class:`~pcamtool.stain.StainReference`), the store it was trained on, the
training config (so the validation split can be rebuilt: :meth:`Checkpoint.validation_rows`),
the precision, the TTA that ``infer`` applies by default, and, for
``last.pt``, the state needed to resume. It travels as a ``.pt`` file
(:meth:`~Checkpoint.save` / :meth:`~Checkpoint.load`, plain types and tensors only, so
``torch.load(weights_only=True)`` reads it) and as ONNX metadata
(:meth:`~Checkpoint.to_onnx_metadata` / :meth:`~Checkpoint.from_onnx_metadata`). Files
written before this class existed (checkpoint version 1, ONNX format 1)
load unchanged: every field added since has a default.

torch is imported only where weights are handled, so ``infer`` reads ONNX
metadata without it.

Example::

    ck = Checkpoint.load("runs/a/best.pt")
    net = ck.build_model()
    rows = ck.validation_rows(open_store(ck.store_path))
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .. import __version__
from ..constants import DEFAULT_TTA, PATCH_SHAPE, TTA_CHOICES
from ..errors import MissingExtraError, ModelError, PcamError
from ..stain import StainReference

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..io.store import Store

FORMAT = "pcamtool-checkpoint"
VERSION = 1            # additive changes keep version 1: older readers ignore keys they do not know
ONNX_FORMAT = "pcamtool-onnx"
ONNX_VERSION = "1"
# Options of a recorded config that say where and how fast a run went, not what it learnt:
# a checkpoint from a 64-core machine (--threads 200) must still rebuild its split on a laptop.
_MACHINE_KEYS = ("threads", "device", "cache", "compile")
# What last.pt adds to best.pt's payload so a run resumes exactly (pcamtool.train.resume writes them).
STATE_KEYS = ("train_weights", "optimizer", "scheduler", "scaler", "sampler", "rng")


def split_rows(cfg: "TrainConfig", store: "Store") -> tuple[np.ndarray, np.ndarray]:
    """``(train rows, validation rows)`` of ``store`` for a run configured by ``cfg``: the one split.

    Training (:func:`pcamtool.train.fit`), cv's folds, the int8 check and
    :meth:`Checkpoint.validation_rows` all call this. The split is
    stratified, K-fold with ``cfg.folds``, and grouped by
    :func:`~pcamtool.train.split.resolve_groups` (a ``--groups`` CSV, or the
    slides a store carries) so slides do not leak; ``cfg.max_train`` draws
    that many training rows. With ``cfg.val_store`` every row of ``store``
    trains (the validation rows are the other store's).

    Raises
    ------
    PcamError
        A groups file that is missing or lacks ids, too few groups or images of
        a class for the split.
    """
    from .split import make_split, resolve_groups

    if cfg.val_store:
        tr, va = np.arange(len(store)), np.arange(0)
    else:
        if cfg.groups and not Path(cfg.groups).is_file():
            what = "is a folder, expected an id,group CSV file" if Path(cfg.groups).is_dir() else "file not found"
            raise PcamError(f"--groups {cfg.groups}: {what} (the split groups by it; without it "
                            f"slides would leak between training and validation)")
        tr, va = make_split(store.labels, cfg.val_frac, cfg.seed, cfg.folds, cfg.fold,
                            resolve_groups(store, cfg.groups))
    if cfg.max_train is not None and cfg.max_train < len(tr):
        tr = np.sort(np.random.default_rng(cfg.seed).choice(tr, cfg.max_train, replace=False))
    return np.asarray(tr), np.asarray(va)


@dataclass(frozen=True)
class Checkpoint:
    """One trained model and where it came from (see the module docstring).

    ``weights`` is empty for a checkpoint read from ONNX metadata;
    ``training_state`` is set for ``last.pt`` only (optimizer, schedule,
    scaler, sampler, random generators, the raw weights; see
    :mod:`pcamtool.train.resume`).
    """

    arch: str
    model_kwargs: dict[str, Any]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: dict[str, Any] = field(default_factory=dict, repr=False)
    stain: StainReference = field(default_factory=lambda: StainReference("none"))
    store_path: Optional[str] = None      # the training store, resolved when written
    store_count: Optional[int] = None     # its rows
    config: dict[str, Any] = field(default_factory=dict, repr=False)   # TrainConfig.to_dict() of the run
    precision: str = "fp32"               # what training computed in (bf16, fp16 or fp32)
    epoch: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list, repr=False)
    val_auc: float = float("nan")         # this epoch's validation AUC
    best_auc: float = float("nan")
    best_epoch: int = 0
    tta_default: int = DEFAULT_TTA        # infer's --tta when none is given
    pcamtool_version: str = __version__
    training_state: Optional[dict[str, Any]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tta_default not in TTA_CHOICES:
            raise ModelError(f"tta_default {self.tta_default!r} is not one of {TTA_CHOICES}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            try:
                arr = np.asarray(v, np.float64)
            except (TypeError, ValueError):
                arr = np.empty(0)
            if arr.shape != (3,) or not np.isfinite(arr).all():
                raise ModelError(f"checkpoint {name} must be 3 finite numbers, got {str(v)[:60]}")
            object.__setattr__(self, name, tuple(float(x) for x in arr))

    # --------------------------------------------------------------- the .pt file

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint file's payload (plain types and tensors: loads with ``weights_only=True``)."""
        out = {
            "format": FORMAT, "version": VERSION, "pcamtool_version": self.pcamtool_version,
            "model": {"name": self.arch, "kwargs": self.model_kwargs},
            "weights": self.weights,
            "mean": list(self.mean), "std": list(self.std),
            "stain": self.stain.to_dict(),
            "store": {"path": self.store_path, "count": self.store_count},
            "config": self.config,
            "precision": self.precision,
            "epoch": self.epoch, "metrics": self.metrics, "val_auc": self.val_auc,
            "best_auc": self.best_auc, "best_epoch": self.best_epoch,
            "tta_default": self.tta_default,
        }
        return {**out, **(self.training_state or {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str | os.PathLike = "checkpoint") -> "Checkpoint":
        """The checkpoint of a payload :meth:`to_dict` (or an older pcamtool) wrote.

        Raises
        ------
        ModelError
            Not a pcamtool checkpoint, another version, or a field that does not parse.
        """
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ModelError(f"{where}: not a pcamtool checkpoint")
        if d.get("version") != VERSION:
            raise ModelError(f"{where}: checkpoint version {d.get('version')}, this pcamtool reads {VERSION}")
        weights = d.get("weights")
        if weights is None:
            weights = {}
        if not isinstance(weights, dict):   # a bare tensor or list: no parameter names to load by
            raise ModelError(f"{where}: checkpoint weights are a {type(weights).__name__}, not a state dict "
                             f"(parameter name -> tensor)")
        try:
            model, store = d["model"], d.get("store") or {}
            state = {k: d[k] for k in STATE_KEYS if k in d}
            return cls(arch=str(model["name"]), model_kwargs=dict(model.get("kwargs") or {}),
                       mean=d["mean"], std=d["std"], weights=weights,
                       stain=StainReference.from_dict(d.get("stain")),
                       store_path=store.get("path"), store_count=store.get("count"),
                       config=dict(d.get("config") or {}), precision=str(d.get("precision", "fp32")),
                       epoch=int(d.get("epoch", 0)), metrics=list(d.get("metrics") or []),
                       val_auc=float(d.get("val_auc", float("nan"))),
                       best_auc=float(d.get("best_auc", d.get("val_auc", float("nan")))),
                       best_epoch=int(d.get("best_epoch", 0)), tta_default=int(d.get("tta_default", DEFAULT_TTA)),
                       pcamtool_version=str(d.get("pcamtool_version", "?")), training_state=state or None)
        except MissingExtraError:   # the file is fine; the environment lacks a package
            raise
        except PcamError as exc:   # first: PcamError is a ValueError too, and already says what is wrong
            raise ModelError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: checkpoint lacks or garbles {exc} ({type(exc).__name__})") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the checkpoint atomically; a full disk is one line naming ``path``."""
        import torch

        from ..io.fsutil import WholeWrites
        from .runs import writing

        # torch.save's own writer reports a full disk as "[enforce fail at
        # inline_container.cc]"; writing through WholeWrites raises ENOSPC.
        with writing(Path(path), "checkpoint") as tmp, WholeWrites(tmp) as f:
            torch.save(self.to_dict(), f)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Checkpoint":
        """Read a checkpoint file (``torch.load(weights_only=True)``: nothing in it runs).

        Raises
        ------
        ModelError
            Missing, unreadable, not ours, or another version.
        """
        import torch

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: checkpoint not found")
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and torch errors alike
            raise ModelError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__})") from None
        return cls.from_dict(d, path)

    def without_training_state(self) -> "Checkpoint":
        return replace(self, training_state=None)

    # -------------------------------------------------------------- the model

    def build_model(self, where: Optional[str | os.PathLike] = None) -> Any:
        """The :class:`~pcamtool.contract.Classifier` with these weights, on the CPU, in eval mode.

        ``where`` (the checkpoint's file) starts any error message; the
        checkpoint itself does not know where it was read from.

        Raises
        ------
        ModelError
            No weights (a checkpoint read from ONNX metadata), or weights that do not fit.
        """
        import torch

        from ..contract import Classifier
        from ..models import create_model, without_pretrained
        from .runs import load_weights

        label = f"{where}: model {self.arch}" if where is not None else f"model {self.arch}"
        if not self.weights:
            raise ModelError(f"{label}: this checkpoint holds no weights")
        # the weights are here: never reload (or download) a pretrained file
        try:
            backbone = create_model(self.arch, **without_pretrained(self.model_kwargs))
        except MissingExtraError:   # the file is fine; the environment lacks a package
            raise
        except PcamError as exc:   # recorded arguments this pcamtool cannot build (edited, or another version's)
            if where is None:
                raise
            raise ModelError(f"{where}: {exc}") from None
        net = Classifier(backbone, torch.tensor(self.mean), torch.tensor(self.std))
        load_weights(net, self.weights, f"{where}: checkpoint of model {self.arch}" if where is not None
                     else f"checkpoint of model {self.arch}")
        return net.eval()

    # -------------------------------------------------------------- the split

    def train_config(self) -> "TrainConfig":
        """The run's :class:`~pcamtool.config.TrainConfig`, as recorded (machine options reset)."""
        from ..config import TrainConfig

        if not self.config:
            raise PcamError(f"model {self.arch}: the checkpoint records no training config")
        cfg = {k: v for k, v in self.config.items() if k not in _MACHINE_KEYS}
        return TrainConfig.from_dict(cfg, source="checkpoint config")

    def trained_on(self, store_path: str | os.PathLike) -> bool:
        """Whether ``store_path`` is the store this model was trained on (same file)."""
        return bool(self.store_path) and Path(self.store_path).resolve() == Path(store_path).resolve()

    def split(self, store: "Store") -> tuple[np.ndarray, np.ndarray]:
        """``(train rows, validation rows)`` of the training ``store``, rebuilt as training made them.

        Raises
        ------
        PcamError
            ``store`` has another row count than the training store, or the
            split cannot be rebuilt (a groups file gone: :func:`split_rows`).
        """
        if self.store_count is not None and len(store) != self.store_count:
            raise PcamError(f"{store.path}: {len(store)} rows, the model was trained on {self.store_count}: "
                            f"not its training store")
        return split_rows(self.train_config(), store)

    def validation_rows(self, store: "Store") -> np.ndarray:
        """The rows of the training ``store`` this model was validated on (none with ``--val-store``)."""
        return self.split(store)[1]

    # -------------------------------------------------------------- ONNX metadata

    def to_onnx_metadata(self, precision: str = "fp32") -> dict[str, str]:
        """What the ONNX file says about itself (all values strings, per ONNX); ``precision`` of the graph."""
        h, w, c = PATCH_SHAPE
        auc = self.best_auc if np.isfinite(self.best_auc) else self.val_auc
        return {
            "format": ONNX_FORMAT,
            "format_version": ONNX_VERSION,
            "pcamtool_version": __version__,
            "arch": self.arch,
            "model_kwargs": json.dumps(self.model_kwargs),
            "mean": json.dumps(list(self.mean)),
            "std": json.dumps(list(self.std)),
            "stain": self.stain.to_json(),
            "input_layout": f"NHWC uint8 (batch, {h}, {w}, {c}), RGB; normalization inside the graph",
            "output": "probability of tumour in the central 32x32, float32 (batch,)",
            "val_auc": f"{auc:.6f}",
            "epoch": str(self.epoch),
            "best_epoch": str(self.best_epoch),
            "store": json.dumps({"path": self.store_path, "count": self.store_count}),
            "tta_default": str(self.tta_default),
            "precision": precision,
        }

    @classmethod
    def from_onnx_metadata(cls, meta: dict[str, str], where: str | os.PathLike = "model") -> "Checkpoint":
        """The checkpoint an ONNX file was exported from, without weights (what ``infer`` needs).

        Raises
        ------
        ModelError
            Not our format, or a field that does not parse (naming it).
        """
        if meta.get("format") != ONNX_FORMAT:
            raise ModelError(f"{where}: not a pcamtool model (no '{ONNX_FORMAT}' metadata)")
        # Additive changes keep format_version 1 (readers ignore keys they do not know), so a higher
        # version means the file changed in a way this pcamtool would misread: refuse it, never guess.
        raw_version = meta.get("format_version") or ONNX_VERSION   # files before the key existed are 1
        if not raw_version.isdigit() or int(raw_version) < 1:
            raise ModelError(f"{where}: metadata format_version {raw_version[:20]!r} is not one pcamtool writes "
                             f"(1 to {ONNX_VERSION})")
        if int(raw_version) > int(ONNX_VERSION):
            raise ModelError(f"{where}: model format_version {int(raw_version)} is newer than this pcamtool "
                             f"({__version__}) reads ({ONNX_VERSION}): upgrade pcamtool to use it")

        def get(key: str, parse: Any, default: Any) -> Any:
            if not meta.get(key):   # absent, or "" (older files wrote an empty epoch)
                return default
            try:
                return parse(meta[key])
            except (TypeError, ValueError):
                raise ModelError(f"{key} {meta[key][:60]!r} does not parse") from None   # prefixed below

        raw_tta = meta.get("tta_default", str(DEFAULT_TTA))
        if not raw_tta.isdigit() or int(raw_tta) not in TTA_CHOICES:
            raise ModelError(f"{where}: metadata tta_default {raw_tta!r} is not one of {TTA_CHOICES}")
        try:
            store = get("store", json.loads, {}) or {}
            if not isinstance(store, dict):
                raise ModelError(f"store {meta['store'][:60]!r} is not a JSON object")
            return cls(arch=meta.get("arch", "?"), model_kwargs=get("model_kwargs", json.loads, {}),
                       mean=get("mean", json.loads, [0.0] * 3), std=get("std", json.loads, [1.0] * 3),
                       stain=StainReference.from_json(meta.get("stain")),
                       store_path=store.get("path"), store_count=store.get("count"),
                       precision=meta.get("precision", "fp32"), epoch=get("epoch", int, 0),
                       best_auc=get("val_auc", float, float("nan")), best_epoch=get("best_epoch", int, 0),
                       tta_default=int(raw_tta), pcamtool_version=meta.get("pcamtool_version", "?"))
        except PcamError as exc:
            raise ModelError(f"{where}: metadata: {exc}") from None
