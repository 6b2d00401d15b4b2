"""Export (ONNX parity, metadata) and inference (TTA invariance, ensembles, shards, bad input)."""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import tifffile
from click.testing import CliRunner

from pcamtool import pack
from pcamtool.cli import cli
from pcamtool.errors import PcamError
from pcamtool.export import export_onnx
from pcamtool.infer import predict
from pcamtool import onnx_io
from pcamtool.onnx_io import ModelSession, open_session, choose_providers
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
    assert choose_providers("auto")[-1] == "CPUExecutionProvider"


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



# ------------------------------------------------------- providers (issue 10)

FAKE_PROBLEMS = {"cpu": None,
                 "cuda": "its libraries do not load (libcublasLt.so.13: cannot open shared object file)",
                 "tensorrt": "its libraries do not load (libnvinfer.so.10: cannot open shared object file)"}


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_explicit_gpu_provider_that_cannot_load_is_one_line(trained, monkeypatch, provider):
    root, run, path = trained
    monkeypatch.setattr(onnx_io, "provider_problems", lambda: FAKE_PROBLEMS)
    r = CliRunner().invoke(cli, ["-q", "infer", str(root / "test"), "--model", str(path), "--provider", provider])
    assert r.exit_code == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1
    assert f"--provider {provider}" in r.stderr and FAKE_PROBLEMS[provider].split("(")[1][:12] in r.stderr
    assert "not a loadable ONNX model" not in r.stderr


@pytest.mark.skipif(onnx_io._gpu_present() is None, reason="a machine with an NVIDIA driver")
def test_this_cpu_machine_says_why_cuda_is_not_available(trained):
    root, run, path = trained
    problems = onnx_io.provider_problems()
    assert problems["cpu"] is None and "NVIDIA driver" in problems["cuda"] and problems["tensorrt"]
    for provider in ("cuda", "tensorrt"):
        r = CliRunner().invoke(cli, ["infer", str(root / "test"), "--model", str(path), "--provider", provider])
        assert r.exit_code == 1 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
        assert "NVIDIA driver" in r.stderr
    assert choose_providers("auto") == ["CPUExecutionProvider"]


class _FallsBackToCpu:
    """An onnxruntime session that says, like a real one missing cuDNN, that CUDA failed, and runs on the CPU."""

    real = None

    def __new__(cls, model, opts, providers=None, provider_options=None):
        os.write(2, b"2026-12-02 [W:onnxruntime:Default, pybind_state.cc:1295] Failed to create "
                    b"CUDAExecutionProvider: libcudnn.so.9: cannot open shared object file\n")
        return cls.real(model, opts, providers=["CPUExecutionProvider"])


def test_session_that_falls_back_to_cpu(trained, monkeypatch, caplog):
    import onnxruntime as ort

    root, run, path = trained
    monkeypatch.setattr(onnx_io, "provider_problems", lambda: {**FAKE_PROBLEMS, "cuda": None})
    monkeypatch.setattr(_FallsBackToCpu, "real", ort.InferenceSession)
    monkeypatch.setattr(ort, "InferenceSession", _FallsBackToCpu)
    with pytest.raises(PcamError, match=r"--provider cuda: onnxruntime did not load it .*libcudnn\.so\.9"):
        open_session(path, "cuda")
    monkeypatch.setattr(onnx_io, "_LOGGED", set())
    monkeypatch.setattr(logging.getLogger("pcamtool"), "propagate", True)  # the CLI tests turn it off
    with caplog.at_level(logging.INFO, logger="pcamtool"):
        auto = predict(root / "test", [path], tta=8, provider="auto", progress=False)
    said = sorted({r.getMessage() for r in caplog.records if "onnxruntime runs on" in r.getMessage()})
    assert len(said) == 1 and "runs on cpu" in said[0] and "libcudnn.so.9" in said[0]
    assert "libnvinfer" in said[0] and auto.providers == ["CPUExecutionProvider"]
    # auto chose CUDA first, so the TTA copies were made in the graph; the CPU ran it and agrees
    monkeypatch.undo()
    cpu = predict(root / "test", [path], tta=8, provider="cpu", progress=False)
    assert np.allclose(auto.probs, cpu.probs, atol=1e-5)


def test_tta_graph_matches_per_transform_runs(trained):
    import onnxruntime as ort

    from pcamtool.tta import tta_graph, tta_mean, tta_transforms

    root, run, path = trained
    plain = open_session(path, "cpu", tta=1)
    assert isinstance(plain, ModelSession) and not plain.tta_in_graph
    images = np.random.default_rng(1).integers(0, 256, (5, 96, 96, 3), dtype=np.uint8)
    for n in (2, 4, 8):
        ks = tta_transforms(n)
        wrapped = tta_graph(onnx.load(str(path)), ks)
        onnx.checker.check_model(wrapped)
        sess = ort.InferenceSession(wrapped.SerializeToString(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"images": images})[0]
        assert got.shape == (5,)
        assert np.allclose(got, tta_mean(plain.run, images, ks), atol=1e-6)
        one = sess.run(None, {"images": images[:1]})[0]   # batch 1 still reshapes right
        assert np.allclose(one, got[:1], atol=1e-6)


