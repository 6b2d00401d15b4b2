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
from pcamtool.checkpoint import save_checkpoint
from pcamtool.export import ProbabilityModel, export_onnx
from pcamtool.infer import open_session, predict
from pcamtool.models import create_model
from pcamtool.preprocess import PcamNet

N = 1024
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    torch.manual_seed(0)
    mean, std = [0.70, 0.55, 0.70], [0.24, 0.28, 0.22]
    net = PcamNet(create_model("pcamnet"), mean, std).eval()
    ckpt = root / "m.pt"
    save_checkpoint(ckpt, {"model": {"name": "pcamnet", "kwargs": {}}, "weights": net.state_dict(),
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
    benchmark.pedantic(lambda: predict(src, [model], tta=tta, provider="cpu", progress=False),
                       rounds=1 if tta == 8 else 2, warmup_rounds=0)
    key = f"{source}_tta{tta}"
    RESULTS[key] = N / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = RESULTS[key]
    # what a 57,458-image Kaggle test set would take at this rate
    benchmark.extra_info["kaggle_test_minutes"] = 57458 / RESULTS[key] / 60
