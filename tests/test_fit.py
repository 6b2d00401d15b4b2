"""``fit`` as a whole, fast: what a run folder records, which epoch is best, early stop, the failure paths.

Each run here trains a width-4 network for an epoch or three on 48 images
(a fraction of a second), with the validation AUC scripted where the test
is about what ``fit`` does with it, so the run around the step is checked
without training to a given quality (``test_train.py`` does that, slowly).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import pcamtool.train.loop as loop
from pcamtool.errors import PcamError, TrainingError
from pcamtool.io.store import open_store
from pcamtool.train.checkpoint import Checkpoint, split_rows
from pcamtool.train.loop import fit

from test_train import learnable_store, read_metrics, tiny

pytestmark = pytest.mark.usefixtures("no_curves")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return learnable_store(tmp_path_factory.mktemp("fit"), n=48)


@pytest.fixture
def logs(caplog, monkeypatch):
    """pcamtool's logger does not propagate (the CLI gives it its own handler): let caplog see it."""
    monkeypatch.setattr(logging.getLogger("pcamtool"), "propagate", True)
    caplog.set_level(logging.INFO, logger="pcamtool")
    return caplog


def small(store: Path, out: Path, **kw):
    return tiny(store, out, **{"model_kwargs": {"width": 4}, "epochs": 1, **kw})


def scripted_auc(monkeypatch, aucs: list[float]) -> list[torch.nn.Module]:
    """``evaluate`` answers the given AUCs epoch by epoch (and records the network it was given)."""
    seen: list[torch.nn.Module] = []

    def fake(net, loader, autocast, dist=None, keep=None):
        seen.append(net)
        if keep is not None:
            keep.update(probs=np.array([0.2, 0.8]), labels=np.array([0.0, 1.0]))
        return {"val_loss": 0.5, "val_auc": aucs[len(seen) - 1], "val_acc": 0.75}

    monkeypatch.setattr(loop, "evaluate", fake)
    return seen


def test_config_json_records_what_the_run_resolved(store, tmp_path):
    cfg = small(store, tmp_path / "r", seed=3)
    res = fit(cfg, progress=False)
    written = json.loads((res.run_dir / "config.json").read_text())
    tr, va = split_rows(cfg, open_store(store))
    resolved = written.pop("resolved")
    assert written == json.loads(json.dumps(cfg.to_dict()))
    assert resolved["device"] == "cpu" and resolved["world_size"] == 1 and resolved["cache"] in ("ram", "mmap")
    assert resolved["precision"] in ("fp32", "bf16") and resolved["precision_reason"]
    assert (resolved["train_rows"], resolved["val_rows"]) == (len(tr), len(va)) == (38, 10)
    assert resolved["model"] == {"name": "simple", "kwargs": cfg.resolved_model_args()}
    assert resolved["store_path"] == str(store.resolve())


def test_result_and_metrics_follow_the_scripted_aucs(store, tmp_path, monkeypatch):
    seen = scripted_auc(monkeypatch, [0.6, 0.8, 0.7])
    res = fit(small(store, tmp_path / "r", epochs=3), progress=False)
    assert (res.run_dir, res.best_auc, res.best_epoch, res.last_epoch) == (tmp_path / "r", 0.8, 2, 3)
    assert res.seconds > 0
    rows = read_metrics(res.run_dir)
    assert [(r["epoch"], float(r["val_auc"]), float(r["val_acc"]), float(r["val_loss"])) for r in rows] == \
           [("1", 0.6, 0.75, 0.5), ("2", 0.8, 0.75, 0.5), ("3", 0.7, 0.75, 0.5)]
    for r in rows:
        assert float(r["img_per_s"]) > 0 and float(r["seconds"]) > 0 and r["skipped_steps"] == "0"
        assert np.isfinite(float(r["train_loss"]))
    # the schedule's learning rate after each epoch: one-cycle falls towards zero at the end
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[-1] < lrs[0] and lrs[-1] < 3e-3 / 100
    assert all(net is seen[0] for net in seen)  # one network scored every epoch: the average
    best, last = Checkpoint.load(res.run_dir / "best.pt"), Checkpoint.load(res.run_dir / "last.pt")
    assert (best.epoch, best.val_auc, best.best_auc, best.best_epoch) == (2, 0.8, 0.8, 2)
    assert (last.epoch, last.val_auc, last.best_auc, last.best_epoch) == (3, 0.7, 0.8, 2)
    assert [m["epoch"] for m in best.metrics] == [1, 2] and [m["epoch"] for m in last.metrics] == [1, 2, 3]
    assert best.training_state is None and last.training_state is not None


