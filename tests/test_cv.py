"""pcamtool cv: every fold trained, predicted and exported; out-of-fold AUC; resumable."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pcamtool import pack
from pcamtool.cli import cli
from pcamtool.config import AugmentConfig, TrainConfig
from pcamtool.errors import PcamError
from pcamtool.evaluate import binary_metrics
from pcamtool.io.store import open_store
from pcamtool.train import cv as cvmod
from pcamtool.train.cv import MARKER, run_cv

from helpers import write_kaggle

K = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cv")
    write_kaggle(root, n=60)
    return pack(root / "train", progress=False).path


def tiny(store: Path, **kw) -> TrainConfig:
    base = dict(store=str(store), arch="simple", model_kwargs={"width": 8}, epochs=1, batch_size=16,
                device="cpu", threads=1, augment=AugmentConfig.off())
    return TrainConfig(**{**base, **kw})


def mtimes(cv_dir: Path, name: str) -> list[int]:
    return [(cv_dir / f"fold{i}" / name).stat().st_mtime_ns for i in range(K)]


@pytest.mark.slow
def test_cv_trains_every_fold_and_resumes(store, tmp_path, monkeypatch):
    out = tmp_path / "cv"
    calls: list[int] = []
    real_export = cvmod._export

    def dies_on_fold1(fold_dir: Path, store_path: str) -> Path:  # a kill after fold 1 trained, before its export
        calls.append(int(fold_dir.name[4:]))
        if fold_dir.name == "fold1":
            raise KeyboardInterrupt
        return real_export(fold_dir, store_path)

    monkeypatch.setattr(cvmod, "_export", dies_on_fold1)
    with pytest.raises(KeyboardInterrupt):
        run_cv(tiny(store), folds=K, out=out, progress=False)
    assert calls == [0, 1]
    assert json.loads((out / "fold1" / MARKER).read_text())["stage"] == "trained"
    assert not (out / "fold2").exists() and not (out / "cv.json").exists()
    fold1_trained = (out / "fold1" / "last.pt").stat().st_mtime_ns
    fold0 = [(out / "fold0" / n).stat().st_mtime_ns for n in ("best.pt", "model.onnx")]

    monkeypatch.setattr(cvmod, "_export", real_export)
    res = run_cv(tiny(store), folds=K, out=out, progress=False)   # the same call continues
    # fold 0 untouched, fold 1 not retrained (only exported), fold 2 trained
    assert [(out / "fold0" / n).stat().st_mtime_ns for n in ("best.pt", "model.onnx")] == fold0
    assert (out / "fold1" / "last.pt").stat().st_mtime_ns == fold1_trained
    assert [f.fold for f in res.folds] == [0, 1, 2]
    for i in range(K):
        d = out / f"fold{i}"
        assert (d / "best.pt").is_file() and (d / "model.onnx").is_file()
        assert json.loads((d / MARKER).read_text())["stage"] == "done"
        assert json.loads((d / "config.json").read_text())["fold"] == i

    # every row predicted exactly once, by the fold that held it out; the OOF AUC is theirs
    s = open_store(store)
    with open(out / "oof.csv", newline="") as f:
        oof = list(csv.DictReader(f))
    assert sorted(r["id"] for r in oof) == sorted(s.ids)
    assert {int(r["fold"]) for r in oof} == {0, 1, 2}
    probs = np.array([float(r["prob"]) for r in oof])
    labels = np.array([int(r["label"]) for r in oof])
    want = binary_metrics(probs, labels)["auc"]
    report = json.loads((out / "cv.json").read_text())
    assert report["oof_rows"] == len(s) and report["folds"] == K
    assert report["oof_auc"] == pytest.approx(want, abs=1e-6)
    assert res.oof_auc == pytest.approx(want, abs=1e-6)
    with open(out / "cv.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["fold"] for r in table] == ["0", "1", "2", "oof"]
    assert sum(int(r["val_rows"]) for r in table[:K]) == len(s)
    for row, f in zip(table, res.folds):
        assert float(row["val_auc"]) == pytest.approx(f.val_auc, abs=1e-6)
        # the rows cv predicts are the rows the fold's training validated on
        assert json.loads((f.run_dir / "config.json").read_text())["resolved"]["val_rows"] == f.val_rows

    # a fold killed mid-training (last.pt but no marker) continues from last.pt instead of restarting
    (out / "fold2" / MARKER).unlink()
    before = mtimes(out, "best.pt")
    seen: list[object] = []
    real_fit = __import__("pcamtool.train.loop", fromlist=["fit"]).fit

    def spy(cfg, resume=None, progress=True, overrides=None):
        seen.append(resume)
        return real_fit(cfg, resume=resume, progress=progress)

    monkeypatch.setattr("pcamtool.train.loop.fit", spy)
    run_cv(tiny(store), folds=K, out=out, progress=False)
    assert seen == [out / "fold2"]
    assert mtimes(out, "best.pt") == before


def test_cv_refuses_other_options_and_val_store(store, tmp_path):
    out = tmp_path / "cv"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PcamError, match="not a cv run folder"):
        run_cv(tiny(store), folds=K, out=out, progress=False)
    with pytest.raises(PcamError, match="drop --val-store"):
        run_cv(tiny(store, val_store=str(store)), folds=K, out=tmp_path / "v", progress=False)
    with pytest.raises(PcamError, match="no cv_config.json"):
        run_cv(tiny(store), out=tmp_path / "none", resume=True, progress=False)


def test_a_second_cv_into_the_same_folder_is_refused(store, tmp_path):
    from pcamtool.errors import BusyError
    from pcamtool.io.fsutil import output_lock

    with output_lock(tmp_path / "cv"):   # what a running 'cv -o cv' holds
        with pytest.raises(BusyError, match="cv: being written by another process"):
            run_cv(tiny(store), folds=K, out=tmp_path / "cv", progress=False)
    assert not (tmp_path / "cv").exists()


def test_cv_command(store, tmp_path):
    out = tmp_path / "cvcli"
    args = ["-q", "cv", str(store), "-o", str(out), "--folds", "2", "--arch", "simple", "--model-arg", "width=8",
            "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--threads", "1", "--no-flip", "--no-color",
            "--no-export"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "out-of-fold AUC" in r.output and "fold 1" in r.output
    assert not (out / "fold0" / "model.onnx").exists()
    # the same folder with another learning rate is refused in one line, --fold is refused
    r = CliRunner().invoke(cli, args + ["--lr", "0.01"])
    assert r.exit_code == 1 and "--lr" in r.output and "--resume" in r.output
    r = CliRunner().invoke(cli, args[:-1] + ["--fold", "1"])
    assert r.exit_code == 1 and "cv trains every fold" in r.output
    r = CliRunner().invoke(cli, ["-q", "cv", "--resume", str(out), "--lr", "0.01"])
    assert r.exit_code == 1 and "--lr" in r.output
    # the library holds the same policy: a changed option in cfg is refused, not quietly dropped
    with pytest.raises(PcamError, match=r"cannot change --lr on resume .*only --device, --threads, --cache"):
        run_cv(tiny(store, lr=0.01), out=out, resume=True, progress=False)
    r = CliRunner().invoke(cli, ["-q", "cv", "--resume", str(out), "--threads", "1", "--no-export"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "cv.json").read_text())["folds"] == 2


def test_infer_with_a_cv_folder_averages_its_folds(store, tmp_path):
    """`infer --model CV_DIR` is the ensemble of its folds: the mean, or with --average rank the mean rank."""
    from scipy.stats import rankdata

    from pcamtool.infer import predict

    out = tmp_path / "cv"
    run_cv(tiny(store), folds=2, out=out, progress=False)
    folds = [out / "fold0" / "model.onnx", out / "fold1" / "model.onnx"]
    each = [predict(store, [m], tta=1, provider="cpu", progress=False).probs for m in folds]
    mean = predict(store, [out], tta=1, provider="cpu", progress=False)
    assert np.allclose(mean.probs, (each[0] + each[1]) / 2)
    rank = predict(store, [out], tta=1, provider="cpu", progress=False, average="rank")
    n = len(each[0])
    assert np.allclose(rank.probs, np.mean([(rankdata(p) - 1) / (n - 1) for p in each], axis=0))
    r = CliRunner().invoke(cli, ["-q", "infer", str(store), "--model", str(out), "--tta", "1", "--provider", "cpu",
                                 "--average", "rank"])
    assert r.exit_code == 0, r.output
    assert len(r.output.strip().splitlines()) == n + 1
    r = CliRunner().invoke(cli, ["-q", "infer", str(store), "--model", str(out), "--average", "rank",
                                 "--shard", "0/2"])
    assert r.exit_code == 1 and "--average rank" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["-q", "infer", str(store), "--model", str(tmp_path)])
    assert r.exit_code == 1 and "no fold*/model.onnx" in r.output
