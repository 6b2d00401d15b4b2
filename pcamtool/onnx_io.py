"""ONNX files and onnxruntime sessions: graph constants, metadata, providers, ``open_session``.

``export`` writes models with these names and metadata, ``infer`` reads them;
both open sessions here, so neither imports the other.

Example::

    sess = open_session("runs/a/model.onnx", provider="auto")
    probs = sess.run(None, {INPUT: images_uint8})[0]
"""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ModelError, PcamError

ONNX_FORMAT = "pcamtool-onnx"
ONNX_VERSION = "1"
INPUT, OUTPUT = "images", "probability"

def model_metadata(ckpt: dict[str, Any], fp16: bool) -> dict[str, str]:
    """What the ONNX file says about itself (all values are strings, per ONNX)."""
    return {
        "format": ONNX_FORMAT,
        "format_version": ONNX_VERSION,
        "pcamtool_version": __version__,
        "arch": ckpt["model"]["name"],
        "model_kwargs": json.dumps(ckpt["model"].get("kwargs", {})),
        "mean": json.dumps(ckpt["mean"]),
        "std": json.dumps(ckpt["std"]),
        "stain": json.dumps(ckpt.get("stain", {"method": "none"})),
        "input_layout": "NHWC uint8 (batch, 96, 96, 3), RGB; normalization inside the graph",
        "output": "probability of tumour in the central 32x32, float32 (batch,)",
        "val_auc": f"{ckpt.get('best_auc', ckpt.get('val_auc', float('nan'))):.6f}",
        "epoch": str(ckpt.get("epoch", "")),
        "store": json.dumps(ckpt.get("store", {})),
        "tta_default": "8",
        "precision": "fp16" if fp16 else "fp32",
    }


PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
_ORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
              "tensorrt": "TensorrtExecutionProvider"}


def _gpu_present() -> bool:
    """Whether an NVIDIA driver is loadable: without one, never ask onnxruntime for CUDA.

    ``get_available_providers()`` lists CUDA wherever onnxruntime-gpu is
    installed, and asking for it on a machine without a GPU prints a loud
    error; the driver library is the honest test.
    """
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def usable_providers() -> list[str]:
    """The onnxruntime providers that can actually run here, best first."""
    import onnxruntime as ort

    listed = ort.get_available_providers()
    usable = []
    if _gpu_present():
        try:
            ort.preload_dlls()  # CUDA/cuDNN shipped by pip packages (nvidia-*), if any
        except Exception:
            pass
        for name in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
            if name in listed:
                usable.append(name)
    usable.append("CPUExecutionProvider")
    return usable


def resolve_providers(provider: str) -> list[str]:
    """onnxruntime provider list for ``--provider`` (auto: TensorRT, CUDA, then CPU)."""
    if provider not in PROVIDERS:
        raise PcamError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})")
    usable = usable_providers()
    if provider == "auto":
        return usable
    want = _ORT_NAMES[provider]
    if want not in usable:
        raise PcamError(f"provider {provider} is not usable on this machine (usable: "
                        f"{', '.join(p.replace('ExecutionProvider', '').lower() for p in usable)})")
    return [want] if want == "CPUExecutionProvider" else [want, "CPUExecutionProvider"]


def open_session(path: str | os.PathLike, provider: str = "auto") -> Any:
    """An onnxruntime session for one of our models, checked for metadata and input."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model not found")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: warnings about unused initializers are noise
    try:
        sess = ort.InferenceSession(str(path), opts, providers=resolve_providers(provider))
    except Exception as exc:
        raise ModelError(f"{path}: not a loadable ONNX model ({str(exc).strip().splitlines()[0][:200]})") from None
    meta = sess.get_modelmeta().custom_metadata_map
    if meta.get("format") != ONNX_FORMAT:
        raise ModelError(f"{path}: not a pcamtool model (no '{ONNX_FORMAT}' metadata)")
    inputs = sess.get_inputs()
    if len(inputs) != 1 or inputs[0].name != INPUT or inputs[0].type != "tensor(uint8)" \
            or list(inputs[0].shape[1:]) != [96, 96, 3]:
        got = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise ModelError(f"{path}: model input is {got}, expected {INPUT} uint8 [batch, 96, 96, 3]")
    return sess
