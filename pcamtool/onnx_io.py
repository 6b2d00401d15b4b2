"""ONNX files and onnxruntime sessions: graph constants, metadata, providers, ``open_session``.

``export`` writes models with these names and metadata, ``infer`` reads them;
both open sessions here, so neither imports the other.

Providers are chosen from what actually loads, never from
``get_available_providers()`` alone: onnxruntime-gpu lists CUDA and TensorRT
wherever it is installed, and a session asked for a provider whose libraries
are missing quietly comes up on the CPU. So each GPU provider's own library
is loaded first (the dynamic loader names the missing dependency), and after
a session is created ``session.get_providers()`` says what runs: an explicit
``--provider cuda|tensorrt`` that did not load is an error, ``auto`` logs once
what runs and why the better ones did not.

Example::

    model = open_session("runs/a/model.onnx", provider="auto")
    probs = model.run(images_uint8)          # (batch,) float64
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .constants import PATCH_SHAPE, PROVIDERS
from .errors import ModelError, PcamError
from .train.checkpoint import ONNX_FORMAT as _ONNX_FORMAT, ONNX_VERSION as _ONNX_VERSION, Checkpoint

log = logging.getLogger("pcamtool")

INPUT, OUTPUT = "images", "probability"
# What the file says about itself is the Checkpoint's (to_onnx_metadata / from_onnx_metadata).
ONNX_FORMAT, ONNX_VERSION = _ONNX_FORMAT, _ONNX_VERSION


# ----------------------------------------------------------------- providers

ORT_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
             "cpu": "CPUExecutionProvider"}   # best first: the order ``auto`` tries them
GPU_PROVIDERS = ("tensorrt", "cuda")


def _gpu_present() -> Optional[str]:
    """Why no NVIDIA driver is loadable (None: it is): without one, never ask onnxruntime for CUDA.

    ``get_available_providers()`` lists CUDA wherever onnxruntime-gpu is
    installed, and asking for it on a machine without a GPU prints a loud
    error; the driver library is the honest test.
    """
    try:
        ctypes.CDLL("libcuda.so.1")
        return None
    except OSError as exc:
        return f"no NVIDIA driver ({exc})"


def _preload_cuda_libraries() -> None:
    """``onnxruntime.preload_dlls()``: CUDA/cuDNN from pip's nvidia-* packages, where installed.

    It reports what it could not load with ``print`` (on stdout, where the
    CSV goes): captured, and logged at debug level.
    """
    import onnxruntime as ort

    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            ort.preload_dlls()
    except Exception as exc:  # a missing folder or library: the provider check below names it
        log.debug("onnxruntime.preload_dlls() failed: %s", exc)
    if said.getvalue().strip():
        log.debug("onnxruntime.preload_dlls(): %s", " | ".join(said.getvalue().split("\n")).strip())


@lru_cache(maxsize=None)
def provider_problems() -> dict[str, Optional[str]]:
    """For each of cpu, cuda, tensorrt: None if it loads here, else why not (one line).

    A GPU provider loads when onnxruntime has it, an NVIDIA driver is present
    and its provider library loads with all its dependencies (after
    ``preload_dlls``); the loader's message names the first missing library.
    """
    import onnxruntime as ort

    listed = set(ort.get_available_providers())
    problems: dict[str, Optional[str]] = {"cpu": None}
    driver = _gpu_present()
    if driver is None:
        _preload_cuda_libraries()
    capi = Path(ort.__file__).parent / "capi"
    for name in GPU_PROVIDERS:
        if ORT_NAMES[name] not in listed:
            problems[name] = f"this onnxruntime ({ort.__version__}) has no {name} provider (install onnxruntime-gpu)"
        elif driver is not None:
            problems[name] = driver
        else:
            try:
                ctypes.CDLL(str(capi / f"libonnxruntime_providers_{name}.so"))
                problems[name] = None
            except OSError as exc:
                problems[name] = f"its libraries do not load ({str(exc).strip()})"
    return problems


def _short(name: str) -> str:
    return next(k for k, v in ORT_NAMES.items() if v == name)


def _tensorrt_options(path: Path, batch_size: int) -> dict[str, Any]:
    """Engine cache beside the model (keyed by its hash) and one profile for batch 1..batch_size.

    The profile covers the short last batch, so it does not rebuild the engine.
    """
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    cache = path.parent / ".trt-cache" / digest
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only model folder: the cache goes to the temporary folder instead
        cache = Path(tempfile.gettempdir()) / "pcamtool-trt-cache" / digest
        cache.mkdir(parents=True, exist_ok=True)
    shape = "".join(f"x{d}" for d in PATCH_SHAPE)
    return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
            "trt_profile_min_shapes": f"{INPUT}:1{shape}",
            "trt_profile_opt_shapes": f"{INPUT}:{batch_size}{shape}",
            "trt_profile_max_shapes": f"{INPUT}:{batch_size}{shape}"}


def choose_providers(provider: str) -> list[str]:
    """onnxruntime provider names for ``--provider`` that load here, best first (CPU last).

    Raises
    ------
    PcamError
        An unknown name, or an explicit GPU provider that cannot load here
        (the message says why, naming the missing library where known).
    """
    if provider not in PROVIDERS:
        raise PcamError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})")
    problems = provider_problems()
    if provider == "auto":
        return [ORT_NAMES[p] for p in ORT_NAMES if problems[p] is None]
    if problems[provider] is not None:
        raise PcamError(f"--provider {provider}: not available on this machine: {problems[provider]}")
    return [ORT_NAMES[provider]] + ([] if provider == "cpu" else [ORT_NAMES["cpu"]])


@contextlib.contextmanager
def _stderr_captured() -> Iterator[io.StringIO]:
    """Collect what native code writes to file descriptor 2 (onnxruntime's provider errors)."""
    said = io.StringIO()
    try:
        saved = os.dup(2)
    except OSError:
        yield said
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            said.write(sink.read().decode("utf-8", "replace"))


def _reason(native_log: str) -> str:
    """The line of onnxruntime's log that says why a provider failed (or a generic one)."""
    for line in native_log.splitlines():
        if any(w in line for w in ("Failed", "failed", "error", "Error", "Require")):
            text = line.split("]", 2)[-1].strip() if "]" in line else line.strip()
            return text[:240]
    return "onnxruntime fell back to the CPU without saying why"


def _auto_message(running: str, fallback_reason: str) -> str:
    """``onnxruntime runs on X (better ones: why not)``, providers with the same reason named together."""
    problems = provider_problems()
    order = list(ORT_NAMES)
    why: dict[str, list[str]] = {}
    for p in order[:order.index(running)]:
        why.setdefault(problems[p] or fallback_reason, []).append(p)
    said = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in why.items())
    return f"onnxruntime runs on {running}" + (f" ({said})" if said else "")


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.info("%s", message)