def test_an_equal_auc_is_not_an_improvement_and_patience_stops_the_run(store, tmp_path, monkeypatch, logs):
    scripted_auc(monkeypatch, [0.7, 0.7, 0.6, 0.9, 0.9])
    res = fit(small(store, tmp_path / "r", epochs=5, patience=2), progress=False)
    assert (res.best_epoch, res.last_epoch) == (1, 3)   # epochs 2 and 3 gained nothing: stop after 3
    assert Checkpoint.load(res.run_dir / "best.pt").epoch == 1
    assert "early stop: no AUC gain for 2 epochs" in logs.messages
    lines = [m for m in logs.messages if m.startswith("epoch ")]
    assert len(lines) == 3 and lines[0].startswith("epoch 1/5  loss ") and lines[0].endswith("  *best")
    assert "val_auc 0.7000  val_acc 0.7500" in lines[1] and not lines[1].endswith("*best")
    cache = json.loads((res.run_dir / "config.json").read_text())["resolved"]["cache"]
    assert any(m.startswith("training simple on cpu (") and f", {cache} cache): 38 train / 10 val images, 5 epochs, "
               f"run {res.run_dir}" in m for m in logs.messages)


def test_patience_counts_from_the_last_improvement(store, tmp_path, monkeypatch):
    scripted_auc(monkeypatch, [0.5, 0.4, 0.6, 0.5, 0.7, 0.1])
    res = fit(small(store, tmp_path / "r", epochs=6, patience=2), progress=False)
    assert (res.best_epoch, res.last_epoch, res.best_auc) == (5, 6, 0.7)  # never two bad epochs in a row until 6


def test_checkpoint_records_the_averaged_weights_the_store_and_the_run(store, tmp_path, monkeypatch):
    cfg = small(store, tmp_path / "r", ema=0.5)
    res = fit(cfg, progress=False)
    ck = Checkpoint.load(res.run_dir / "best.pt")
    s = open_store(store)
    assert ck.arch == "simple" and ck.model_kwargs == cfg.resolved_model_args()
    assert np.allclose(ck.mean, s.mean) and np.allclose(ck.std, s.std)
    assert ck.store_path == str(store.resolve()) and ck.store_count == len(s) == 48
    assert ck.stain.method == "none" and ck.config == json.loads(json.dumps(cfg.to_dict()))
    resolved = json.loads((res.run_dir / "config.json").read_text())["resolved"]
    assert ck.precision == resolved["precision"] and ck.epoch == 1 and len(ck.metrics) == 1
    raw = Checkpoint.load(res.run_dir / "last.pt").training_state["train_weights"]
    # best.pt keeps the exponential average, not the raw weights the optimizer moved
    diffs = [not torch.equal(ck.weights[k], raw[k]) for k in raw if raw[k].is_floating_point() and "weight" in k]
    assert any(diffs)


def test_threads_and_seed_are_applied(store, tmp_path, monkeypatch):
    before = torch.get_num_threads()
    try:
        a = fit(small(store, tmp_path / "a", threads=2, seed=1), progress=False)
        assert torch.get_num_threads() == 2
        b = fit(small(store, tmp_path / "b", threads=1, seed=2), progress=False)
        assert torch.get_num_threads() == 1
        c = fit(small(store, tmp_path / "c", threads=2, seed=1), progress=False)
    finally:
        torch.set_num_threads(before)
    wa, wb, wc = (Checkpoint.load(r.run_dir / "best.pt").weights for r in (a, b, c))
    assert all(torch.equal(wa[k], wc[k]) for k in wa)             # the seed decides the run
    assert not all(torch.equal(wa[k], wb[k]) for k in wa)
    assert torch.backends.cudnn.benchmark is False                 # only on CUDA


def test_progress_bar_counts_each_epochs_images_on_stderr(store, tmp_path, capsys, monkeypatch):
    made = []
    real = loop.progress_bar
    monkeypatch.setattr(loop, "progress_bar", lambda **kw: made.append(kw) or real(**kw))
    fit(small(store, tmp_path / "r", epochs=2), progress=True)
    # 38 training rows in full batches of 16: the bar counts to 32 images
    assert made == [dict(total=32, desc="epoch 1/2", enabled=True), dict(total=32, desc="epoch 2/2", enabled=True)]
    err = capsys.readouterr().err
    assert "epoch 1/2" in err and "epoch 2/2" in err
    made.clear()
    fit(small(store, tmp_path / "q", epochs=1), progress=False)
    assert made == [dict(total=32, desc="epoch 1/1", enabled=False)] and "epoch 1/1" not in capsys.readouterr().err

