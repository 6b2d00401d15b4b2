"""``export --int8``: static quantization, its AUC/probability check against fp32, and ``infer`` on it."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from pcamtool import pack, quantize
from pcamtool.cli import cli
from pcamtool.errors import ModelError, PcamError
from pcamtool.export import export_onnx
from pcamtool.infer import predict
from pcamtool.io.store import open_store
from pcamtool.train.loop import fit
from pcamtool.train.split import make_split

from helpers import write_kaggle
from test_train import learnable_store, tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A model trained on a store whose labels are 1 in 6 wrong: AUC < 1, so comparing AUCs means something."""
    root = tmp_path_factory.mktemp("int8")
    learnable_store(root, n=96)
    lines = (root / "train_labels.csv").read_text().splitlines()
    flipped = [f"{ln.split(',')[0]},{1 - int(ln.split(',')[1])}" if i % 6 == 0 else ln
               for i, ln in enumerate(lines[1:])]
    (root / "train_labels.csv").write_text("\n".join([lines[0], *flipped]) + "\n")
    store = pack(root / "train", progress=False, force=True).path
    res = fit(tiny(store, root / "run", epochs=2, arch="pcamnet"), progress=False)
    fp32 = export_onnx(res.run_dir, root / "fp32.onnx")
    write_kaggle(root, n=12, seed=5, split="test", labels=False)
    return root, res.run_dir, store, fp32.path


def test_int8_export_checked_and_recorded(run):
    root, run_dir, store, fp32 = run
    res = export_onnx(run_dir, root / "int8.onnx", int8=True)
    check = res.int8
    assert check is not None and check.split == "the run's validation split"
    # the run's own validation rows: the ones training reported its AUC on
    assert check.rows == 20 and 0.6 < check.auc_fp32 < 1.0
    y = open_store(store).labels[make_split(open_store(store).labels, 0.2, 0)[1]]
    one_pair = 1 / (np.sum(y) * np.sum(1 - y))   # on 20 rows one swapped pair may move the AUC this much
    assert abs(check.auc_delta) <= one_pair + 1e-9 and check.max_abs_diff <= quantize.PROB_TOLERANCE
    proto = onnx.load(str(res.path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["precision"] == "int8" and meta["format"] == "pcamtool-onnx"
    assert int(meta["int8_calibration_images"]) == 76 and float(meta["int8_auc_delta"]) == pytest.approx(
        check.auc_delta, abs=1e-6)
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert quantize.PREPROCESSING_INT8 in meta["int8_scheme"]
    # the uint8 image itself is the first quantized tensor (scale 1/255, zero point 0): no float preprocessing
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    first_conv = ops.index("Conv")
    assert ops[:2] == ["Transpose", "DequantizeLinear"] and not {"Cast", "Sub", "Mul", "Div"} & set(ops[:first_conv])
    w = weights_of(proto)
    transpose = proto.graph.node[0]
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == transpose.output[0])
    assert onnx.numpy_helper.to_array(w[dq.input[1]]) == np.float32(1 / 255)
    assert onnx.numpy_helper.to_array(w[dq.input[2]]) == 0
    # the normalization is a 1x1 int8 convolution 3 -> 4 channels, the stem sees a 4th channel of zeros
    norm = next(n for n in proto.graph.node if n.name == "pcamtool_normalize")
    assert norm.op_type == "Conv" and norm.input[0] == dq.output[0]
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    stem_w = onnx.numpy_helper.to_array(w[weights_dq_source(proto, convs[1].input[1])])
    assert convs[0] is norm and stem_w.shape[1] == 4 and not stem_w[:, 3].any() and stem_w[:, :3].any()
    # the head stays float: no probability rounded to 1/255 steps
    assert ops[-1] == "Sigmoid"
    assert float(meta["int8_mean_abs_diff"]) <= quantize.MEAN_TOLERANCE


def weights_of(proto) -> dict:
    return {t.name: t for t in proto.graph.initializer}


def weights_dq_source(proto, name: str) -> str:
    """The initializer behind a convolution's weight input (its DequantizeLinear's quantized tensor)."""
    node = next((n for n in proto.graph.node if name in n.output), None)
    return node.input[0] if node is not None and node.op_type == "DequantizeLinear" else name


def test_int8_rewrites_compute_the_same_floats(run, tmp_path):
    """Normalization as a 1x1 convolution (3 -> 4 channels) and tiled constants: the float graph's outputs stay."""
    from pcamtool.int8_rewrite import normalization_as_conv, tile_channel_constants
    from pcamtool.onnx_io import open_session

    from onnxruntime.quantization.shape_inference import quant_pre_process

    root, run_dir, store, fp32 = run
    pre = tmp_path / "pre.onnx"
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=False)   # as quantize_graph does first
    proto = onnx.load(str(pre))
    x01 = normalization_as_conv(proto)
    assert x01 is not None and normalization_as_conv(proto) is None      # once: the stem now has 4 channels
    assert tile_channel_constants(proto) >= 1                            # /255 became * (1/255)
    ops = [n.op_type for n in proto.graph.node]
    assert ops[:ops.index("Conv")] == ["Transpose", "Cast", "Mul"]
    rewritten = tmp_path / "rewritten.onnx"
    onnx.save(proto, str(rewritten))
    # the fallback alone (a graph normalization_as_conv does not recognise): /255, mean and std rewritten
    fallback = onnx.load(str(pre))
    assert tile_channel_constants(fallback) == 3
    tiled = [tuple(weights_of(fallback)[i].dims) for n in fallback.graph.node if n.op_type in ("Sub", "Mul")
             for i in n.input if i in weights_of(fallback)]
    assert tiled.count((1, 3, 96, 96)) == 2 and tile_channel_constants(fallback) == 0   # nothing left to change
    tiled_path = tmp_path / "tiled.onnx"
    onnx.save(fallback, str(tiled_path))
    x = open_store(store).gather(np.arange(32))
    a = open_session(fp32, "cpu", batch_size=32, tta=1).run(x)
    for path in (rewritten, tiled_path):
        b = open_session(path, "cpu", batch_size=32, tta=1).run(x)
        assert np.abs(a - b).max() < 1e-5


