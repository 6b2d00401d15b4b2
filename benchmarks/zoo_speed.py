"""Training and onnxruntime inference speed of the model zoo on this CPU (built-ins beside timm networks).

Random init, 96x96, batch 64, the memory format ``pcamtool train`` uses here;
prints a Markdown table (benchmarks/RESULTS.md). A script, not a
pytest-benchmark: each model is compiled and timed once, in a few minutes.

    .venv/bin/python benchmarks/zoo_speed.py [MODEL ...]
"""
from __future__ import annotations

import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from pcamtool.contract import Classifier, ProbabilityModel
from pcamtool.device import Precision
from pcamtool.models import create_model

MODELS = ["plain4", "pcamnet", "simple", "timm:resnet18", "timm:resnet34", "timm:efficientnet_b0",
          "timm:densenet121"]
BATCH, WARM, STEPS = 64, 1, 3


def train_ips(name: str, bf16: bool) -> float:
    torch.manual_seed(0)
    mf = Precision.for_device("cpu").memory_format  # as `pcamtool train` runs on this CPU
    net = Classifier(create_model(name), [0.5] * 3, [0.25] * 3).train().to(memory_format=mf)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.rand(BATCH, 3, 96, 96).contiguous(memory_format=mf)
    y = (torch.rand(BATCH) > 0.5).float()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    for i in range(WARM + STEPS):
        if i == WARM:
            t = time.perf_counter()
        with ctx():
            loss = F.binary_cross_entropy_with_logits(net.forward01(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return STEPS * BATCH / (time.perf_counter() - t)


def infer_ips(name: str, tmp: Path) -> float:
    model = ProbabilityModel(Classifier(create_model(name), [0.5] * 3, [0.25] * 3)).eval()
    x = torch.randint(0, 256, (BATCH, 96, 96, 3), dtype=torch.uint8)
    path = tmp / (name.replace(":", "_") + ".onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:2],), str(path), input_names=["images"], output_names=["prob"],
                          opset_version=17, dynamo=False, dynamic_axes={"images": {0: "b"}, "prob": {0: "b"}})
        want = model(x).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x.numpy()})[0]
    assert np.abs(got - want).max() < 1e-4, (name, np.abs(got - want).max())
    t = time.perf_counter()
    for _ in range(STEPS):
        sess.run(None, {"images": x.numpy()})
    return STEPS * BATCH / (time.perf_counter() - t)


def main() -> None:
    torch.set_num_threads(2)
    names = sys.argv[1:] or MODELS
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {torch.get_num_threads()} threads, "
          f"batch {BATCH}, {STEPS} timed steps after {WARM} warm-up, {Precision.for_device('cpu').reason}")
    print("| model | params (M) | train fp32 img/s | train bf16 img/s | ORT infer img/s |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            params = sum(p.numel() for p in create_model(name).parameters()) / 1e6
            print(f"| {name} | {params:.2f} | {train_ips(name, False):.0f} | {train_ips(name, True):.0f} | "
                  f"{infer_ips(name, Path(d)):.0f} |", flush=True)


if __name__ == "__main__":
    main()
