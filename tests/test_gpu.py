"""The CUDA side of the same code paths (skipped without a GPU: CI has none), and the gpu-check script."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _ort_gpu(provider: str) -> None:
    from pcamtool.onnx_io import provider_problems

    why = provider_problems()[provider]
    if why is not None:
        pytest.skip(f"onnxruntime {provider} provider does not load here: {why}")


@pytest.mark.gpu
@needs_cuda
def test_train_on_gpu_with_gpu_cache(tmp_path):
    from pcamtool.train.data import resolve_cache
    from pcamtool.io.store import open_store
    from pcamtool.train.loop import fit

    from test_train import learnable_store, tiny

    store = learnable_store(tmp_path, n=256)
    assert resolve_cache("auto", open_store(store), torch.device("cuda")) == "gpu"
    res = fit(tiny(store, tmp_path / "run", device="cuda", epochs=4, arch="pcamnet", batch_size=32),
              progress=False)
    assert res.best_auc > 0.9


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    from pcamtool.export import export_onnx
    from pcamtool.train.loop import fit

    from helpers import write_kaggle
    from test_train import learnable_store, tiny

    root = tmp_path_factory.mktemp("gpuinfer")
    store = learnable_store(root, n=64)
    res = fit(tiny(store, root / "run", device="cuda", epochs=1, arch="pcamnet"), progress=False)
    _ort_gpu("cuda")
    path = export_onnx(res.run_dir, provider="cuda").path   # parity checked where it will run
    write_kaggle(root, n=40, seed=3, split="test", labels=False)
    return root, path


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_infer_gpu_provider_runs_there_and_matches_cpu(gpu_model, provider):
    from pcamtool.infer import predict
    from pcamtool.onnx_io import open_session

    root, path = gpu_model
    _ort_gpu(provider)
    model = open_session(path, provider, batch_size=16, tta=8)
    name = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    assert model.providers[0] == name and model.tta_in_graph   # the TTA copies are made on the device
    # batch 16 with a short last batch (40 = 16 + 16 + 8): TensorRT's profile covers 1..16
    on_gpu = predict(root / "test", [path], tta=8, provider=provider, batch_size=16, progress=False)
    cpu = predict(root / "test", [path], tta=8, provider="cpu", progress=False)
    assert on_gpu.providers[0] == name
    assert np.allclose(on_gpu.probs, cpu.probs, atol=3e-3)
    if provider == "tensorrt":
        assert any((path.parent / ".trt-cache").rglob("*")), "the engine cache is beside the model"


@pytest.mark.gpu
@needs_cuda
def test_export_fp16_checked_on_the_gpu(gpu_model, tmp_path):
    from pcamtool.export import export_onnx

    root, path = gpu_model
    res = export_onnx(path.parent, tmp_path / "half.onnx", fp16=True, provider="cuda")
    assert res.provider == "CUDAExecutionProvider" and res.max_abs_diff <= 2e-2


# ------------------------------------------------------ the gpu-check script

def _gpu_check(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_gpu_check_without_a_gpu_says_so_in_one_line():
    done = _gpu_check(env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "no NVIDIA GPU here" in done.stdout and done.stderr == ""


@pytest.mark.slow
def test_gpu_check_dry_run_end_to_end(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    done = _gpu_check("--dry-run", "--out", str(out), "--data", str(data))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "gpu-results.json").read_text())
    names = {(m["stage"], m["name"]) for m in results["measurements"]}
    for want in (("tests", "gpu tests"), ("data", "synthetic data"), ("train", "train epoch"),
                 ("infer", "tta8"), ("doctor", "doctor --json")):
        assert want in names, want
    assert results["dry_run"] and results["doctor"]["onnxruntime"]["providers"]["cpu"] == "loads"
    trains = [m for m in results["measurements"] if m["name"] == "train epoch"]
    assert {(m["cache"], m["batch_size"]) for m in trains} >= {("ram", 32), ("mmap", 64)}
    ran = [m for m in results["measurements"] if m["name"] == "tta8" and m.get("ran_on")]
    assert all(m["ran_on"][0] == "CPUExecutionProvider" for m in ran)
    text = (out / "gpu-results.md").read_text()
    assert "## train epoch" in text and "## tta8" in text and "flags:" in text
    assert (data / "train-160.h5").is_file()