def test_out_of_memory_suggests_half_the_batch_and_keeps_nothing(store, tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(loop, "train_one_epoch", oom)
    with pytest.raises(TrainingError, match=r"^out of GPU memory at --batch-size 16; try --batch-size 8$"):
        fit(small(store, tmp_path / "r"), progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(TrainingError, match=r"at --batch-size 1; try --batch-size 1$"):
        fit(small(store, tmp_path / "r", batch_size=1), progress=False)


def test_any_other_failure_before_a_checkpoint_leaves_no_folder(store, tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(loop, "train_one_epoch", broken)
    with pytest.raises(RuntimeError, match="boom"):
        fit(small(store, tmp_path / "r"), progress=False)
    assert not (tmp_path / "r").exists()


def test_nan_after_a_good_epoch_names_the_last_good_checkpoint(store, tmp_path, monkeypatch):
    real = loop.train_one_epoch
    calls = []

    def diverges_in_epoch_2(t, loader, bar=None):
        calls.append(1)
        st = real(t, loader, bar)
        return st if len(calls) == 1 else loop.EpochStats(float("nan"), st.images, 0, st.seconds)

    monkeypatch.setattr(loop, "train_one_epoch", diverges_in_epoch_2)
    last = tmp_path / "r" / "last.pt"
    with pytest.raises(TrainingError, match=rf"^loss became nan in epoch 2; try a lower --lr \(last good checkpoint: "
                                            rf"{last}\)$"):
        fit(small(store, tmp_path / "r", epochs=2), progress=False)
    assert Checkpoint.load(last).epoch == 1


def test_export_writes_the_onnx_model_beside_the_checkpoints(store, tmp_path):
    res = fit(small(store, tmp_path / "r", export=True), progress=False)
    assert (res.run_dir / "model.onnx").stat().st_size > 0
    assert not (fit(small(store, tmp_path / "q"), progress=False).run_dir / "model.onnx").exists()


def test_a_separate_validation_store_is_scored_whole(store, tmp_path, logs):
    other = learnable_store(tmp_path / "val", n=24)
    cfg = small(store, tmp_path / "r", val_store=str(other))
    res = fit(cfg, progress=False)
    resolved = json.loads((res.run_dir / "config.json").read_text())["resolved"]
    assert (resolved["train_rows"], resolved["val_rows"]) == (48, 24)


def test_tensorboard_log_gets_the_run_and_every_epoch(store, tmp_path, monkeypatch):
    calls = []

    class Recorder(loop.NullLog):
        def start(self, config, store, rows, augment, seed=0):
            calls.append(("start", config["epochs"], len(store), len(rows), augment, seed))

        def epoch(self, row, probs=None, labels=None, improved=False):
            calls.append(("epoch", row["epoch"], None if probs is None else len(probs),
                          None if labels is None else len(labels), improved))

    opened = []
    monkeypatch.setattr(loop, "open_log", lambda root, run_dir, main: opened.append((root, run_dir, main)) or Recorder())
    scripted_auc(monkeypatch, [0.6, 0.5])
    cfg = small(store, tmp_path / "r", epochs=2, seed=4, tensorboard=str(tmp_path / "tb"))
    fit(cfg, progress=False)
    assert opened == [(str(tmp_path / "tb"), tmp_path / "r", True)]
    assert calls == [("start", 2, 48, 38, cfg.augment, 4), ("epoch", 1, 2, 2, True), ("epoch", 2, 2, 2, False)]


def test_init_weights_loads_a_run_or_a_state_dict_and_refuses_what_does_not_fit(store, tmp_path, logs):
    first = fit(small(store, tmp_path / "a"), progress=False).run_dir / "best.pt"
    w = Checkpoint.load(first).weights
    res = fit(small(store, tmp_path / "b", init_weights=str(first), lr=1e-12, ema=0.0), progress=False)
    assert any(m.startswith(f"initialized from {first} (0 tensors missing, 0 unexpected)") for m in logs.messages)
    w2 = Checkpoint.load(res.run_dir / "best.pt").weights
    # a learning rate of 1e-12 leaves the loaded parameters (batch norm's running statistics still move)
    assert all(torch.allclose(w[k].float(), w2[k].float(), atol=1e-6) for k in w
               if "running" not in k and "num_batches" not in k)
    plain = tmp_path / "plain.pt"
    torch.save({k: v for k, v in w.items() if not k.startswith("backbone.head")}, plain)
    fit(small(store, tmp_path / "c", init_weights=str(plain)), progress=False)
    n_head = sum(1 for k in w if k.startswith("backbone.head"))
    assert n_head and any(m == f"initialized from {plain} ({n_head} tensors missing, 0 unexpected)"
                          for m in logs.messages)

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PcamError, match=rf"^{bad}: not a readable weights file \(UnpicklingError\)$"):
        fit(small(store, tmp_path / "d", init_weights=str(bad)), progress=False)
    code = tmp_path / "code.pt"   # a pickle that would run code on loading: weights-only loading refuses it
    torch.save({"backbone.head.weight": argparse.Namespace(a=1)}, code)
    with pytest.raises(PcamError, match=rf"^{code}: not a readable weights file \(UnpicklingError\)$"):
        fit(small(store, tmp_path / "d", init_weights=str(code)), progress=False)
    with pytest.raises(PcamError, match=rf"^{tmp_path / 'none.pt'}: --init-weights file not found$"):
        fit(small(store, tmp_path / "d", init_weights=str(tmp_path / "none.pt")), progress=False)
    other = tmp_path / "other.pt"
    torch.save({"unrelated.weight": torch.zeros(3)}, other)
    with pytest.raises(PcamError, match=rf"^{other}: no weight matches the model$"):
        fit(small(store, tmp_path / "d", init_weights=str(other)), progress=False)
    torch.save(torch.zeros(3), other)   # a tensor, not a state dict
    with pytest.raises(PcamError, match=rf"^{other}: no weight matches the model$"):
        fit(small(store, tmp_path / "d", init_weights=str(other)), progress=False)
    wrong = tmp_path / "wrong.pt"
    torch.save({"weights": {k: torch.zeros(1, *v.shape) for k, v in w.items()}}, wrong)
    with pytest.raises(PcamError, match=rf"^{wrong}: weights do not fit the model: "
                                        rf"Error\(s\) in loading state_dict for Classifier:$"):
        fit(small(store, tmp_path / "d", init_weights=str(wrong)), progress=False)
    assert not (tmp_path / "d").exists()


def test_a_fine_tuning_recipe_logs_when_the_backbone_freezes_and_thaws(store, tmp_path, monkeypatch, logs):
    # the built-in networks have no separate head; a transfer network's recipe is stood in for
    states = {1: True, 2: False, 3: None}
    monkeypatch.setattr(loop, "apply_epoch", lambda net, epoch, recipe: states[epoch])
    fit(small(store, tmp_path / "r", epochs=3), progress=False)
    assert [m for m in logs.messages if m.startswith("epoch ") and ": " in m.split("  ")[0]] == \
           ["epoch 1: head only (backbone frozen)", "epoch 2: all layers (backbone at lr x 1)"]


def test_resume_of_a_missing_run_creates_nothing(store, tmp_path):
    with pytest.raises(PcamError, match="not a run folder"):
        fit(small(store, tmp_path / "r"), resume=tmp_path / "nowhere" / "run", progress=False)
    assert not (tmp_path / "nowhere").exists()


def test_a_resume_that_fails_keeps_the_run_it_continued(store, tmp_path, monkeypatch):
    run = fit(small(store, tmp_path / "r", epochs=1), progress=False).run_dir
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(loop, "train_one_epoch", broken)
    with pytest.raises(RuntimeError, match="boom"):
        fit(small(store, run, epochs=2), resume=run, progress=False)
    kept = ("best.pt", "last.pt", "metrics.csv")   # config.json records the new --epochs before training starts
    assert {n: (run / n).read_bytes() for n in kept} == {n: before[n] for n in kept}


def test_a_resumed_run_with_export_replaces_its_onnx_model(store, tmp_path, monkeypatch):
    scripted_auc(monkeypatch, [0.6])
    run = fit(small(store, tmp_path / "r", epochs=1, export=True), progress=False).run_dir
    first = (run / "model.onnx").read_bytes()
    scripted_auc(monkeypatch, [0.9])   # epoch 2 is the new best: its weights are exported
    fit(small(store, run, epochs=2, export=True), resume=run, progress=False)
    assert (run / "model.onnx").read_bytes() != first


def test_an_unlabelled_validation_store_is_refused(store, tmp_path):
    from helpers import write_kaggle
    from pcamtool import pack

    write_kaggle(tmp_path / "u", n=8, split="test", labels=False)
    unlabelled = pack(tmp_path / "u" / "test", progress=False).path
    with pytest.raises(PcamError, match="no labels"):
        fit(small(store, tmp_path / "r", val_store=str(unlabelled)), progress=False)


def test_skipped_fp16_steps_are_counted_in_the_log_and_the_metrics(store, tmp_path, monkeypatch, logs):
    # fp16 runs only on CUDA; the loss scaler's count of skipped steps is stood in for
    monkeypatch.setattr(loop, "train_one_epoch", lambda t, loader, bar=None: loop.EpochStats(0.5, 32, 3, 0.25))
    res = fit(small(store, tmp_path / "r"), progress=False)
    line = next(m for m in logs.messages if m.startswith("epoch 1/1  loss 0.5000"))
    assert "  128 img/s  0.2s  (3 fp16 steps skipped)  *best" in line
    assert read_metrics(res.run_dir)[0]["skipped_steps"] == "3"
