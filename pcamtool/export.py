"""Export a checkpoint to ONNX and prove it matches PyTorch: ``pcamtool export``.

The graph takes what the store and the tif reader give, uint8 images
(B, 96, 96, 3) with a dynamic batch; float conversion and the channel
normalization are inside the graph, and the output is the probability of
tumour (B,). The file's metadata carries everything ``infer`` needs.

Example::

    pcamtool export runs/20261124-101500-pcamnet -o model.onnx
    pcamtool export runs/20261124-101500-pcamnet --int8 -o model-int8.onnx   # for CPUs
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import __version__
from .constants import PATCH_SHAPE, TTA_CHOICES
from .contract import ProbabilityModel
from .errors import ModelError, PcamError
from .io.fsutil import atomic_path
from .onnx_io import INPUT, OUTPUT, open_session
from .quantize import CALIBRATION_IMAGES, Int8Check, quantize_checked
from .train.checkpoint import Checkpoint
from .train.runs import latest_run

log = logging.getLogger("pcamtool")
# Max |onnxruntime - PyTorch| in probability, by (fp16 weights, GPU provider). GPU
# providers compute fp32 convolutions in TF32 by default (CUDA's use_tf32, TensorRT),
# ~1e-3 relative, so the fp32 bound there is looser than the CPU's exact-math one.
TOLERANCE = {(False, False): 1e-4, (False, True): 3e-3, (True, False): 2e-2, (True, True): 2e-2}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float
    checked_images: int
    metadata: dict[str, str]
    provider: str = "CPUExecutionProvider"   # where the parity check ran
    int8: Optional[Int8Check] = None          # the int8 graph's check against fp32 (export --int8)


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


def _check_images(ck: Checkpoint, store_path: Optional[str | os.PathLike], n: int) -> np.ndarray:
    """Real images for the parity check: from the store the model was trained on, if readable."""
    from .io.store import open_store

    path = store_path or ck.store_path
    if path and Path(path).exists():
        store = open_store(path)
        idx = np.linspace(0, len(store) - 1, min(n, len(store))).astype(np.int64)
        return store.gather(idx)
    log.warning("training store not found: checking the export on random images")
    return np.random.default_rng(0).integers(0, 256, (n, *PATCH_SHAPE), dtype=np.uint8)


def _write_checked(ck: Checkpoint, tmp: Path, out_path: Path, meta: dict[str, str],
                   fp16: bool, opset: int, images: np.ndarray, provider: str,
                   where: Optional[Path] = None) -> tuple[float, str]:
    """Export to ``tmp`` with ``meta``, run onnx.checker and the parity check; ``(max diff, provider)``."""
    net = ck.build_model(where)
    ref_model = ProbabilityModel(net).eval()   # fp32, the reference even for an fp16 graph (net stays fp32)
    model = ProbabilityModel(net, torch.float16 if fp16 else torch.float32).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (torch.from_numpy(images[:2]),), str(tmp), input_names=[INPUT],
                          output_names=[OUTPUT], opset_version=opset, dynamo=False,
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    _set_metadata(_load_written(tmp, out_path), meta, tmp, out_path)
    sess = open_session(tmp, provider, batch_size=len(images), tta=1)
    got = sess.run(images)
    with torch.no_grad():
        want = ref_model(torch.from_numpy(images)).numpy()
    diff = float(np.abs(got - want).max())
    bound = TOLERANCE[(fp16, sess.providers[0] != "CPUExecutionProvider")]
    if not diff <= bound:
        raise ModelError(f"{out_path}: onnxruntime ({sess.providers[0]}) differs from PyTorch by "
                         f"{diff:.2e} (> {bound:g}) on {len(images)} images: export refused")
    return diff, sess.providers[0]


def _load_written(tmp: Path, out_path: Path) -> Any:
    """The graph just written to ``tmp``; an unreadable one is a ModelError naming ``out_path``."""
    import onnx

    try:
        return onnx.load(str(tmp))
    except Exception as exc:  # protobuf's DecodeError, a truncated file, ...: the exporter's fault, not the user's
        raise ModelError(f"{out_path}: the exported graph does not load back "
                         f"({type(exc).__name__}: {str(exc).strip()[:120]}); nothing was written") from None


def _naming_output(exc: Exception, temporaries: list[Path], out_path: Path) -> Exception:
    """``exc`` naming ``out_path``, never the temporaries export writes on the way.

    The user asked for ``out_path``; ``.NAME.<pid>.<hex>.partial`` beside it
    and ``pcamtool-export-*/fp32.onnx`` (the int8 export's fp32 graph in the
    temporary folder) are names they never gave and cannot find afterwards.
    """
    if isinstance(exc, OSError):
        why = exc.strerror or type(exc).__name__
        name = str(exc.filename or "")
        if name and not any(name == str(t) for t in temporaries[:1]) and name.startswith(tempfile.gettempdir()):
            return PcamError(f"{out_path}: cannot export ({why} in the temporary folder {tempfile.gettempdir()}, "
                             f"where the int8 export works: set TMPDIR to a folder with room)")
        return PcamError(f"{out_path}: cannot export ({why}); nothing was written")
    text = str(exc)
    for tmp in temporaries:
        text = text.replace(str(tmp), str(out_path))
    if text == str(exc):
        return exc
    return ModelError(text) if isinstance(exc, ModelError) else PcamError(text)


def _set_metadata(proto: Any, meta: dict[str, str], tmp: Path, out_path: Path) -> None:
    """Replace the graph's metadata with ``meta``, check the graph, and save it to ``tmp``."""
    import onnx

    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = (f"pcamtool {__version__}: {meta['arch']} tumour classifier for "
                        f"{PATCH_SHAPE[0]}x{PATCH_SHAPE[1]} PCam patches")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{out_path}: exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    onnx.save(proto, str(tmp))


