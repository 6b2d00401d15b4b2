"""The CUDA side of the same code paths; skipped without a GPU (CI has none)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


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


def test_infer_cuda_provider_matches_cpu(tmp_path):
    from pcamtool.export import export_onnx
    from pcamtool.infer import predict
    from pcamtool.onnx_io import resolve_providers
    from pcamtool.train.loop import fit

    from helpers import write_kaggle
    from test_train import learnable_store, tiny

    if "CUDAExecutionProvider" not in resolve_providers("auto"):
        pytest.skip("onnxruntime CUDA provider not usable here")
    store = learnable_store(tmp_path, n=64)
    res = fit(tiny(store, tmp_path / "run", device="cuda", epochs=1, arch="pcamnet"), progress=False)
    path = export_onnx(res.run_dir).path
    write_kaggle(tmp_path, n=32, seed=3, split="test", labels=False)
    gpu = predict(tmp_path / "test", [path], tta=8, provider="cuda", progress=False)
    cpu = predict(tmp_path / "test", [path], tta=8, provider="cpu", progress=False)
    assert "CUDAExecutionProvider" in gpu.providers
    assert np.allclose(gpu.probs, cpu.probs, atol=1e-3)
