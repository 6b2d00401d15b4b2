"""Run folders under faults: resume with changed options, foreign or garbled runs, NaN, Ctrl-C, full disk."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import pcamtool.train.loop as loop
from pcamtool.config import TrainConfig
from pcamtool.errors import Interrupted, PcamError
from pcamtool.train.loop import fit
from pcamtool.train.runs import build_model, load_checkpoint
from pcamtool.train.split import make_split

from helpers import default_sigint
from test_train import learnable_store, read_metrics, tiny


pytestmark = pytest.mark.usefixtures("no_curves")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return learnable_store(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def done(store, tmp_path_factory) -> Path:
    """A finished 1-epoch run, copied by tests that resume or damage it."""
    return fit(tiny(store, tmp_path_factory.mktemp("done") / "run", epochs=1), progress=False).run_dir


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_resume_with_more_epochs_replans_the_schedule(store, done, tmp_path):
    run = copy_run(done, tmp_path / "run")
    res = fit(TrainConfig(), resume=run, progress=False, overrides={"epochs": 3, "store": str(store)})
    rows = read_metrics(run)
    assert res.last_epoch == 3 and [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    lrs = [float(r["lr"]) for r in rows]
    # epoch 1 ended its 1-epoch schedule at lr/25,000; from there on the 3-epoch schedule rules
    assert lrs[0] == pytest.approx(3e-3 / 25_000) and lrs[1] > 100 * lrs[0] and lrs[2] == pytest.approx(lrs[0])
    steps = json.loads((run / "config.json").read_text())["resolved"]["train_rows"] // 16
    assert load_checkpoint(run / "last.pt")["scheduler"]["last_epoch"] == 3 * steps


def test_resume_refuses_other_changes_in_one_line(store, done, tmp_path):
    run = copy_run(done, tmp_path / "run")
    with pytest.raises(PcamError, match=r"^--resume: cannot change --lr, STORE on resume \(the run was trained "
                                        r"with --lr 0.003, STORE .*\); only --device, .*, --epochs, --patience, "
                                        r"--export, --tensorboard may change: start a new run with another -o instead$"):
        fit(TrainConfig(), resume=run, progress=False, overrides={"lr": 0.1, "store": str(tmp_path / "other.h5")})
    with pytest.raises(PcamError, match=r"cannot change --hed on resume \(the run was trained with --hed False\)"):
        fit(TrainConfig(), resume=run, progress=False, overrides={"augment": {"hed": True}, "patience": 2})
    same = fit(TrainConfig(), resume=run, progress=False, overrides={"epochs": 1, "lr": 3e-3})  # unchanged: fine
    assert same.last_epoch == 1 and len(read_metrics(run)) == 1
    state = torch.load(run / "last.pt", weights_only=True)
    state["epoch"] = 2
    torch.save(state, run / "last.pt")
    with pytest.raises(PcamError, match=r"^--epochs 1: .* has already trained 2 epochs$"):
        fit(TrainConfig(), resume=run, progress=False, overrides={"epochs": 1})


def test_resume_from_garbage_or_another_run_is_one_line(store, done, tmp_path):
    garbled = copy_run(done, tmp_path / "garbled")
    (garbled / "config.json").write_text("{not json")
    with pytest.raises(PcamError, match=r"config.json: not a readable run config \(JSONDecodeError\)$"):
        fit(TrainConfig(), resume=garbled, progress=False)
    (garbled / "config.json").write_text(json.dumps({"lr": -1, "resolved": {}}))
    with pytest.raises(PcamError, match=r"config.json: --lr must be"):
        fit(TrainConfig(), resume=garbled, progress=False)
    other = fit(tiny(store, tmp_path / "other", epochs=1, arch="pcamnet", model_kwargs={"width": 8}),
                progress=False).run_dir
    mixed = copy_run(done, tmp_path / "mixed")
    shutil.copy(other / "last.pt", mixed / "last.pt")
    with pytest.raises(PcamError) as err:
        fit(TrainConfig(), resume=mixed, progress=False)
    msg = str(err.value)
    assert "last.pt: belongs to another run (arch 'pcamnet'" in msg and "\n" not in msg
    (mixed / "last.pt").write_bytes(b"garbage")
    with pytest.raises(PcamError, match=r"last.pt: not a readable PyTorch checkpoint"):
        fit(TrainConfig(), resume=mixed, progress=False)


def test_nan_loss_stops_cleanly_and_the_same_command_runs_again(store, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(PcamError, match=r"^loss became (nan|inf) in epoch 1; try a lower --lr \(no checkpoint kept\)$"):
        fit(tiny(store, out, lr=1e30, epochs=1, optimizer="sgd"), progress=False)
    assert not out.exists()  # the run made the folder and never saved anything: nothing is left
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PcamError, match="loss became"):
        fit(tiny(store, out, lr=1e30, epochs=1, optimizer="sgd"), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # the user's folder and file stay
    assert fit(tiny(store, out, epochs=1), progress=False).last_epoch == 1


def test_folder_of_a_run_killed_before_its_first_checkpoint_is_reused(store, done, tmp_path):
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(done / "config.json", killed / "config.json")  # what SIGKILL in epoch 1 leaves
    assert fit(tiny(store, killed, epochs=1), progress=False).last_epoch == 1
    with pytest.raises(PcamError, match=r"holds a trained run \(last.pt\); continue it with 'pcamtool train "
                                        r"--resume .*' or choose another -o"):
        fit(tiny(store, killed, epochs=1), progress=False)
    users = tmp_path / "users"
    users.mkdir()
    (users / "config.json").write_text('{"mine": 1}')
    with pytest.raises(PcamError, match=r"config.json: exists and was not written by a pcamtool run"):
        fit(tiny(store, users, epochs=1), progress=False)
    assert (users / "config.json").read_text() == '{"mine": 1}'


def test_ctrl_c_says_what_was_kept(store, tmp_path, monkeypatch):
    real = loop.train_one_epoch
    calls = []

    def interrupted_in_epoch(n):
        def fake(t, loader, bar=None):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(t, loader, bar)
        return fake

    monkeypatch.setattr(loop, "train_one_epoch", interrupted_in_epoch(1))
    with pytest.raises(Interrupted, match="^stopped before the first epoch ended, so nothing was kept; the same command starts again$"):
        fit(tiny(store, tmp_path / "a"), progress=False)
    assert not (tmp_path / "a").exists()
    calls.clear()
    monkeypatch.setattr(loop, "train_one_epoch", interrupted_in_epoch(2))
    with pytest.raises(Interrupted, match=r"b keeps every finished epoch; continue with: pcamtool train --resume .*b$"):
        fit(tiny(store, tmp_path / "b"), progress=False)
    assert (tmp_path / "b" / "last.pt").is_file() and len(read_metrics(tmp_path / "b")) == 1


@pytest.mark.parametrize("fault", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:778] . "
                                                "PytorchStreamWriter failed writing file data/3: file write failed")])
def test_full_disk_while_checkpointing_is_one_line_naming_the_file(store, tmp_path, monkeypatch, fault):
    def full(obj, f, *a, **k):
        f.write(b"half") if hasattr(f, "write") else Path(f).write_bytes(b"half")
        raise fault

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(PcamError) as err:
        fit(tiny(store, tmp_path / "full", epochs=1), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "full" / "last.pt") in msg
    assert ("No space left on device" in msg) if isinstance(fault, OSError) else ("failed writing" in msg)
    assert not (tmp_path / "full").exists()  # nothing half-written, no empty folder


def test_checkpoint_keeps_full_model_args_and_rebuilds_after_a_default_changed(store, tmp_path, monkeypatch):
    import functools

    import pcamtool.models as models

    res = fit(tiny(store, tmp_path / "r", epochs=1, model_kwargs={"width": 4}), progress=False)
    ckpt = load_checkpoint(res.run_dir / "best.pt")
    assert ckpt["model"]["kwargs"]["width"] == 4 and ckpt["model"]["kwargs"]["hidden"] == 256
    assert set(ckpt["model"]["kwargs"]) == set(models.resolve_model_args("simple", {}))
    monkeypatch.setitem(models._REGISTRY, "simple", functools.partial(models.SimpleCNN, hidden=64))
    assert models.resolve_model_args("simple", {})["hidden"] == 64
    net = build_model(ckpt)  # the recorded hidden=256 wins over the new default
    assert net(torch.zeros(2, 96, 96, 3, dtype=torch.uint8)).shape == (2,)
    last = load_checkpoint(res.run_dir / "last.pt")
    rows = json.loads((res.run_dir / "config.json").read_text())["resolved"]["train_rows"]
    assert last["sampler"] == {"epoch": 1, "seed": 0, "rows": rows, "world": 1} and last["rng"]["device"] == "cpu"


def test_cuda_checkpoint_resumes_on_the_cpu(store, done, tmp_path, caplog, monkeypatch):
    """A CUDA generator's state does not fit a CPU one: the run goes on, reseeded, and says so."""
    run = copy_run(done, tmp_path / "run")
    state = torch.load(run / "last.pt", weights_only=True)
    state["rng"] = {"device": "cuda", "augment": torch.zeros(16, dtype=torch.uint8),
                    "cpu": torch.get_rng_state(), "cuda": torch.zeros(16, dtype=torch.uint8)}
    torch.save(state, run / "last.pt")
    monkeypatch.setattr(__import__("logging").getLogger("pcamtool"), "propagate", True)
    with caplog.at_level("WARNING", logger="pcamtool"):
        res = fit(TrainConfig(), resume=run, progress=False, overrides={"epochs": 2})
    assert res.last_epoch == 2 and any("saved on cuda, resumed on cpu" in r.getMessage() for r in caplog.records)


