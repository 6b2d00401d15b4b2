"""Export a checkpoint to ONNX and prove it matches PyTorch: ``pcamtool export``.

The graph takes what the store and the tif reader give, uint8 images
(B, 96, 96, 3) with a dynamic batch; float conversion and the channel
normalization are inside the graph, and the output is the probability of
tumour (B,). The file's metadata carries everything ``infer`` needs.

Example::

    pcamtool export runs/20261124-101500-pcamnet -o model.onnx
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import __version__
from .train.checkpoint import build_model, load_checkpoint
from .errors import ModelError, PcamError
from .io.fsutil import atomic_path
from .onnx_io import INPUT, OUTPUT, model_metadata, open_session
from .contract import ProbabilityModel
from .train.runs import latest_run

log = logging.getLogger("pcamtool")
TOLERANCE = {False: 1e-4, True: 2e-2}   # fp32, fp16: max abs difference in probability


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float
    checked_images: int
    metadata: dict[str, str]


def resolve_checkpoint(source: Optional[str | os.PathLike]) -> Path:
    """A checkpoint path from a run folder, a .pt file, or (None) the latest run's best.pt."""
    if source is None:
        return latest_run() / "best.pt"
    p = Path(source)
    if p.is_dir():
        if not (p / "best.pt").is_file():
            raise ModelError(f"{p}: run folder has no best.pt")
        return p / "best.pt"
    if not p.exists():
        raise ModelError(f"{p}: checkpoint or run folder not found")
    return p


def _check_images(ckpt: dict[str, Any], store_path: Optional[str | os.PathLike], n: int) -> np.ndarray:
    """Real images for the parity check: from the store the model was trained on, if readable."""
    from .io.store import open_store

    path = store_path or ckpt.get("store", {}).get("path")
    if path and Path(path).exists():
        store = open_store(path)
        idx = np.linspace(0, len(store) - 1, min(n, len(store))).astype(np.int64)
        return store.gather(idx)
    log.warning("training store not found: checking the export on random images")
    return np.random.default_rng(0).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)


def export_onnx(source: Optional[str | os.PathLike] = None, out: Optional[str | os.PathLike] = None,
                fp16: bool = False, opset: int = 17, store_path: Optional[str | os.PathLike] = None,
                force: bool = False, check_images: int = 64) -> ExportResult:
    """Export a checkpoint to ONNX, then check it with ``onnx.checker`` and onnxruntime.

    Raises
    ------
    ModelError
        The checkpoint is not ours, or onnxruntime disagrees with PyTorch by
        more than 1e-4 (fp32) or 2e-2 (fp16) on real images: a failed check
        is an error, and no file is left under ``out``.
    """
    import onnx


    ckpt_path = resolve_checkpoint(source)
    ckpt = load_checkpoint(ckpt_path)
    out_path = Path(out) if out is not None else ckpt_path.parent / "model.onnx"
    if not 7 <= opset <= 23:
        raise PcamError(f"--opset {opset}: choose between 7 and 23")
    net = build_model(ckpt)
    ref_model = ProbabilityModel(build_model(ckpt)).eval()
    model = ProbabilityModel(net, torch.float16 if fp16 else torch.float32).eval()
    images = _check_images(ckpt, store_path, check_images)
    meta = model_metadata(ckpt, fp16)
    with atomic_path(out_path, force=force) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(model, (torch.from_numpy(images[:2]),), str(tmp), input_names=[INPUT],
                              output_names=[OUTPUT], opset_version=opset, dynamo=False,
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        proto = onnx.load(str(tmp))
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        proto.doc_string = f"pcamtool {__version__}: {meta['arch']} tumour classifier for 96x96 PCam patches"
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ModelError(f"{out_path}: exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
        onnx.save(proto, str(tmp))
        sess = open_session(tmp, "cpu")
        got = sess.run(None, {INPUT: images})[0]
        with torch.no_grad():
            want = ref_model(torch.from_numpy(images)).numpy()
        diff = float(np.abs(got.astype(np.float64) - want).max())
        if not diff <= TOLERANCE[fp16]:
            raise ModelError(f"{out_path}: onnxruntime differs from PyTorch by {diff:.2e} "
                             f"(> {TOLERANCE[fp16]:g}) on {len(images)} images: export refused")
    log.info("exported %s -> %s (max |onnx - torch| = %.1e on %d images)", ckpt_path, out_path, diff, len(images))
    return ExportResult(out_path, diff, len(images), meta)
