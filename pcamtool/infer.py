"""Predict with exported ONNX models: ``pcamtool infer --tta 8 > submission.csv``.

Images come from a folder of tifs (the same fast reader as ``pack``, on
worker threads, decoding the next batch while the current one runs) or from
a packed store. Test-time augmentation averages the dihedral transforms
(:func:`pcamtool.augment.tta_transforms`) as batched copies; several models
are averaged as an ensemble.

Example::

    pcamtool infer data/test --model runs/a/model.onnx --tta 8 -o submission.csv
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .tta import dihedral_np, tta_transforms
from .errors import ModelError, PcamError
from .io.sources import ImageSource
from .onnx_io import INPUT, open_session
from .progress import progress_bar

log = logging.getLogger("pcamtool")

@dataclass
class Predictions:
    ids: list[str]
    probs: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)


def default_source() -> Path:
    """``data/test`` (tifs) if present, else ``data/test.h5``."""
    for cand in (Path("data/test"), Path("data/test.h5")):
        if cand.exists():
            return cand
    raise PcamError("no SRC given and neither data/test nor data/test.h5 exists")


def default_models() -> list[Path]:
    from .train.runs import latest_run

    return [latest_run(want="model.onnx") / "model.onnx"]


def _stain_transform(model_stain: dict, source_stain: dict, src: Path):
    """The normalization to apply so test images match what the model was trained on."""
    m, s = model_stain.get("method", "none"), source_stain.get("method", "none")
    if s != "none" and (m != s or model_stain != source_stain):
        raise PcamError(f"{src}: images were packed with stain normalization '{s}', "
                        f"but the model was trained with '{m}' (pack the test set without --stain)")
    if m == "none" or s == m:
        return None
    from .stain import StainReference, normalize

    ref = StainReference.from_dict(model_stain)
    return lambda images: normalize(images, ref)


def predict(src: Optional[str | os.PathLike] = None, models: Optional[Sequence[str | os.PathLike]] = None,
            tta: int = 8, batch_size: int = 256, provider: str = "auto",
            shard: Optional[tuple[int, int]] = None, skip_bad: bool = False,
            workers: Optional[int] = None, progress: bool = True) -> Predictions:
    """Probabilities of tumour for every image of ``src``, averaged over TTA and models.

    Raises
    ------
    PcamError
        Missing or empty source, foreign or mismatched models, unreadable
        images (unless ``skip_bad``).
    """
    src_path = Path(src) if src is not None else default_source()
    model_paths = [Path(m) for m in models] if models else default_models()
    ks = tta_transforms(tta)
    source = ImageSource(src_path, shard, workers)
    sessions = [open_session(p, provider) for p in model_paths]
    metas = [s.get_modelmeta().custom_metadata_map for s in sessions]
    stains = {m.get("stain", '{"method": "none"}') for m in metas}
    if len(stains) > 1:
        raise ModelError("the ensemble's models were trained with different stain normalizations")
    transform = _stain_transform(json.loads(stains.pop()), source.stain(), src_path)
    probs = np.empty(len(source.ids), np.float64)
    keep = np.ones(len(source.ids), bool)
    skipped: list[tuple[str, str]] = []
    pos = 0
    with progress_bar(total=len(source.ids), desc=f"infer tta{tta}", enabled=progress) as bar:
        for images, errors in source.batches(batch_size):
            n = len(images)
            bad = [i for i, e in enumerate(errors) if e is not None]
            if bad:
                if not skip_bad:
                    raise errors[bad[0]]  # type: ignore[misc]
                for i in bad:
                    keep[pos + i] = False
                    skipped.append((errors[i].path, errors[i].problem))  # type: ignore[union-attr]
            if transform is not None:
                images = transform(images)
            # One run per TTA transform, each of ``batch_size`` images: all
            # copies in one run (8x the batch) measured 15-25% slower on a
            # CPU, whose activations then no longer fit in cache; on a GPU
            # ``--batch-size`` sets how big each run is.
            total = np.zeros(n, np.float64)
            for k in ks:
                x = np.ascontiguousarray(dihedral_np(images, k, axes=(1, 2)))
                for sess in sessions:
                    total += _run(sess, INPUT, x)
            probs[pos:pos + n] = total / (len(ks) * len(sessions))
            pos += n
            bar.update(n)
    for path, problem in skipped:
        log.warning("skipped %s: %s", path, problem)
    ids = [i for i, k in zip(source.ids, keep) if k]
    return Predictions(ids, probs[keep], skipped, sessions[0].get_providers())


def _run(sess: Any, name: str, x: np.ndarray) -> np.ndarray:
    """One forward pass through I/O binding (the same code on CPU and CUDA).

    On CUDA the binding copies the input once and keeps the output on the
    device until asked for, instead of onnxruntime's per-call staging.
    """
    binding = sess.io_binding()
    binding.bind_cpu_input(name, x)
    binding.bind_output(sess.get_outputs()[0].name)
    sess.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()[0].astype(np.float64)


def sample_beside(src: Path) -> Optional[Path]:
    """Kaggle's ``sample_submission.csv`` beside the data, if there."""
    cand = src.resolve().parent / "sample_submission.csv"
    return cand if cand.is_file() else None
