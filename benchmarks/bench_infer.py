"""Inference throughput, in one run on the same images.

* onnxruntime vs PyTorch eager on the CPU (target: onnxruntime >= 3x);
* TTA x8 vs x1, tif folder vs packed store, end to end (decoding included).

Run: ``.venv/bin/pytest benchmarks/bench_infer.py -q``. The model is the
default architecture, untrained (speed does not depend on the weights).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from pcamtool import pack
from pcamtool.tta import _FH, _FW, _T, dihedral_np, tta_transforms
from pcamtool.train.checkpoint import save_checkpoint
from pcamtool.contract import ProbabilityModel
from pcamtool.export import export_onnx
from pcamtool.infer import predict
from pcamtool.onnx_io import open_session
from pcamtool.models import DEFAULT_MODEL, create_model
from pcamtool.contract import Classifier

N = 1024
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    torch.manual_seed(0)
    mean, std = [0.70, 0.55, 0.70], [0.24, 0.28, 0.22]
    net = Classifier(create_model(DEFAULT_MODEL), mean, std).eval()
    ckpt = root / "m.pt"
    save_checkpoint(ckpt, {"model": {"name": DEFAULT_MODEL, "kwargs": {}}, "weights": net.state_dict(),
                           "mean": mean, "std": std, "stain": {"method": "none"}, "store": {}, "val_auc": 0.5})
    model = export_onnx(ckpt, root / "m.onnx").path
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


def test_onnxruntime_cpu(benchmark, setup):
    root, net, model, images, store = setup
    sess = open_session(model, "cpu")
    x = images[:256]
    benchmark.pedantic(lambda: sess.run(None, {"images": x}), rounds=5, warmup_rounds=1)
    RESULTS["onnxruntime"] = 256 / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = RESULTS["onnxruntime"]
    benchmark.extra_info["vs_torch"] = RESULTS["onnxruntime"] / RESULTS.get("torch", float("nan"))
    _ratio("onnxruntime", "torch")


@pytest.mark.parametrize("tta", [1, 8])
@pytest.mark.parametrize("source", ["folder", "store"])
def test_end_to_end(benchmark, setup, tta, source):
    root, net, model, images, store = setup
    src = root / "test" if source == "folder" else store
    # One warm-up call: the first run of a process sizes onnxruntime's memory arena.
    benchmark.pedantic(lambda: predict(src, [model], tta=tta, provider="cpu", progress=False),
                       rounds=1 if tta == 8 else 2, warmup_rounds=1)
    key = f"{source}_tta{tta}"
    RESULTS[key] = N / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = RESULTS[key]
    # what a 57,458-image Kaggle test set would take at this rate
    benchmark.extra_info["kaggle_test_minutes"] = 57458 / RESULTS[key] / 60


class _InGraphTTA(torch.nn.Module):
    """TTA x8 inside the graph: the 8 dihedral copies are made by ONNX ops, averaged in the graph."""

    def __init__(self, prob: torch.nn.Module, n: int) -> None:
        super().__init__()
        self.prob, self.n = prob, n

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # torch.rot90 has no ONNX export: each k as transpose, then flips (augment's _T/_FH/_FW form)
        copies = []
        for k in tta_transforms(self.n):
            x = images.transpose(1, 2) if _T[k] else images
            dims = [d for d, on in ((1, _FH[k]), (2, _FW[k])) if on]
            copies.append(torch.flip(x, dims) if dims else x)
        return self.prob(torch.cat(copies)).reshape(self.n, images.shape[0]).mean(0)


@pytest.fixture(scope="module")
def in_graph_tta(setup):
    import onnxruntime as ort

    root, net, model, images, store = setup
    path = root / "tta8.onnx"
    with torch.no_grad():
        torch.onnx.export(_InGraphTTA(ProbabilityModel(net).eval(), 8), (torch.from_numpy(images[:2]),),
                          str(path), input_names=["images"], output_names=["probability"], opset_version=17,
                          dynamo=False, dynamic_axes={"images": {0: "batch"}, "probability": {0: "batch"}})
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("where", ["per_transform_runs", "in_graph"])
def test_tta8_where(benchmark, setup, in_graph_tta, where):
    """TTA x8 on 256 decoded images: copies made by numpy, one run per transform
    (what ``predict`` does), vs copies made inside the graph (one run of 8x the batch)."""
    root, net, model, images, store = setup
    x = images[:256]
    if where == "in_graph":
        run = lambda: in_graph_tta.run(None, {"images": x})[0]  # noqa: E731
    else:
        sess = open_session(model, "cpu")

        def run() -> np.ndarray:
            return sum(sess.run(None, {"images": np.ascontiguousarray(dihedral_np(x, k, axes=(1, 2)))})[0]
                       for k in tta_transforms(8)) / 8
    got = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    RESULTS[f"tta8_{where}"] = 256 / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = RESULTS[f"tta8_{where}"]
    RESULTS.setdefault("tta8_probs", got)
    # both ways compute the same average
    assert np.abs(np.asarray(RESULTS["tta8_probs"]) - got).max() < 1e-4
    _ratio("tta8_in_graph", "tta8_per_transform_runs")
