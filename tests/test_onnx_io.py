"""ONNX files and sessions (pcamtool.onnx_io): the graph checks, metadata, providers and ModelSession.run.

The models here are hand-built graphs (a few nodes) carrying the metadata a
real export writes, so each check meets exactly the defect it is about.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pcamtool import onnx_io
from pcamtool.errors import ModelError, PcamError
from pcamtool.onnx_io import INPUT, ORT_NAMES, choose_providers, open_session
from pcamtool.train.checkpoint import Checkpoint

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


def metadata(tta: int = 8) -> dict[str, str]:
    ck = Checkpoint(arch="pcamnet", model_kwargs={}, mean=(0.7, 0.5, 0.6), std=(0.2, 0.3, 0.25), tta_default=tta)
    return ck.to_onnx_metadata()


def write_model(path: Path, *, scale: float = 1 / (255.0 * 96 * 96 * 3), meta: dict[str, str] | None = None,
                in_type: int = TensorProto.UINT8, in_shape=("batch", 96, 96, 3), out_rank: int = 1,
                out_type: int = TensorProto.FLOAT, name: str = INPUT) -> Path:
    """A model whose 'probability' is the mean pixel value / 255 (times ``scale`` * 255 * pixels)."""
    nodes = [helper.make_node("Cast", [name], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["f", "axes"], ["s"], keepdims=0),
             helper.make_node("Mul", ["s", "k"], ["p0"])]
    out = "p0"
    if out_rank == 2:
        nodes.append(helper.make_node("Unsqueeze", ["p0", "ax1"], ["p2"]))
        out = "p2"
    if out_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [out], ["pc"], to=out_type))
        out = "pc"
    nodes.append(helper.make_node("Identity", [out], ["probability"]))
    out_shape = ["batch"] if out_rank == 1 else ["batch", 1]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info(name, in_type, list(in_shape))],
                          [helper.make_tensor_value_info("probability", out_type, out_shape)],
                          [helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
                           helper.make_tensor("k", TensorProto.FLOAT, [], [scale]),
                           helper.make_tensor("ax1", TensorProto.INT64, [1], [1])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    for k, v in (metadata() if meta is None else meta).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def images(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)


# ------------------------------------------------------------------ sessions


def test_open_session_runs_the_model_and_reads_the_tta_default(tmp_path):
    path = write_model(tmp_path / "m.onnx", meta=metadata(tta=4))
    m = open_session(path, provider="cpu")
    assert m.providers == [ORT_NAMES["cpu"]] and not m.tta_in_graph
    assert m.tta == [0, 2, 4, 6]                       # the model's own default
    assert open_session(path, provider="cpu", tta=2).tta == [0, 4]
    x = images()
    got = m.run(x)
    assert got.dtype == np.float64 and got.shape == (3,)
    np.testing.assert_allclose(got, x.reshape(3, -1).mean(1) / 255.0, rtol=1e-5)
    assert m.checkpoint.tta_default == 4 and m.metadata == metadata(tta=4)


def test_run_refuses_outputs_that_are_not_probabilities(tmp_path):
    m = open_session(write_model(tmp_path / "m.onnx", scale=2.0), provider="cpu")
    with pytest.raises(ModelError, match=r"m.onnx: model output [0-9.e+]+ is not a probability in \[0, 1\]"):
        m.run(images(2))
    neg = open_session(write_model(tmp_path / "n.onnx", scale=-1e-9), provider="cpu")
    with pytest.raises(ModelError, match="is not a probability"):
        neg.run(images(2))
    assert np.array_equal(neg.run(np.zeros((2, 96, 96, 3), np.uint8)), [0.0, 0.0])   # 0 and 1 are probabilities


def test_missing_foreign_and_garbled_models_are_one_line(tmp_path):
    with pytest.raises(ModelError, match=r"nope.onnx: model not found"):
        open_session(tmp_path / "nope.onnx", provider="cpu")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00 not a protobuf at all \xff" * 10)
    with pytest.raises(ModelError, match=r"bad.onnx: not a loadable ONNX model \("):
        open_session(bad, provider="cpu")
    with pytest.raises(ModelError) as e:
        open_session(write_model(tmp_path / "foreign.onnx", meta={}), provider="cpu")
    assert "foreign.onnx" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw,says", [
    ({"in_type": TensorProto.FLOAT}, "model input is images FLOAT ['batch', 96, 96, 3], expected images UINT8 [batch, 96, 96, 3]"),
    ({"in_shape": ("batch", 3, 96, 96)}, "model input is images UINT8 ['batch', 3, 96, 96]"),
    ({"name": "pixels"}, "model input is pixels UINT8"),
    ({"out_rank": 2}, "model output is probability FLOAT ['batch', 1], expected one FLOAT probability per image [batch]"),
    ({"out_type": TensorProto.DOUBLE}, "model output is probability DOUBLE ['batch']"),
])
def test_wrong_inputs_and_outputs_name_both_sides(tmp_path, kw, says):
    with pytest.raises(ModelError) as e:
        open_session(write_model(tmp_path / "w.onnx", **kw), provider="cpu")
    assert says in str(e.value) and str(e.value).startswith(str(tmp_path / "w.onnx"))


# ------------------------------------------------------------------ providers


def test_providers_on_a_machine_without_a_gpu(monkeypatch):
    monkeypatch.setattr(onnx_io, "provider_problems",
                        lambda: {"tensorrt": "no NVIDIA driver (libcuda.so.1)", "cuda": "no NVIDIA driver (libcuda.so.1)",
                                 "cpu": None})
    assert choose_providers("auto") == ["CPUExecutionProvider"]
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(PcamError, match=r"--provider cuda: not available on this machine: no NVIDIA driver"):
        choose_providers("cuda")
    with pytest.raises(PcamError, match=r"unknown provider 'rocm' \(choose from auto, "):
        choose_providers("rocm")
    assert onnx_io._auto_message("cpu", "x") == "onnxruntime runs on cpu (tensorrt, cuda: no NVIDIA driver (libcuda.so.1))"


def test_providers_where_cuda_loads(monkeypatch):
    monkeypatch.setattr(onnx_io, "provider_problems",
                        lambda: {"tensorrt": "libnvinfer.so.10 not found", "cuda": None, "cpu": None})
    assert choose_providers("auto") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(PcamError, match="--provider tensorrt: not available on this machine: libnvinfer.so.10"):
        choose_providers("tensorrt")
    assert onnx_io._auto_message("cuda", "x") == "onnxruntime runs on cuda (tensorrt: libnvinfer.so.10 not found)"
    # the fall-back reason stands in for a provider that loads but did not run
    assert onnx_io._auto_message("cpu", "it failed") == ("onnxruntime runs on cpu (tensorrt: libnvinfer.so.10 "
                                                          "not found; cuda: it failed)")


def test_reason_is_the_line_of_the_log_that_says_why():
    log = ("2026-01-01 [I:onnxruntime:, inference_session.cc:1] Loading\n"
           "2026-01-01 [E:onnxruntime:Default, provider_bridge.cc:2] Failed to load library libcudnn.so.9\n")
    assert onnx_io._reason(log) == "Failed to load library libcudnn.so.9"
    assert onnx_io._reason("Require cuDNN 9") == "Require cuDNN 9"
    assert onnx_io._reason("") == "onnxruntime fell back to the CPU without saying why"
    assert len(onnx_io._reason("error " + "x" * 500)) == 240


def test_tensorrt_cache_sits_beside_the_model_keyed_by_its_hash(tmp_path):
    path = write_model(tmp_path / "m.onnx")
    opts = onnx_io._tensorrt_options(path, 64)
    cache = Path(opts["trt_engine_cache_path"])
    assert cache.parent == tmp_path / ".trt-cache" and cache.is_dir() and len(cache.name) == 16
    assert opts["trt_profile_min_shapes"] == "images:1x96x96x3"
    assert opts["trt_profile_max_shapes"] == opts["trt_profile_opt_shapes"] == "images:64x96x96x3"
    write_model(path, scale=0.5 / (255.0 * 96 * 96 * 3))           # another model, another engine
    assert onnx_io._tensorrt_options(path, 64)["trt_engine_cache_path"] != str(cache)
