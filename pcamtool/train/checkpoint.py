"""Self-describing checkpoints: any stage rebuilds the model from the file alone.

A checkpoint holds the model's factory arguments, its weights (EMA weights
when EMA is on), the normalization statistics and stain normalization the
model was trained with, where it came from, and, for ``last.pt``, the
optimizer state needed to resume. Only plain types and tensors go in, so it
loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import ModelError
from ..io.fsutil import atomic_path

FORMAT = "pcamtool-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus format markers) atomically."""
    payload = {"format": FORMAT, "version": VERSION, "pcamtool_version": __version__, **payload}
    with atomic_path(path, force=True) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ModelError(f"{path}: not a pcamtool checkpoint")
    if ckpt.get("version") != VERSION:
        raise ModelError(f"{path}: checkpoint version {ckpt.get('version')}, this pcamtool reads {VERSION}")
    return ckpt


def build_model(ckpt: dict[str, Any]) -> torch.nn.Module:
    """The :class:`~pcamtool.preprocess.Classifier` of a checkpoint, weights loaded, in eval mode."""
    from ..models import create_model
    from ..contract import Classifier

    spec = ckpt["model"]
    net = Classifier(create_model(spec["name"], **spec.get("kwargs", {})),
                  torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"]))
    try:
        net.load_state_dict(ckpt["weights"])
    except RuntimeError as exc:
        raise ModelError(f"checkpoint weights do not fit model {spec['name']}: {str(exc).splitlines()[0]}") from None
    return net.eval()