def test_export_fp16_parity_and_infer(trained):
    root, run, path = trained
    res = export_onnx(run, root / "half.onnx", fp16=True)
    assert res.metadata["precision"] == "fp16" and res.max_abs_diff <= 2e-2
    assert res.provider == "CPUExecutionProvider"
    model = onnx.load(str(res.path))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    half = predict(root / "test", [res.path], tta=2, provider="cpu", progress=False)
    full = predict(root / "test", [path], tta=2, provider="cpu", progress=False)
    assert half.ids == full.ids and np.abs(half.probs - full.probs).max() <= 2e-2


def test_tta_default_comes_from_the_model(trained, tmp_path):
    root, run, path = trained
    assert predict(root / "test", [path], provider="cpu", progress=False).tta == [8]
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "tta_default":
            prop.value = "2"
    onnx.save(model, str(tmp_path / "two.onnx"))
    assert predict(root / "test", [tmp_path / "two.onnx"], provider="cpu", progress=False).tta == [2]
    assert predict(root / "test", [tmp_path / "two.onnx"], tta=4, provider="cpu", progress=False).tta == [4]
    for prop in model.metadata_props:
        if prop.key == "tta_default":
            prop.value = "3"
    onnx.save(model, str(tmp_path / "three.onnx"))
    with pytest.raises(PcamError, match="tta_default '3'"):
        predict(root / "test", [tmp_path / "three.onnx"], provider="cpu", progress=False)


# --------------------------------------------------- hostile models (issue 14)

def _foreign_model(path: Path, keep_dims: bool) -> Path:
    """A model with pcamtool's metadata whose output is the mean pixel value: not a probability."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 96, 96, 3])
    y = helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1] if keep_dims else ["batch"])
    nodes = [helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("ReduceMean", ["m"], ["probability"], axes=[1], keepdims=int(keep_dims))]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in {"format": "pcamtool-onnx", "tta_default": "8", "stain": '{"method": "none"}'}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))
    return path


def test_model_with_wrong_output_is_one_line(trained, tmp_path):
    root, run, path = trained
    for keep_dims, says in ((True, "expected one FLOAT probability per image"),
                            (False, "is not a probability in [0, 1]")):
        bad = _foreign_model(tmp_path / f"bad{keep_dims}.onnx", keep_dims)
        r = CliRunner().invoke(cli, ["-q", "infer", str(root / "test"), "--model", str(bad), "--provider", "cpu"])
        assert r.exit_code == 1 and r.stdout == "", r.output
        assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr and str(bad) in r.stderr


def test_sample_beside_with_other_ids_names_the_option(trained, tmp_path):
    root, run, path = trained
    data = tmp_path / "data"
    data.mkdir()
    store = pack(root / "test", out=data / "test.h5", progress=False).path
    (data / "sample_submission.csv").write_text("id,label\nsomething_else,0\n")
    r = CliRunner().invoke(cli, ["-q", "infer", str(store), "--model", str(path), "--tta", "1"])
    assert r.exit_code == 1 and r.stdout == "" and "--sample" in r.stderr
    assert "beside" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_infer_output_on_a_full_disk_names_the_path(trained, tmp_path, monkeypatch):
    root, run, path = trained
    out = tmp_path / "sub.csv"
    real = Path.write_text

    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    r = CliRunner().invoke(cli, ["-q", "infer", str(root / "test"), "--model", str(path), "--tta", "1",
                                 "-o", str(out)])
    monkeypatch.setattr(Path, "write_text", real)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert str(out) in r.stderr and "No space left" in r.stderr and "partial" not in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_prefetched_keeps_order_and_raises_where_the_source_does():
    from pcamtool.infer import prefetched

    assert list(prefetched(iter(range(5)))) == [0, 1, 2, 3, 4]
    assert list(prefetched([])) == []

    def broken():
        yield 1
        raise PcamError("bad batch")

    got = []
    with pytest.raises(PcamError, match="bad batch"):
        for x in prefetched(broken()):
            got.append(x)
    assert got == [1]


def test_demo_runs_every_stage_and_times_it(tmp_path, caplog):
    from pcamtool.config import TrainConfig
    from pcamtool.demo import run_demo

    cfg = TrainConfig(arch="simple", model_kwargs={"width": 8}, epochs=1, batch_size=16, device="cpu", threads=1)
    with caplog.at_level(logging.INFO, logger="pcamtool"):
        res = run_demo(tmp_path / "demo", n_train=100, n_test=20, tta=2, train=cfg, progress=False)
    assert list(res.stage_seconds) == ["generate", "pack", "train", "export", "infer", "evaluate"]
    assert all(s >= 0 for s in res.stage_seconds.values()) and sum(res.stage_seconds.values()) <= res.seconds
    assert (res.run_dir / "model.onnx").is_file() and res.submission.is_file() and 0 <= res.test_auc <= 1
    table = next(r.getMessage() for r in caplog.records if "demo stage times" in r.getMessage())
    assert all(name in table for name in res.stage_seconds) and "total" in table
