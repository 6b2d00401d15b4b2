"""Inference throughput, in one run on the same images, per onnxruntime provider.

* onnxruntime vs PyTorch eager on the CPU (target: onnxruntime >= 3x);
* TTA x8 vs x1, tif folder vs packed store, end to end: ``predict``, the
  real loop, decoding included;
* each on the CPU always, and on CUDA and TensorRT where they load (else
  skipped, saying why); ``extra_info["ran_on"]`` records what ran.

Run: ``.venv/bin/pytest benchmarks/bench_infer.py -q``. The model is the
default architecture, untrained (speed does not depend on the weights).
"""
from __future__ import annotations


import numpy as np
import pytest
import tifffile
import torch

from pcamtool import pack
from pcamtool.contract import ProbabilityModel
from pcamtool.infer import predict
from pcamtool.onnx_io import open_session, provider_problems
from pcamtool.tta import tta_graph, tta_mean, tta_transforms


N = 1024
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, untrained_model):
    root = tmp_path_factory.mktemp("infer")
    net, model = untrained_model
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 96, 96, 3), dtype=np.uint8)
    (root / "test").mkdir()
    for i, img in enumerate(images):
        tifffile.imwrite(root / "test" / f"{i:040x}.tif", img, photometric="rgb")
    store = pack(root / "test", progress=False).path
    return root, net, model, images, store


def _ratio(a: str, b: str) -> None:
    if a in RESULTS and b in RESULTS:
        print(f"\n{a} / {b} = {RESULTS[a] / RESULTS[b]:.2f}x")


def test_torch_eager_cpu(benchmark, setup):
    root, net, model, images, store = setup
    prob = ProbabilityModel(net).eval()
    x = torch.from_numpy(images[:256])

    def run():
        with torch.no_grad():
            return prob(x)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    RESULTS["torch"] = 256 / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = RESULTS["torch"]


PROVIDERS = ["cpu", "cuda", "tensorrt"]


def _loads(provider: str) -> None:
    """Skip a GPU provider that does not load here (the reason onnx_io gives)."""
    why = provider_problems()[provider]
    if why is not None:
        pytest.skip(f"{provider} does not load here: {why}")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_onnxruntime(benchmark, setup, provider):
    """One run of 256 images through ``ModelSession.run`` (I/O binding on the provider's device)."""
    _loads(provider)
    root, net, model, images, store = setup
    sess = open_session(model, provider, batch_size=256, tta=1)
    x = images[:256]
    benchmark.pedantic(lambda: sess.run(x), rounds=5, warmup_rounds=1)
    key = f"onnxruntime_{provider}"
    RESULTS[key] = 256 / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = RESULTS[key]
    benchmark.extra_info["ran_on"] = sess.providers[0]
    _ratio("onnxruntime_cpu", "torch")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tta", [1, 8])
@pytest.mark.parametrize("source", ["folder", "store"])
def test_end_to_end(benchmark, setup, tta, source, provider):
    """The real loop: ``predict`` over the folder (decoding threads included) or the store."""
    _loads(provider)
    root, net, model, images, store = setup
    src = root / "test" if source == "folder" else store
    # One warm-up call: the first run of a process sizes onnxruntime's memory arena
    # (and on TensorRT builds the engine, cached beside the model).
    got = benchmark.pedantic(lambda: predict(src, [model], tta=tta, provider=provider, progress=False),
                             rounds=1 if tta == 8 else 2, warmup_rounds=1)
    key = f"{source}_tta{tta}_{provider}"
    RESULTS[key] = N / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = RESULTS[key]
    benchmark.extra_info["ran_on"] = got.providers[0]
    # what a 57,458-image Kaggle test set would take at this rate
    benchmark.extra_info["kaggle_test_minutes"] = 57458 / RESULTS[key] / 60