def test_groups_fewer_than_folds_is_one_line():
    labels = np.array([0, 1] * 10)
    groups = np.array(["a", "b", "c"] * 6 + ["a", "b"])
    with pytest.raises(PcamError, match=r"^--groups: 3 groups cannot make 5 folds"):
        make_split(labels, folds=5, fold=0, groups=groups)
    with pytest.raises(PcamError, match=r"^--groups: 3 groups cannot make 5 folds"):
        make_split(labels, val_frac=0.2, groups=groups)
    tr, va = make_split(labels, folds=3, fold=0, groups=groups)
    assert not set(groups[tr]) & set(groups[va])


def test_ctrl_c_on_the_command_line_is_one_line_and_exit_130(store, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pcamtool.cli import cli

    def interrupted(t, loader, bar=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    out = tmp_path / "cli"
    r = CliRunner().invoke(cli, ["train", str(store), "-o", str(out), "--arch", "simple", "--model-arg", "width=4",
                                 "--epochs", "1", "--device", "cpu", "--threads", "1"])
    assert r.exit_code == 130, r.output
    assert r.output.strip().splitlines()[-1] == ("Interrupted: stopped before the first epoch ended, so nothing "
                                                 "was kept; the same command starts again")
    assert "Traceback" not in r.output and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_train_killed_mid_run_resumes_to_the_uninterrupted_metrics(store, tmp_path, sig):
    """A real kill (SIGKILL, or Ctrl-C's SIGINT) of `pcamtool train` after its first checkpoint:
    `--resume` finishes the run with the same metrics as a run never interrupted."""
    import signal
    import subprocess
    import sys
    import time

    epochs = 6
    full = fit(tiny(store, tmp_path / "full", epochs=epochs), progress=False)
    run = tmp_path / "killed"
    base = [sys.executable, "-m", "pcamtool", "-q", "train"]
    opts = ["--arch", "simple", "--model-arg", "width=8", "--epochs", str(epochs), "--batch-size", "16",
            "--lr", "0.003", "--device", "cpu", "--threads", "1"]
    p = subprocess.Popen(base + [str(store), "-o", str(run), *opts], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while not (run / "last.pt").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    p.send_signal(getattr(signal, sig))
    out, err = p.communicate(timeout=120)
    assert p.returncode == (-signal.SIGKILL if sig == "SIGKILL" else 130), err
    if sig == "SIGINT":
        assert err.strip().splitlines()[-1].endswith(f"continue with: pcamtool train --resume {run}")
        assert "Traceback" not in err
    # killed at once after the first checkpoint: maybe before metrics.csv was (re)written
    assert (run / "last.pt").exists()
    assert not (run / "metrics.csv").exists() or len(read_metrics(run)) < epochs
    r = subprocess.run(base + ["--resume", str(run)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    keys = ("epoch", "train_loss", "val_loss", "val_auc")
    assert [[row[k] for k in keys] for row in read_metrics(run)] == \
           [[row[k] for k in keys] for row in read_metrics(full.run_dir)]
    assert not list(run.glob(".*.partial"))  # the killed run's temporary was cleaned up


def test_fit_reads_its_cfg_on_resume(store, done, tmp_path):
    """``fit(cfg, resume=RUN)`` used to ignore ``cfg``: what it sets differently now counts as given."""
    run = copy_run(done, tmp_path / "run")
    with pytest.raises(PcamError, match=r"cannot change --lr on resume \(the run was trained with --lr 0.003\)"):
        fit(tiny(store, run, epochs=2, lr=0.1), resume=run, progress=False)
    res = fit(tiny(store, run, epochs=2, threads=2), resume=run, progress=False)
    assert res.last_epoch == 2 and [r["epoch"] for r in read_metrics(run)] == ["1", "2"]
    assert json.loads((run / "config.json").read_text())["threads"] == 2


def test_checkpoint_validation_rows_are_the_rows_training_scored(store, tmp_path, monkeypatch):
    """One split: the rows ``evaluate`` saw in training are the ones ``Checkpoint.validation_rows`` rebuilds."""
    from pcamtool.io.store import open_store
    from pcamtool.train.checkpoint import Checkpoint

    seen: list[np.ndarray] = []
    real = loop.evaluate

    def spy(net, loader, *args, **kwargs):
        seen.append(np.sort(np.concatenate([b.index for b in loader])))
        return real(net, loader, *args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", spy)
    run = fit(tiny(store, tmp_path / "run", epochs=1, folds=4, fold=2, max_train=40), progress=False).run_dir
    ck = Checkpoint.load(run / "best.pt")
    rows = ck.validation_rows(open_store(store))
    assert len(seen) == 1 and np.array_equal(np.sort(rows), seen[0])
    train_rows = ck.split(open_store(store))[0]
    assert len(train_rows) == 40 and not set(train_rows) & set(rows)


def test_resume_refuses_a_store_restained_with_the_same_count(tmp_path):
    from pcamtool import pack

    store_path = learnable_store(tmp_path, n=40)
    run = fit(tiny(store_path, tmp_path / "run", epochs=1), progress=False).run_dir
    pack(tmp_path / "train", out=store_path, stain="reinhard", force=True, progress=False)   # same 40 rows
    with pytest.raises(PcamError, match=r"packed with stain normalization 'reinhard'.*normalized with 'none'"):
        fit(tiny(store_path, run, epochs=2), resume=run, progress=False)
    assert [r["epoch"] for r in read_metrics(run)] == ["1"]


def test_a_second_train_into_the_same_folder_is_refused(store, done, tmp_path):
    """While one run holds the folder (the lock pack takes), another train or --resume into it is one line."""
    from pcamtool.errors import BusyError
    from pcamtool.io.fsutil import output_lock

    run = copy_run(done, tmp_path / "run")
    with output_lock(tmp_path / "new"):   # what a running 'train -o new' holds
        with pytest.raises(BusyError, match=r"new: being written by another process \(pid \d+\)"):
            fit(tiny(store, tmp_path / "new"), progress=False)
    assert not (tmp_path / "new").exists()
    before = (run / "last.pt").stat().st_mtime_ns
    with output_lock(run):
        with pytest.raises(BusyError, match="being written by another process"):
            fit(tiny(store, run, epochs=2), resume=run, progress=False)
    assert (run / "last.pt").stat().st_mtime_ns == before