def test_uint8_input_fed_directly_is_exact(run, tmp_path, monkeypatch):
    """Dropping Cast -> /255 -> QuantizeLinear(1/255, 0) changes no output bit of the int8 graph."""
    root, run_dir, store, fp32 = run
    st = open_store(store)
    direct, kept = tmp_path / "direct.onnx", tmp_path / "kept.onnx"
    assert quantize.quantize_graph(fp32, direct, st, np.arange(64)) == quantize.PREPROCESSING_INT8
    monkeypatch.setattr(quantize, "feed_uint8_input", lambda proto, x01: False)
    quantize.quantize_graph(fp32, kept, st, np.arange(64))
    # a graph the rewrite does not recognise keeps float preprocessing, and says so
    monkeypatch.setattr(quantize, "normalization_as_conv", lambda proto: None)
    plain = tmp_path / "plain.onnx"
    assert quantize.quantize_graph(fp32, plain, st, np.arange(64)) == quantize.PREPROCESSING_FLOAT
    assert "Sub" in [n.op_type for n in onnx.load(str(plain)).graph.node]
    ops = {p: [n.op_type for n in onnx.load(str(p)).graph.node] for p in (direct, kept)}
    graph = onnx.load(str(direct)).graph
    read = {name for n in graph.node for name in n.input}
    assert all(t.name in read for t in graph.initializer)   # onnxruntime would warn on stderr about each unused one
    assert "Cast" not in ops[direct] and "Cast" in ops[kept]
    from pcamtool.onnx_io import open_session

    # white and black pixels included: the ends of the 1/255 scale
    x = np.concatenate([st.gather(np.arange(30)), np.zeros((1, 96, 96, 3), np.uint8),
                        np.full((1, 96, 96, 3), 255, np.uint8)])
    a = open_session(direct, "cpu", batch_size=32, tta=1).run(x)
    b = open_session(kept, "cpu", batch_size=32, tta=1).run(x)
    assert np.array_equal(a, b)


def test_infer_runs_int8_unchanged(run):
    root, run_dir, store, fp32 = run
    int8 = root / "int8-infer.onnx"
    r = CliRunner().invoke(cli, ["-q", "export", str(run_dir), "--int8", "-o", str(int8)])
    assert r.exit_code == 0, r.output
    a = predict(root / "test", [fp32], tta=8, provider="cpu", progress=False)
    b = predict(root / "test", [int8], tta=8, provider="cpu", progress=False)
    assert a.ids == b.ids and len(b.probs) == 12
    assert np.abs(a.probs - b.probs).max() <= quantize.PROB_TOLERANCE
    assert not np.allclose(a.probs, b.probs, atol=1e-7)  # it really is another graph
    r = CliRunner().invoke(cli, ["-q", "infer", str(root / "test"), "--model", str(int8), "--provider", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == "id,label" and len(r.stdout.splitlines()) == 13


def test_int8_store_override_uses_documented_holdout(run):
    root, run_dir, store, fp32 = run
    other = root / "other.h5"
    other.write_bytes(store.read_bytes())
    res = export_onnx(run_dir, root / "int8-other.onnx", int8=True, store_path=other, calibration_images=64)
    assert res.int8 is not None and "stratified 20% hold-out" in res.int8.split
    assert res.int8.calibration_images == 64 and res.int8.rows == math.ceil(0.2 * len(open_store(other)))


def test_int8_refused_leaves_no_file(run, monkeypatch, tmp_path):
    root, run_dir, store, fp32 = run
    monkeypatch.setattr(quantize, "PROB_TOLERANCE", 0.0)   # an int8 graph always differs a little
    out = tmp_path / "refused.onnx"
    with pytest.raises(ModelError, match="int8 graph fails its check.*export refused"):
        export_onnx(run_dir, out, int8=True)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PcamError, match="--int8 and --fp16"):
        export_onnx(run_dir, out, int8=True, fp16=True)
    with pytest.raises(PcamError, match="calibrates on the training store"):
        export_onnx(run_dir, out, int8=True, store_path=tmp_path / "none.h5")
    assert not out.exists()
