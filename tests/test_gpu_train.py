"""Training on a real GPU: a step that never waits for the host, precision by generation, the GPU cache.

Skipped without CUDA (CI has none); ``make gpu-check`` runs them where a GPU is present.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pcamtool.device as device_mod
import pcamtool.train.loop as loop
from pcamtool.device import Precision, resolve_device
from pcamtool.io.store import open_store
from pcamtool.train.data import RowSource
from pcamtool.train.loop import fit
from pcamtool.train.runs import load_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    from test_train import learnable_store

    return learnable_store(tmp_path_factory.mktemp("gputrain"), n=192)


def test_precision_follows_the_real_gpu():
    dev = resolve_device("cuda")
    cap = torch.cuda.get_device_capability(dev)
    p = Precision.for_device(dev)
    want = "bf16" if cap >= (8, 0) else "fp16"
    assert p.name == want and f"compute capability {cap[0]}.{cap[1]}" in p.reason
    assert p.channels_last and p.grad_scaler().is_enabled() == (want == "fp16")


def sync_checked_steps(monkeypatch) -> list[int]:
    """Run every training step under ``set_sync_debug_mode("error")``: any host synchronisation raises."""
    steps = []
    real = loop.train_step

    def checked(t, b):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(t, b)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            steps.append(1)

    monkeypatch.setattr(loop, "train_step", checked)
    return steps


@pytest.mark.parametrize("cache", ["gpu", "ram", "mmap"])
def test_training_step_never_synchronises(store, tmp_path, monkeypatch, cache):
    from test_train import tiny

    steps = sync_checked_steps(monkeypatch)
    res = fit(tiny(store, tmp_path / cache, device="cuda", cache=cache, epochs=2, arch="pcamnet", ema=0.9),
              progress=False)
    assert len(steps) >= 4 and res.last_epoch == 2
    rng = load_checkpoint(res.run_dir / "last.pt")["rng"]
    assert rng["device"] == "cuda" and rng["cuda"] is not None


def test_fp16_gradscaler_step_never_synchronises(store, tmp_path, monkeypatch):
    """The T4/V100 path (fp16 + GradScaler + fused AdamW), forced on whatever GPU this is."""
    from test_train import tiny

    fp16 = Precision("cuda", torch.float16, True, "fp16 + GradScaler: forced by the test")
    monkeypatch.setattr(device_mod, "_precision", lambda *a: fp16)
    steps = sync_checked_steps(monkeypatch)
    res = fit(tiny(store, tmp_path / "fp16", device="cuda", epochs=2, arch="pcamnet"), progress=False)
    assert len(steps) >= 4
    state = load_checkpoint(res.run_dir / "last.pt")
    assert state["precision"] == "fp16" and state["scaler"]["scaler"]["scale"] > 0


def test_gpu_cache_keeps_no_host_copy(store):
    s = open_store(store)
    src = RowSource(s, "gpu", torch.device("cuda"))
    assert src.gpu is not None and src.gpu.is_cuda and s._ram is None
    assert torch.equal(src.gpu[:5].cpu(), torch.from_numpy(s.gather(range(5))))
