"""The model contract: Checkpoint (.pt and ONNX metadata), files written by older pcamtool, and the defects
issue 23 found around it (predict_rows order, the fp16 head, tta_default, stain messages and threads)."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pcamtool import pack
from pcamtool.config import TrainConfig
from pcamtool.contract import Classifier, ProbabilityModel
from pcamtool.errors import ModelError, PcamError
from pcamtool.io.store import open_store
from pcamtool.models import create_model, resolve_model_args
from pcamtool.onnx_io import open_session
from pcamtool.stain import StainReference
from pcamtool.train.checkpoint import Checkpoint, split_rows
from pcamtool.train.runs import build_model, load_checkpoint

from helpers import write_kaggle

# Written by pcamtool at commit 1352290 (before Checkpoint existed): plain4 width 4, one epoch on
# 24 synthetic patches packed with --stain macenko; expected.json holds its outputs on fixed images.
OLD = Path(__file__).parent / "data" / "oldmain"


def old_images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)


def old_expected() -> dict:
    return json.loads((OLD / "expected.json").read_text())


def tiny_checkpoint(store_path: Path | None = None, count: int | None = None, **cfg) -> Checkpoint:
    torch.manual_seed(0)
    kwargs = resolve_model_args("plain4", {"width": 4})
    net = Classifier(create_model("plain4", **kwargs), [0.5, 0.4, 0.6], [0.2, 0.25, 0.3])
    config = TrainConfig(store=str(store_path or "x.h5"), arch="plain4", model_kwargs={"width": 4}, **cfg)
    return Checkpoint(arch="plain4", model_kwargs=kwargs, mean=(0.5, 0.4, 0.6), std=(0.2, 0.25, 0.3),
                      weights={k: v.clone() for k, v in net.state_dict().items()},
                      store_path=str(store_path) if store_path else None, store_count=count,
                      config=json.loads(json.dumps(config.to_dict())), epoch=3, best_auc=0.9, best_epoch=2)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ck")
    write_kaggle(root, n=30)
    return pack(root / "train", progress=False).path


# ------------------------------------------------------------------ older files

def test_old_checkpoint_loads_and_predicts_as_it_did():
    ck = Checkpoint.load(OLD / "best.pt")
    assert ck.arch == "plain4" and ck.model_kwargs["width"] == 4 and ck.tta_default == 8
    assert ck.stain.method == "macenko" and np.asarray(ck.stain.params["stain_matrix"]).shape == (2, 3)
    assert ck.store_count == 24 and ck.training_state is None and ck.epoch == 1
    with torch.no_grad():
        p = torch.sigmoid(ck.build_model()(torch.from_numpy(old_images()))).numpy()
    assert np.allclose(p, old_expected()["torch"], atol=1e-6)
    # the dict view older scripts use still works
    assert np.allclose(build_model(load_checkpoint(OLD / "best.pt"))(torch.from_numpy(old_images())).detach(),
                       ck.build_model()(torch.from_numpy(old_images())).detach())


def test_old_last_pt_keeps_its_training_state():
    ck = Checkpoint.load(OLD / "last.pt")
    assert set(ck.training_state) >= {"train_weights", "optimizer", "scheduler", "rng", "sampler"}
    assert ck.config["arch"] == "plain4" and ck.train_config().folds is None
    again = Checkpoint.from_dict(ck.to_dict())
    assert again.training_state.keys() == ck.training_state.keys()


def test_old_onnx_file_runs_and_describes_itself():
    sess = open_session(OLD / "model.onnx", "cpu", tta=1)
    assert np.allclose(sess.run(old_images()), old_expected()["onnx"], atol=1e-6)
    card = sess.checkpoint
    assert card.stain == Checkpoint.load(OLD / "best.pt").stain and card.tta_default == 8
    assert len(open_session(OLD / "model.onnx", "cpu").tta) == 8    # tta_default of the old file


def test_old_checkpoint_exports_with_new_metadata(tmp_path):
    from pcamtool.export import export_onnx

    res = export_onnx(OLD / "best.pt", tmp_path / "m.onnx", tta_default=4)   # its store is gone: random images
    assert res.max_abs_diff <= 1e-4
    sess = open_session(res.path, "cpu")
    assert len(sess.tta) == 4      # export sets tta_default, infer follows it (it was a constant "8")
    assert np.allclose(open_session(res.path, "cpu", tta=1).run(old_images()), old_expected()["onnx"], atol=1e-5)
    card = Checkpoint.from_onnx_metadata(res.metadata)
    old = Checkpoint.load(OLD / "best.pt")
    assert (card.arch, card.model_kwargs, card.mean, card.stain) == (old.arch, old.model_kwargs, old.mean, old.stain)
    with pytest.raises(PcamError, match="--tta 3"):
        export_onnx(OLD / "best.pt", tmp_path / "n.onnx", tta_default=3)
    assert not (tmp_path / "n.onnx").exists()


# ------------------------------------------------------------------ the contract itself

def test_round_trips_keep_every_field(tmp_path):
    ck = replace(tiny_checkpoint(), stain=StainReference("reinhard", {"mean": [1, 2, 3], "std": [0.5, 0.5, 0.5]}),
                 tta_default=2)
    back = Checkpoint.load(ck.save(tmp_path / "a.pt"))
    for name in ("arch", "model_kwargs", "mean", "std", "stain", "config", "epoch", "best_auc", "tta_default"):
        assert getattr(back, name) == getattr(ck, name), name
    assert all(torch.equal(back.weights[k], v) for k, v in ck.weights.items())
    card = Checkpoint.from_onnx_metadata(ck.to_onnx_metadata("fp16"))
    assert (card.stain, card.tta_default, card.mean, card.best_epoch) == (ck.stain, 2, ck.mean, 2)
    assert ck.to_onnx_metadata("fp16")["precision"] == "fp16"


@pytest.mark.parametrize("meta, match", [
    ({"format": "pcamtool-onnx", "tta_default": "3"}, "tta_default '3'"),
    ({"format": "pcamtool-onnx", "mean": "[1, 2]"}, "mean must be 3 finite"),
    ({"format": "pcamtool-onnx", "stain": '{"method": "macenko"}'}, "lacks 'stain_matrix'"),
    ({"format": "other"}, "not a pcamtool model"),
])
def test_bad_onnx_metadata_is_one_line(meta, match):
    with pytest.raises(ModelError, match=match) as err:
        Checkpoint.from_onnx_metadata(meta, "m.onnx")
    assert str(err.value).startswith("m.onnx: ") and "\n" not in str(err.value)


def test_foreign_and_future_checkpoints_refused(tmp_path):
    torch.save({"format": "pcamtool-checkpoint", "version": 99}, tmp_path / "v.pt")
    with pytest.raises(ModelError, match="version 99"):
        Checkpoint.load(tmp_path / "v.pt")
    torch.save({"weights": {}}, tmp_path / "f.pt")
    with pytest.raises(ModelError, match="not a pcamtool checkpoint"):
        Checkpoint.load(tmp_path / "f.pt")
    with pytest.raises(ModelError, match="no weights"):
        Checkpoint.from_onnx_metadata({"format": "pcamtool-onnx"}).build_model()


def test_stain_reference_is_typed_and_compared_by_value():
    a = StainReference("macenko", {"stain_matrix": np.eye(2, 3), "max_concentrations": (1, 2)})
    b = StainReference.from_json(a.to_json())
    assert a == b and a.params["max_concentrations"] == [1.0, 2.0]
    assert StainReference.from_dict(None) == StainReference("none") == StainReference.from_json("")
    with pytest.raises(PcamError, match=r"stain_matrix must be 6 finite numbers of shape \(2, 3\)"):
        StainReference("macenko", {"stain_matrix": [[1, 2, 3]], "max_concentrations": [1, 2]})
    with pytest.raises(PcamError, match="reinhard lacks 'std'"):
        StainReference("reinhard", {"mean": [1, 2, 3]})


# ------------------------------------------------------------------ defects of issue 23

def test_probability_model_leaves_the_callers_network_alone():
    net = Classifier(create_model("plain4", width=4), [0.5] * 3, [0.2] * 3)
    half = ProbabilityModel(net, torch.float16)
    assert all(p.dtype == torch.float32 for p in net.parameters())       # was converted in place
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert ProbabilityModel(net).net is net


def test_predict_rows_keeps_the_order_asked_for(small_store):
    from pcamtool.train.cv import predict_rows

    store = open_store(small_store)
    ck = tiny_checkpoint(small_store, len(store))
    rows = np.array([17, 3, 29, 3, 0, 11, 5, 22, 8])
    got = predict_rows(ck, store, rows, torch.device("cpu"), batch_size=4)
    net = ck.build_model()
    with torch.no_grad():
        want = torch.sigmoid(net(torch.from_numpy(store.gather(rows)))).numpy()
    assert np.allclose(got, want, atol=1e-6)
    assert np.ptp(want) > 1e-6    # the rows differ, so a misplaced result would show


def test_validation_rows_are_the_training_split(small_store, tmp_path):
    store = open_store(small_store)
    ck = tiny_checkpoint(small_store, len(store), folds=3, fold=1)
    tr, va = split_rows(ck.train_config(), store)
    assert np.array_equal(ck.validation_rows(store), va) and not set(tr) & set(va)
    assert len(tr) + len(va) == len(store)
    capped = split_rows(replace(ck.train_config(), max_train=5), store)
    assert len(capped[0]) == 5 and set(capped[0]) <= set(tr) and np.array_equal(capped[1], va)
    with pytest.raises(PcamError, match="30 rows, the model was trained on 29: not its training store"):
        replace(ck, store_count=29).validation_rows(store)


def test_int8_check_refuses_a_missing_groups_file(small_store, tmp_path):
    """A groups file that went away used to be dropped quietly: the check then ran on a split that leaks slides."""
    from pcamtool.quantize import _rows_for

    store = open_store(small_store)
    groups = tmp_path / "groups.csv"
    groups.write_text("id,group\n" + "".join(f"{i},g{n % 6}\n" for n, i in enumerate(store.ids)))
    ck = tiny_checkpoint(small_store, len(store), groups=str(groups))
    *_, va, how = _rows_for(ck, small_store)
    assert how == "the run's validation split" and len(va)
    groups.unlink()
    with pytest.raises(PcamError, match="groups.csv: file not found"):
        _rows_for(ck, small_store)


def test_stain_mismatch_names_the_reference_not_the_method_twice():
    from pcamtool.infer import _stain_transform

    a = StainReference("macenko", {"stain_matrix": np.eye(2, 3), "max_concentrations": [1, 2]})
    b = StainReference("macenko", {"stain_matrix": np.eye(2, 3), "max_concentrations": [1, 3]})
    with pytest.raises(PcamError) as err:
        _stain_transform(a, b, Path("t.h5"))
    msg = str(err.value)
    assert "another reference than the model's" in msg and "trained with 'macenko'" not in msg
    assert _stain_transform(a, a, Path("t.h5")) is None                     # packed the model's way: as is
    with pytest.raises(PcamError, match="'reinhard'.*but the model was trained with 'macenko'"):
        _stain_transform(a, StainReference("reinhard", {"mean": [1, 2, 3], "std": [1, 1, 1]}), Path("t.h5"))


def test_infer_normalizes_stain_on_every_worker(tmp_path, monkeypatch):
    """infer used to normalize on one thread while pack used every core."""
    import pcamtool.stain as stain_mod
    from pcamtool.infer import predict

    write_kaggle(tmp_path, n=6, split="test", labels=False)
    seen: list[int] = []
    real = stain_mod.normalize

    def spy(images, reference, out=None, workers=1):
        seen.append(workers)
        return real(images, reference, out, workers)

    monkeypatch.setattr(stain_mod, "normalize", spy)
    predict(tmp_path / "test", [OLD / "model.onnx"], tta=1, workers=3, provider="cpu", progress=False)
    assert seen and set(seen) == {3}


def test_infer_says_which_default_source_it_read(tmp_path, monkeypatch, caplog):
    from pcamtool.infer import default_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "test").mkdir(parents=True)
    (tmp_path / "data" / "test.h5").write_bytes(b"")
    with caplog.at_level("INFO", logger="pcamtool"):
        assert default_source() == Path("data/test")
    assert "reading data/test (data/test.h5 is there too" in caplog.text


@pytest.mark.parametrize("module, forbidden", [
    ("pcamtool.train.resume", "pcamtool.train.loop"),
    ("pcamtool.io.sources", "pcamtool.submission"),
    ("pcamtool.train.checkpoint", "torch"),
])
def test_no_import_reaches_up(module, forbidden):
    code = f"import sys, {module}; print({forbidden!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_export_command_reports_what_it_wrote_once(tmp_path):
    """It used to print two near-identical lines ('exported A -> B (...)' and 'wrote B (parity ...)')."""
    out = tmp_path / "m.onnx"
    r = subprocess.run([sys.executable, "-m", "pcamtool", "export", str(OLD / "best.pt"), "-o", str(out),
                        "--provider", "cpu"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if str(out) in line]
    assert len(said) == 1 and said[0].startswith(f"exported {OLD / 'best.pt'} -> {out}") and r.stdout == ""
