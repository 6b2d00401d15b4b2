"""Micro-batches (PCAMTOOL_MICRO_BATCH): a training step in slices whose gradients add up to the whole batch's."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pcamtool.device as device_mod
from pcamtool.contract import Classifier
from pcamtool.device import Precision
from pcamtool.models import create_model
from pcamtool.train.data import Batch
from pcamtool.train.loop import create_trainer, fit, train_step

from test_train import learnable_store, tiny

pytestmark = pytest.mark.usefixtures("no_curves")


def trainer(micro: int, cfg):
    torch.manual_seed(0)
    net = Classifier(create_model("plain4", width=4), [0.5] * 3, [0.25] * 3)
    p = Precision("cpu", None, True, "fp32: test", micro_batch=micro)
    return create_trainer(cfg, net, torch.device("cpu"), p, total_steps=10)


def batch(n: int = 20) -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randint(0, 256, (n, 96, 96, 3), dtype=torch.uint8, generator=g),
                 (torch.arange(n) % 2).float(), np.arange(n))


@pytest.mark.parametrize("micro", [1, 6, 8, 20, 64])
def test_micro_batches_take_the_whole_batch_step(tmp_path, micro):
    """With batch norm on running statistics (eval mode), slicing changes nothing but rounding: same loss, same step.

    20 images in slices of 6 leaves a short last slice (6+6+6+2): each slice's
    loss is weighted by its size, not averaged per slice.
    """
    cfg = tiny(tmp_path / "none.h5", tmp_path / "run")
    whole, sliced = trainer(0, cfg), trainer(micro, cfg)
    for t in (whole, sliced):
        t.net.eval()
    b = batch()
    loss_whole, loss_sliced = train_step(whole, b), train_step(sliced, b)
    assert torch.allclose(loss_whole, loss_sliced, rtol=1e-5, atol=1e-6)
    for (name, a), (_, c) in zip(whole.net.named_parameters(), sliced.net.named_parameters()):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-6), name


def test_micro_batches_run_the_network_once_per_slice(tmp_path):
    """In training mode each slice is its own forward (batch norm sees 8 images), and one optimizer step follows."""
    cfg = tiny(tmp_path / "none.h5", tmp_path / "run")
    t = trainer(8, cfg)
    t.net.train()
    seen: list[int] = []
    t.net.backbone.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    steps = []
    t.opt.register_step_post_hook(lambda opt, a, k: steps.append(1))
    train_step(t, batch(20))
    assert seen == [8, 8, 4] and steps == [1]


def test_cpu_training_records_its_micro_batch_and_runs_without(tmp_path, monkeypatch):
    """config.json says how the step ran (PCAMTOOL_MICRO_BATCH=8, or whole batches by default), and both learn."""
    store = learnable_store(tmp_path / "data")
    aucs = {}
    for micro in ("8", ""):
        device_mod._precision.cache_clear()
        monkeypatch.setenv("PCAMTOOL_MICRO_BATCH", micro)
        res = fit(tiny(store, tmp_path / f"run{micro}", epochs=3, batch_size=32), progress=False)
        reason = json.loads((res.run_dir / "config.json").read_text())["resolved"]["precision_reason"]
        assert reason.endswith("; micro-batches of 8 (PCAMTOOL_MICRO_BATCH)") == (micro == "8"), reason
        aucs[micro] = res.best_auc
    device_mod._precision.cache_clear()
    assert min(aucs.values()) > 0.9, aucs



def test_bad_micro_batch_setting_stops_train_in_one_line(tmp_path, monkeypatch):
    """A bad PCAMTOOL_MICRO_BATCH is one line naming the variable, exit 1, and no run folder."""
    from click.testing import CliRunner

    from pcamtool.cli import cli

    store = learnable_store(tmp_path / "data", n=24)
    device_mod._precision.cache_clear()
    monkeypatch.setenv("PCAMTOOL_MICRO_BATCH", "abc")
    r = CliRunner().invoke(cli, ["train", str(store), "-o", str(tmp_path / "run"), "--epochs", "1"])
    device_mod._precision.cache_clear()
    assert r.exit_code == 1 and "PCAMTOOL_MICRO_BATCH must be a whole number >= 0" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
