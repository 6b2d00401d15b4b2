"""What a hostile user broke in training, cv, export and inference (issue 24, section 3).

Each test is one reported case; it failed (a traceback, exit 0 on bad input,
a silent ensemble short of a fold, a message naming the wrong thing) before
the fix it guards.
"""
from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from pcamtool import pack
from pcamtool.cli import cli
from pcamtool.config import AugmentConfig, TrainConfig
from pcamtool.errors import ModelError, PcamError
from pcamtool.export import export_onnx
from pcamtool.infer import predict
from pcamtool.train.checkpoint import Checkpoint
from pcamtool.train.cv import PREDICTIONS, run_cv
from pcamtool.train.loop import fit

from helpers import write_kaggle


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def _tiny(store: Path, **kw) -> TrainConfig:
    base = dict(store=str(store), arch="simple", model_kwargs={"width": 8}, epochs=1, batch_size=16,
                device="cpu", threads=1, augment=AugmentConfig.off())
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A store of 60 labelled patches, a one-epoch run on it, and its exported model.onnx."""
    root = tmp_path_factory.mktemp("hostile-run")
    write_kaggle(root, n=60)
    store = pack(root / "train", progress=False).path
    res = fit(_tiny(store, out=str(root / "run")), progress=False)
    model = export_onnx(res.run_dir).path
    return store, res.run_dir, model


def _edited_checkpoint(src: Path, dst: Path, **changes) -> Path:
    d = torch.load(src, map_location="cpu", weights_only=True)
    for k, v in changes.items():
        if v is KeyError:
            del d[k]
        else:
            d[k] = v
    torch.save(d, dst)
    return dst


def _edited_model(src: Path, dst: Path, **meta: str) -> Path:
    proto = onnx.load(str(src))
    for entry in proto.metadata_props:
        if entry.key in meta:
            entry.value = meta[entry.key]
    onnx.save(proto, str(dst))
    return dst


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("weights", [KeyError, None, {}, "tensor"])
def test_export_of_a_checkpoint_without_weights_is_one_line(run, tmp_path, weights):
    _, run_dir, _ = run
    value = torch.zeros(3, 3) if weights == "tensor" else weights
    ck = _edited_checkpoint(run_dir / "best.pt", tmp_path / "noweights.pt", weights=value)
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(cli, ["-q", "export", str(ck), "-o", str(out)])
    assert r.exit_code == 1
    line = _one_error_line(r.output)
    assert str(ck) in line and ("no weights" in line or "not a state dict" in line), line
    assert not out.exists() and not list(tmp_path.glob(".m.onnx*"))


@pytest.mark.parametrize("model", [{"name": "simple", "kwargs": {"width": -3}}, {"name": "no-such-net"}])
def test_export_of_a_checkpoint_whose_model_cannot_be_built_names_the_file(run, tmp_path, model):
    _, run_dir, _ = run
    ck = _edited_checkpoint(run_dir / "best.pt", tmp_path / "model.pt", model=model)
    r = CliRunner().invoke(cli, ["-q", "export", str(ck), "-o", str(tmp_path / "m.onnx")])
    assert r.exit_code == 1
    line = _one_error_line(r.output)
    assert line.startswith(f"Error: {ck}: ") and "model" in line, line
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("stain", [
    "banana",                                                            # not a mapping
    {"method": "reinhard", "mean": [1, 2]},                              # misshapen, std missing
    {"method": "reinhard", "mean": [50, 0, 0], "std": [0, 0, 0]},        # every patch to one colour
    {"method": "macenko", "stain_matrix": [[0, 0, 0], [0, 0, 0]], "max_concentrations": [1, 1]},
    {"method": "sepia"},
])
def test_export_of_a_checkpoint_with_malformed_stain_is_refused(run, tmp_path, stain):
    _, run_dir, _ = run
    ck = _edited_checkpoint(run_dir / "best.pt", tmp_path / "stain.pt", stain=stain)
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(cli, ["-q", "export", str(ck), "-o", str(out)])
    assert r.exit_code == 1
    line = _one_error_line(r.output)
    assert str(ck) in line and "stain" in line, line
    assert not out.exists()


@pytest.mark.parametrize("stain", ["{not json", '{"method": "reinhard"}', '"reinhard"',
                                   '{"method": "reinhard", "mean": [50, 0, 0], "std": [-1, 1, 1]}'])
def test_infer_with_malformed_stain_metadata_is_one_line(run, tmp_path, stain):
    store, _, model = run
    bad = _edited_model(model, tmp_path / "bad.onnx", stain=stain)
    r = CliRunner().invoke(cli, ["-q", "infer", str(store), "-m", str(bad), "--tta", "1", "--provider", "cpu"])
    assert r.exit_code == 1
    line = _one_error_line(r.output)
    assert str(bad) in line and "stain" in line, line


def test_a_model_of_a_newer_format_version_is_refused(run, tmp_path):
    store, _, model = run
    newer = _edited_model(model, tmp_path / "v2.onnx", format_version="2")
    r = CliRunner().invoke(cli, ["-q", "infer", str(store), "-m", str(newer), "--tta", "1", "--provider", "cpu"])
    assert r.exit_code == 1
    line = _one_error_line(r.output)
    assert str(newer) in line and "format_version 2" in line and "upgrade pcamtool" in line, line
    for raw in ("x", "0", "-1"):
        with pytest.raises(ModelError, match="format_version"):
            Checkpoint.from_onnx_metadata({**Checkpoint.from_onnx_metadata(
                {p.key: p.value for p in onnx.load(str(model)).metadata_props}).to_onnx_metadata(),
                "format_version": raw}, "m.onnx")
    # files written before the key existed, and today's version 1, still load
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert meta["format_version"] == "1"
    del meta["format_version"]
    assert Checkpoint.from_onnx_metadata(meta, "old.onnx").arch == "simple"


def test_export_failures_name_the_output_not_a_temporary(run, tmp_path, monkeypatch):
    _, run_dir, _ = run
    out = tmp_path / "asked.onnx"

    def writes_garbage(model, args, f, **kw):   # an exporter that leaves a file that does not parse
        Path(f).write_bytes(b"\x08\xff\xff\xff garbage")

    with monkeypatch.context() as m:
        m.setattr(torch.onnx, "export", writes_garbage)
        with pytest.raises(PcamError) as info:
            export_onnx(run_dir, out)
    msg = str(info.value)
    assert msg.startswith(str(out)) and ".partial" not in msg and "does not load back" in msg, msg
    assert not out.exists() and not list(tmp_path.glob(".asked.onnx.*"))

    # --int8 works in the temporary folder: a temporary folder that cannot be used is named as such
    missing = tmp_path / "no-such-tmp"
    monkeypatch.setattr(tempfile, "tempdir", str(missing))
    r = CliRunner().invoke(cli, ["-q", "export", str(run_dir), "--int8", "-o", str(out)])
    assert r.exit_code == 1
    line = _one_error_line(r.output)
    assert line.startswith(f"Error: {out}") and "fp32.onnx" not in line and "pcamtool-export-" not in line, line
    assert "TMPDIR" in line and str(missing) in line, line
    assert not out.exists()


# ------------------------------------------------------------------ training options


def test_val_frac_beside_folds_is_refused(run, tmp_path):
    store, _, _ = run
    for cmd in ("train", "cv"):
        r = CliRunner().invoke(cli, ["-q", cmd, str(store), "-o", str(tmp_path / cmd), "--folds", "2",
                                     "--val-frac", "0.3", "--epochs", "1"])
        assert r.exit_code == 1
        line = _one_error_line(r.output)
        assert "--val-frac 0.3" in line and "--folds" in line, line
        assert not (tmp_path / cmd).exists()
    # cv without --folds still splits into folds (5 by default): --val-frac is just as ignored
    r = CliRunner().invoke(cli, ["-q", "cv", str(store), "-o", str(tmp_path / "cv5"), "--val-frac", "0.3",
                                 "--epochs", "1"])
    assert r.exit_code == 1
    assert "--val-frac 0.3" in _one_error_line(r.output)
    assert not (tmp_path / "cv5" / "fold0").exists()


@pytest.mark.parametrize("cmd", ["train", "cv"])
def test_more_folds_than_a_class_has_images_is_one_line(run, tmp_path, cmd):
    store, _, _ = run
    r = CliRunner().invoke(cli, ["-q", cmd, str(store), "-o", str(tmp_path / "o"), "--folds", "300",
                                 "--epochs", "1", "--device", "cpu", "--threads", "1"])
    assert r.exit_code == 1
    line = _one_error_line(r.output)
    assert "--folds 300" in line and "24 positive images" in line, line


@pytest.mark.parametrize("arg", ["img_size=5000", "img_size=128"])
def test_model_args_that_an_option_decides_are_refused(run, arg):
    """--img-size always reaches a timm network, so --model-arg img_size was recorded and then overwritten."""
    store, _, _ = run
    r = CliRunner().invoke(cli, ["-q", "train", str(store), "--arch", "timm:resnet18", "--model-arg", arg,
                                 "--epochs", "1"])
    assert r.exit_code == 1
    key = arg.split("=")[0]
    line = _one_error_line(r.output)
    assert f"--model-arg {key}=" in line and f"--{key.replace('_', '-')}" in line, line
    with pytest.raises(PcamError, match="--model-arg img_size"):
        TrainConfig(store=str(store), arch="timm:resnet18", model_kwargs={"img_size": 5000})


def test_epochs_are_bounded(run, tmp_path):
    store, _, _ = run
    r = CliRunner().invoke(cli, ["-q", "train", str(store), "--epochs", "99999999999999999999"])
    assert r.exit_code == 2 and "Traceback" not in r.output and "--epochs" in r.output
    with pytest.raises(PcamError, match="--epochs must be at most 10,000"):
        TrainConfig(store=str(store), epochs=10**20)
    # a run's config.json is held to the same bound
    bad = {**_tiny(store).to_dict(), "epochs": 10**20}
    with pytest.raises(PcamError, match=r"cfg\.json: --epochs"):
        TrainConfig.from_dict(bad, source="cfg.json")


def test_resume_messages_name_the_runs_own_arch(run, tmp_path):
    """--img-size on resume is checked against the run's arch, not the default plain4."""
    _, run_dir, _ = run
    for opt in (["--img-size", "128"], ["--pretrained", str(tmp_path / "w.safetensors")]):
        r = CliRunner().invoke(cli, ["-q", "train", "--resume", str(run_dir), *opt])
        assert r.exit_code == 1
        line = _one_error_line(r.output)
        assert "'simple'" in line and "plain4" not in line, line
    # cv --resume of a folder that is no cv run says so, instead of judging --img-size against plain4
    r = CliRunner().invoke(cli, ["-q", "cv", "--resume", str(run_dir), "--img-size", "128"])
    assert r.exit_code == 1
    assert f"{run_dir}: not a cv run to resume (no cv_config.json)" in _one_error_line(r.output)