def export_onnx(source: Optional[str | os.PathLike] = None, out: Optional[str | os.PathLike] = None,
                fp16: bool = False, opset: int = 17, store_path: Optional[str | os.PathLike] = None,
                force: bool = False, check_images: int = 64, provider: str = "cpu", int8: bool = False,
                calibration_images: int = CALIBRATION_IMAGES, tta_default: Optional[int] = None) -> ExportResult:
    """Export a checkpoint to ONNX, then check it with ``onnx.checker`` and onnxruntime.

    Parameters
    ----------
    provider
        Where the parity check runs: the provider ``infer`` will use (``auto``
        picks the best that loads, as ``infer`` does), so an fp16 graph is
        checked on the GPU that will run it. An int8 graph is for the CPU and
        is checked there.
    int8
        Quantize statically to int8 (:mod:`pcamtool.quantize`), calibrated on
        ``calibration_images`` rows of the training store (``store_path``
        overrides it) and checked against the fp32 graph on its validation
        rows: AUC within 0.002, probabilities within
        :data:`pcamtool.quantize.PROB_TOLERANCE`.
    tta_default
        The TTA ``infer`` applies to this model when given no ``--tta``
        (recorded in the metadata); None keeps the checkpoint's (8).

    Raises
    ------
    ModelError
        The checkpoint is not ours, or onnxruntime disagrees with PyTorch by
        more than :data:`TOLERANCE` (1e-4 fp32 on the CPU, 2e-2 fp16) on real
        images, or the int8 graph fails its check: a failed check is an
        error, and no file is left under ``out``.
    PcamError
        ``provider`` asked for explicitly does not load here; ``int8`` with
        ``fp16``, or without a store to calibrate on.
    """
    ckpt_path = resolve_checkpoint(source)
    ck = Checkpoint.load(ckpt_path).without_training_state()
    if not ck.weights:   # before any output is locked or any image read
        raise ModelError(f"{ckpt_path}: checkpoint holds no weights (model {ck.arch}): nothing to export")
    if tta_default is not None:
        if tta_default not in TTA_CHOICES:
            raise PcamError(f"--tta {tta_default}: choose from {', '.join(map(str, TTA_CHOICES))}")
        ck = replace(ck, tta_default=tta_default)
    out_path = Path(out) if out is not None else ckpt_path.parent / ("model-int8.onnx" if int8 else "model.onnx")
    if not 7 <= opset <= 23:
        raise PcamError(f"--opset {opset}: choose between 7 and 23")
    if int8 and fp16:
        raise PcamError("--int8 and --fp16 exclude each other (int8 is for CPUs, fp16 for GPUs)")
    images = _check_images(ck, store_path, check_images)
    meta = ck.to_onnx_metadata("fp16" if fp16 else "fp32")
    check = None
    with atomic_path(out_path, force=force) as tmp:
        temporaries = [tmp]
        try:
            if not int8:
                diff, ran_on = _write_checked(ck, tmp, out_path, meta, fp16, opset, images, provider, ckpt_path)
            else:
                with tempfile.TemporaryDirectory(prefix="pcamtool-export-") as work:
                    fp32 = Path(work) / "fp32.onnx"
                    temporaries.append(fp32)
                    diff, ran_on = _write_checked(ck, fp32, out_path, meta, False, opset, images, "cpu", ckpt_path)
                    check = quantize_checked(fp32, tmp, ck, store_path, out_path, calibration_images)
                meta = {**meta, **check.metadata()}
                _set_metadata(_load_written(tmp, out_path), meta, tmp, out_path)
        except (PcamError, OSError) as exc:
            raised = _naming_output(exc, temporaries, out_path)
            if raised is exc:
                raise
            raise raised from None
    log.info("exported %s -> %s (max |onnx - torch| %.1e on %d images, %s)", ckpt_path, out_path, diff,
             len(images), ran_on)
    if check is not None:
        log.info("int8: validation AUC %.4f vs fp32 %.4f (%+.4f) on %d rows; max |p int8 - p fp32| %.3f "
                 "(mean %.4f); calibrated on %d images", check.auc_int8, check.auc_fp32, check.auc_delta,
                 check.rows, check.max_abs_diff, check.mean_abs_diff, check.calibration_images)
    return ExportResult(out_path, diff, len(images), meta, ran_on, check)