# ------------------------------------------------------------------ sessions

@dataclass
class ModelSession:
    """An onnxruntime session for one of our models, and how it runs.

    ``run`` binds input and output to the provider's device (host memory for
    the CPU, GPU memory for CUDA and TensorRT), decided once when opened.
    ``tta_in_graph`` says the graph itself averages the TTA transforms
    ``tta`` (GPU providers), so ``run`` already returns the TTA mean.
    """

    path: Path
    session: Any
    metadata: dict[str, str]
    providers: list[str]
    tta: list[int]
    tta_in_graph: bool = False

    def __post_init__(self) -> None:
        self._device = "cuda" if self.providers[0] != ORT_NAMES["cpu"] else "cpu"

    def run(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (float64, one per image) for a uint8 NHWC batch.

        Raises
        ------
        ModelError
            The model's output is not one probability per image in [0, 1].
        """
        import onnxruntime as ort

        x = np.ascontiguousarray(images)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(INPUT, ort.OrtValue.ortvalue_from_numpy(x, self._device, 0))
        binding.bind_output(self.session.get_outputs()[0].name, self._device, 0)
        self.session.run_with_iobinding(binding)
        out = binding.copy_outputs_to_cpu()[0]
        if out.shape != (len(x),):
            raise ModelError(f"{self.path}: model output has shape {out.shape} for {len(x)} images, "
                             f"expected ({len(x)},)")
        out = out.astype(np.float64)
        if not (np.isfinite(out).all() and out.min(initial=0.0) >= 0.0 and out.max(initial=0.0) <= 1.0):
            bad = out[~(np.isfinite(out) & (out >= 0) & (out <= 1))][0]
            raise ModelError(f"{self.path}: model output {bad:g} is not a probability in [0, 1]")
        return out

    def get_providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def checkpoint(self) -> Checkpoint:
        """What the model's metadata says (a :class:`Checkpoint` without weights: stain, normalization, TTA)."""
        return Checkpoint.from_onnx_metadata(self.metadata, self.path)


def _load_proto(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise ModelError(f"{path}: not a loadable ONNX model ({str(exc).strip().splitlines()[0][:200]})") from None


def _dims(value_info: Any) -> list[Any]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def _check_graph(path: Path, proto: Any) -> dict[str, str]:
    """Metadata of one of our models, after checking its input and output: a one-line ModelError if not."""
    import onnx

    meta = {p.key: p.value for p in proto.metadata_props}
    Checkpoint.from_onnx_metadata(meta, path)   # ours, and every field parses (one line naming it if not)
    weights = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    if (len(inputs) != 1 or inputs[0].name != INPUT
            or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.UINT8 or _dims(inputs[0])[1:] != list(PATCH_SHAPE)):
        got = ", ".join(f"{i.name} {onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type)} {_dims(i)}"
                        for i in inputs)
        raise ModelError(f"{path}: model input is {got}, expected {INPUT} UINT8 [batch, {', '.join(map(str, PATCH_SHAPE))}]")
    outputs = list(proto.graph.output)
    if (len(outputs) != 1 or outputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT
            or len(_dims(outputs[0])) != 1):
        got = ", ".join(f"{o.name} {onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type)} {_dims(o)}"
                        for o in outputs)
        raise ModelError(f"{path}: model output is {got}, expected one FLOAT probability per image [batch]")
    return meta


def open_session(path: str | os.PathLike, provider: str = "auto", batch_size: int = 256,
                 tta: Optional[int] = None) -> ModelSession:
    """Open one of our models on ``provider``, checked for metadata, input, output and provider.

    Parameters
    ----------
    provider
        ``auto`` (TensorRT, CUDA, then CPU: the best that loads), ``cpu``,
        ``cuda`` or ``tensorrt``.
    batch_size
        The largest batch ``run`` will get (TensorRT's optimization profile).
    tta
        TTA transforms to average (1, 2, 4, 8); None: the model's
        ``tta_default`` metadata. On a GPU provider the copies are made
        inside the graph (:func:`pcamtool.tta.tta_graph`), so ``run``
        returns the TTA mean.

    Raises
    ------
    ModelError
        Missing, unloadable or foreign model, wrong input or output.
    PcamError
        An explicit GPU provider that is not available, or that onnxruntime
        did not load for this model (one line, with onnxruntime's reason).
    """
    import onnxruntime as ort

    from .tta import tta_graph, tta_transforms

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model not found")
    providers = choose_providers(provider)          # fail on an unusable provider before reading the model
    proto = _load_proto(path)
    meta = _check_graph(path, proto)
    ks = tta_transforms(tta if tta is not None else Checkpoint.from_onnx_metadata(meta, path).tta_default)
    options: list[dict[str, Any]] = [
        _tensorrt_options(path, batch_size) if p == ORT_NAMES["tensorrt"] else {} for p in providers]
    in_graph = providers[0] != ORT_NAMES["cpu"] and len(ks) > 1
    model: Any = str(path)
    if in_graph:
        model = tta_graph(proto, ks).SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: warnings about unused initializers are noise
    with _stderr_captured() as native:
        try:
            sess = ort.InferenceSession(model, opts, providers=providers, provider_options=options)
        except Exception as exc:
            raise ModelError(f"{path}: not a loadable ONNX model ({str(exc).strip().splitlines()[0][:200]})") from None
    if native.getvalue().strip():
        log.debug("onnxruntime while opening %s: %s", path, native.getvalue().strip())
    running = sess.get_providers()
    if provider != "auto" and ORT_NAMES[provider] not in running:
        raise PcamError(f"--provider {provider}: onnxruntime did not load it for {path}: {_reason(native.getvalue())}")
    if provider == "auto":
        _log_once(_auto_message(_short(running[0]), _reason(native.getvalue())))
    return ModelSession(path, sess, meta, running, list(ks), in_graph)