@pytest.mark.slow
@pytest.mark.timm
def test_resume_of_a_timm_run_refuses_img_size_as_a_change(run, tmp_path):
    """The reported case: --img-size on resume of a timm run was refused as "not 'plain4'"."""
    store, _, _ = run
    out = tmp_path / "timm"
    r = CliRunner().invoke(cli, ["-q", "train", str(store), "--arch", "timm:resnet10t", "--epochs", "1",
                                 "--batch-size", "8", "--max-train", "16", "--device", "cpu", "--threads", "1",
                                 "--no-flip", "--no-color", "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["-q", "train", "--resume", str(out), "--img-size", "128"])
    assert r.exit_code == 1
    line = _one_error_line(r.output)
    assert "cannot change --img-size on resume (the run was trained with --img-size 96)" in line, line
    assert "plain4" not in line and line.count("--tensorboard") == 1, line


# ------------------------------------------------------------------ cv folders


def test_cv_resume_redoes_a_deleted_export_and_infer_refuses_a_short_ensemble(run, tmp_path):
    store, _, _ = run
    out = tmp_path / "cv"
    run_cv(_tiny(store), folds=2, out=out, progress=False)
    fold0 = (out / "fold0" / "model.onnx").stat().st_mtime_ns
    (out / "fold1" / "model.onnx").unlink()

    # infer on the folder: one line naming the missing fold, not the mean of those left
    r = CliRunner().invoke(cli, ["-q", "infer", str(store), "-m", str(out), "--tta", "1", "--provider", "cpu"])
    assert r.exit_code == 1
    line = _one_error_line(r.output)
    assert str(out / "fold1" / "model.onnx") in line and "2 folds" in line and "--resume" in line, line

    # a damaged val_predictions.csv (the fold's out-of-fold rows) is predicted again, not a traceback
    preds = out / "fold0" / PREDICTIONS
    want = preds.read_text()
    preds.write_text("id,label,prob\nabc,1,not-a-number\n")
    r = CliRunner().invoke(cli, ["cv", "--resume", str(out), "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and f"{preds}: unreadable" in r.output
    assert (out / "fold1" / "model.onnx").is_file()                       # exported again
    assert (out / "fold0" / "model.onnx").stat().st_mtime_ns == fold0     # the whole fold was not redone
    with open(preds, newline="") as f:
        again = [float(r["prob"]) for r in csv.DictReader(f)]
    with open(out / "oof.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 60
    assert np.allclose(again, [float(x.split(",")[2]) for x in want.strip().splitlines()[1:]], atol=2e-6)
    assert json.loads((out / "cv.json").read_text())["fold_results"][1]["onnx"] == str(out / "fold1" / "model.onnx")
    both = predict(store, [out], tta=1, provider="cpu", progress=False)
    assert len(both.probs) == 60
