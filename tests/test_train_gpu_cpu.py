"""The GPU-side machinery of training, run on the CPU: fp16 + GradScaler, a sync-free step, the batch ring."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pcamtool.device as device_mod
import pcamtool.train.loop as loop
from pcamtool.config import TrainConfig
from pcamtool.device import Precision
from pcamtool.errors import Interrupted
from pcamtool.io.store import open_store
from pcamtool.train.data import BatchLoader, RowSource
from pcamtool.train.loop import fit
from pcamtool.train.runs import load_checkpoint

from test_train import learnable_store, read_metrics, tiny

INIT_SCALE = 2.0 ** 24  # high enough that the first steps overflow in fp16 and are skipped
SMALL = {"model_kwargs": {"width": 2, "hidden": 8}}  # fp16 convolutions are slow on a CPU: keep them tiny


pytestmark = pytest.mark.usefixtures("no_curves")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return learnable_store(tmp_path_factory.mktemp("gpucpu"))


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """The precision a T4 gets (fp16 autocast + GradScaler), on the CPU, where torch supports both."""
    # micro-batches of 8 (batch 16): the scaled gradients of two slices add up before the one step
    fp16 = Precision("cpu", torch.float16, False, "fp16 + GradScaler: forced by the test", micro_batch=8)
    monkeypatch.setattr(device_mod, "_precision", lambda *a: fp16)
    monkeypatch.setattr(Precision, "grad_scaler",
                        lambda self: torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, enabled=self.needs_scaler))


def test_fp16_gradscaler_trains_skips_steps_and_resumes_exactly(store, tmp_path, monkeypatch, fp16_on_cpu):
    full = fit(tiny(store, tmp_path / "full", epochs=2, **SMALL), progress=False)
    cfg = json.loads((full.run_dir / "config.json").read_text())["resolved"]
    assert cfg["precision"] == "fp16" and cfg["precision_reason"].startswith("fp16 + GradScaler")
    rows = read_metrics(full.run_dir)
    assert sum(int(r["skipped_steps"]) for r in rows) > 0 and all(np.isfinite(float(r["train_loss"])) for r in rows)

    real, calls = loop.train_one_epoch, []

    def killed_in_epoch_2(t, loader, bar=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(t, loader, bar)

    monkeypatch.setattr(loop, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(Interrupted):
        fit(tiny(store, tmp_path / "part", epochs=2, **SMALL), progress=False)
    saved = load_checkpoint(tmp_path / "part" / "last.pt")["scaler"]
    assert saved["scaler"]["scale"] < INIT_SCALE and saved["skipped"] == int(rows[0]["skipped_steps"])
    monkeypatch.setattr(loop, "train_one_epoch", real)

    loaded = []
    orig_load = torch.amp.GradScaler.load_state_dict
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", lambda self, sd: (loaded.append(dict(sd)),
                                                                                   orig_load(self, sd))[1])
    res = fit(TrainConfig(), resume=tmp_path / "part", progress=False)
    assert loaded == [saved["scaler"]]
    resumed = read_metrics(res.run_dir)
    assert len(resumed) == 2
    for a, b in zip(rows, resumed):
        for k in ("train_loss", "val_loss", "val_auc", "skipped_steps", "lr"):
            assert a[k] == b[k], (a["epoch"], k)


SYNCING = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "cpu")


def test_a_training_epoch_reads_the_device_once(store, tmp_path, monkeypatch):
    """No per-step host reads from pcamtool's code (on a GPU each would wait for the device)."""
    reads: list[str] = []
    inside = [False]
    for name in SYNCING:
        orig = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=orig, _name=name, **k):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if inside[0] and caller.startswith("pcamtool"):
                reads.append(f"{_name} from {caller}")
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    real = loop.train_one_epoch

    def watched(t, loader, bar=None):
        inside[0] = True
        try:
            return real(t, loader, bar)
        finally:
            inside[0] = False

    monkeypatch.setattr(loop, "train_one_epoch", watched)
    res = fit(tiny(store, tmp_path / "r", epochs=2), progress=False)
    steps = json.loads((res.run_dir / "config.json").read_text())["resolved"]["train_rows"] // 16
    assert steps >= 4
    assert len(reads) <= 2, reads  # one read per epoch: the loss sum and the skipped steps, together


def test_batch_ring_gives_every_batch_intact(store):
    """Reused host buffers: each batch equals a fresh gather, with the prefetch thread running ahead."""
    s = open_store(store)
    src = RowSource(s, "mmap", torch.device("cpu"))
    loader = BatchLoader(src, np.arange(len(s)), 7, shuffle=True, seed=3, prefetch=3)
    seen = []
    for b in loader:
        want = s.gather(b.index)
        assert torch.equal(b.x, torch.from_numpy(want))
        assert torch.equal(b.y, torch.from_numpy(s.labels[b.index].astype(np.float32)))
        seen.append(b.index)
    assert sorted(np.concatenate(seen).tolist()) == list(range(len(s)))
    assert loader.state_dict() == {"epoch": 1, "seed": 3, "rows": len(s), "world": 1}
    labels = [b.y.clone() for b in loader]  # labels are fresh tensors: safe to keep across steps
    assert len(labels) == -(-len(s) // 7) and labels[0].data_ptr() != labels[1].data_ptr()
