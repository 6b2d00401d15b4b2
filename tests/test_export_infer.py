"""Export (ONNX parity, metadata) and inference (TTA invariance, ensembles, shards, bad input)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import tifffile
from click.testing import CliRunner

from pcamtool import pack
from pcamtool.cli import cli
from pcamtool.config import TrainConfig
from pcamtool.errors import PcamError
from pcamtool.export import export_onnx
from pcamtool.infer import predict
from pcamtool.onnx_io import resolve_providers
from pcamtool.train.loop import fit

from helpers import write_kaggle
from test_train import learnable_store, tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    store = learnable_store(root, n=64)
    res = fit(tiny(store, root / "run", epochs=1, arch="pcamnet"), progress=False)
    onnx_path = export_onnx(res.run_dir).path
    write_kaggle(root, n=12, seed=5, split="test", labels=False)
    return root, res.run_dir, onnx_path


def test_export_metadata_and_parity(trained):
    root, run, path = trained
    assert path == run / "model.onnx"
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["format"] == "pcamtool-onnx" and meta["arch"] == "pcamnet"
    assert len(json.loads(meta["mean"])) == 3 and "NHWC uint8" in meta["input_layout"]
    assert float(meta["val_auc"]) >= 0 and meta["pcamtool_version"]
    inp = model.graph.input[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    res = export_onnx(run, root / "again.onnx")
    assert res.max_abs_diff <= 1e-4 and res.checked_images > 0


def test_export_refuses_overwrite_and_foreign(trained, tmp_path):
    root, run, path = trained
    with pytest.raises(PcamError, match="--force"):
        export_onnx(run, path)
    (tmp_path / "x.pt").write_bytes(b"nope")
    with pytest.raises(PcamError, match="not a readable PyTorch checkpoint"):
        export_onnx(tmp_path / "x.pt", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_tta8_invariant_to_dihedral(trained, tmp_path):
    root, run, path = trained
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    variants = [np.rot90(img, k) for k in range(4)] + [np.rot90(img[:, ::-1], k) for k in range(4)]
    folder = tmp_path / "d"
    folder.mkdir()
    for i, v in enumerate(variants):
        tifffile.imwrite(folder / f"{i}.tif", np.ascontiguousarray(v), photometric="rgb")
    p8 = predict(folder, [path], tta=8, progress=False).probs
    assert np.ptp(p8) <= 1e-5
    p1 = predict(folder, [path], tta=1, progress=False).probs
    assert np.ptp(p1) > np.ptp(p8)  # without TTA the transforms do change the output


def test_folder_and_store_agree_and_ensemble(trained):
    root, run, path = trained
    a = predict(root / "test", [path], tta=2, progress=False)
    store = pack(root / "test", progress=False, force=True).path
    b = predict(store, [path], tta=2, progress=False)
    assert a.ids == b.ids and np.allclose(a.probs, b.probs, atol=1e-6)
    c = predict(root / "test", [path, path], tta=2, progress=False)
    assert np.allclose(a.probs, c.probs, atol=1e-6)
    assert resolve_providers("auto")[-1] == "CPUExecutionProvider"


def test_cli_infer_stdout_sample_order_and_shards(trained, monkeypatch):
    root, run, path = trained
    ids = sorted(p.stem for p in (root / "test").glob("*.tif"))
    sample = list(reversed(ids))
    (root / "sample_submission.csv").write_text("id,label\n" + "\n".join(f"{i},0" for i in sample) + "\n")
    r = CliRunner().invoke(cli, ["-q", "infer", str(root / "test"), "--model", str(path), "--tta", "8"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "id,label" and [ln.split(",")[0] for ln in lines[1:]] == sample
    probs = [float(ln.split(",")[1]) for ln in lines[1:]]
    assert all(0 <= p <= 1 for p in probs)
    shards = []
    for i in range(3):
        out = root / f"shard{i}.csv"
        r = CliRunner().invoke(cli, ["-q", "infer", str(root / "test"), "--model", str(path), "--tta", "8",
                                     "--shard", f"{i}/3", "-o", str(out)])
        assert r.exit_code == 0, r.output
        shards.append(str(out))
    r = CliRunner().invoke(cli, ["-q", "merge", *shards, "--sample", str(root / "sample_submission.csv")])
    assert r.exit_code == 0, r.output
    merged = r.stdout.strip().splitlines()
    assert [ln.split(",")[0] for ln in merged[1:]] == sample
    assert np.allclose([float(ln.split(",")[1]) for ln in merged[1:]], probs, atol=1e-5)
    (root / "sample_submission.csv").unlink()


def test_infer_bad_input(trained, tmp_path):
    root, run, path = trained
    r = CliRunner().invoke(cli, ["-q", "infer", str(tmp_path / "none"), "--model", str(path)])
    assert r.exit_code == 1 and "not found" in r.output and r.stdout.count("id,label") == 0
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (root / "test").glob("*.tif"):
        (bad / f.name).write_bytes(f.read_bytes())
    victim = sorted(bad.glob("*.tif"))[2]
    victim.write_bytes(b"garbage")
    r = CliRunner().invoke(cli, ["-q", "infer", str(bad), "--model", str(path), "--tta", "1"])
    assert r.exit_code == 1 and victim.name in r.output and "id,label" not in r.stdout
    r = CliRunner().invoke(cli, ["infer", str(bad), "--model", str(path), "--tta", "1", "--skip-bad"])
    assert r.exit_code == 0 and len(r.stdout.strip().splitlines()) == 12 and victim.name in r.stderr
    notonnx = tmp_path / "m.onnx"
    notonnx.write_bytes(b"not a model")
    r = CliRunner().invoke(cli, ["-q", "infer", str(root / "test"), "--model", str(notonnx)])
    assert r.exit_code == 1 and "not a loadable ONNX model" in r.output
    r = CliRunner().invoke(cli, ["-q", "infer", str(root / "test"), "--model", str(path), "--tta", "3"])
    assert r.exit_code == 2