@pytest.fixture(scope="module")
def in_graph_tta(setup):
    """TTA x8 inside the graph (:func:`pcamtool.tta.tta_graph`, what GPU providers run), on the CPU."""
    import onnx
    import onnxruntime as ort

    root, net, model, images, store = setup
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    wrapped = tta_graph(onnx.load(str(model)), tta_transforms(8)).SerializeToString()
    return ort.InferenceSession(wrapped, opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("where", ["per_transform_runs", "in_graph"])
def test_tta8_where(benchmark, setup, in_graph_tta, where):
    """TTA x8 on 256 decoded images on the CPU: copies made by numpy, one run per transform
    (what ``predict`` does on the CPU), vs copies made inside the graph (one run of 8x the batch,
    what it does on a GPU)."""
    root, net, model, images, store = setup
    x = images[:256]
    if where == "in_graph":
        run = lambda: in_graph_tta.run(None, {"images": x})[0]  # noqa: E731
    else:
        sess = open_session(model, "cpu", tta=1)
        run = lambda: tta_mean(sess.run, x, tta_transforms(8))  # noqa: E731
    got = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    RESULTS[f"tta8_{where}"] = 256 / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = RESULTS[f"tta8_{where}"]
    RESULTS.setdefault("tta8_probs", got)
    # both ways compute the same average
    assert np.abs(np.asarray(RESULTS["tta8_probs"]) - got).max() < 1e-4
    _ratio("tta8_in_graph", "tta8_per_transform_runs")


# ---------------------------------------------------------------- int8 vs fp32

@pytest.fixture(scope="module")
def int8_model(setup):
    """The same model quantized as ``export --int8`` does (calibrated on 512 of the images; speed only)."""
    from pcamtool.io.store import open_store
    from pcamtool.quantize import quantize_graph

    root, net, model, images, store = setup
    out = root / "m-int8.onnx"
    quantize_graph(model, out, open_store(store), np.arange(512))
    return out


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_int8_vs_fp32_cpu(benchmark, setup, int8_model, precision):
    """256 images through onnxruntime on the CPU, fp32 graph vs its int8 QDQ version (target: >= 2x)."""
    root, net, model, images, store = setup
    sess = open_session(int8_model if precision == "int8" else model, "cpu", batch_size=256, tta=1)
    x = images[:256]
    benchmark.pedantic(lambda: sess.run(x), rounds=5, warmup_rounds=1)
    RESULTS[f"ort_cpu_{precision}"] = 256 / benchmark.stats.stats.min
    benchmark.extra_info["img_per_s_best"] = RESULTS[f"ort_cpu_{precision}"]
    _ratio("ort_cpu_int8", "ort_cpu_fp32")


def test_int8_tta8_end_to_end(benchmark, setup, int8_model):
    """TTA x8 from the packed store with the int8 graph, the real ``predict`` loop, on the CPU."""
    root, net, model, images, store = setup
    benchmark.pedantic(lambda: predict(store, [int8_model], tta=8, provider="cpu", progress=False),
                       rounds=1, warmup_rounds=1)
    RESULTS["store_tta8_int8"] = N / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = RESULTS["store_tta8_int8"]
    benchmark.extra_info["kaggle_test_minutes"] = 57458 / RESULTS["store_tta8_int8"] / 60
    print(f"\nint8 TTA x8 end to end: {RESULTS['store_tta8_int8']:.0f} img/s; 57,458 images: "
          f"{benchmark.extra_info['kaggle_test_minutes']:.1f} min")
    _ratio("store_tta8_int8", "store_tta8_cpu")


def _profile_by_op(path, images: np.ndarray, tmp) -> dict[str, float]:
    """Milliseconds per operator type for one run of ``images`` (onnxruntime's profiler, CPU)."""
    import json

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / path.stem)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, {"images": images})
    events = json.loads(open(sess.end_profiling()).read())
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1000 / 3
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


def test_int8_profile_by_op(setup, int8_model, tmp_path):
    """Where the time goes, per operator type, fp32 vs int8 (batch 256): which layers int8 speeds up."""
    root, net, model, images, store = setup
    x = images[:256]
    for name, path in (("fp32", model), ("int8", int8_model)):
        ops = _profile_by_op(path, x, tmp_path)
        total = sum(ops.values())
        print(f"\n{name}: {total:.0f} ms per 256 images; " +
              ", ".join(f"{op} {ms:.0f} ms ({100 * ms / total:.0f}%)" for op, ms in list(ops.items())[:6]))
        assert total > 0
