"""Training-side throughput: augmentation and one optimizer step per architecture.

Run: ``.venv/bin/pytest benchmarks/bench_train.py -q``. Reports images/s in
``extra_info``; CUDA variants run only where a GPU is present. Batch reading
from the store is in ``bench_store.py``.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from pcamtool.augment import augment_batch
from pcamtool.config import AugmentConfig
from pcamtool.device import Precision, autocast_context, cpu_has_native_bf16, use_channels_last
from pcamtool.models import DEFAULT_MODEL, create_model
from pcamtool.contract import Classifier, to_float01

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BATCH = {"cpu": 128, "cuda": 512}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
def test_augment_throughput(benchmark, device):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (BATCH[device], 96, 96, 3), dtype=torch.uint8, device=device)
    cfg = AugmentConfig()

    def run():
        out = augment_batch(to_float01(x), cfg, gen)
        _sync(device)
        return out

    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    benchmark.extra_info["img_per_s"] = BATCH[device] / benchmark.stats.stats.median


def _step(dev: torch.device, arch: str, autocast: Callable[[], AbstractContextManager]) -> Callable[[], None]:
    """One augmented optimizer step of ``arch`` on a fixed batch, under ``autocast()``."""
    net = Classifier(create_model(arch), [0.7, 0.55, 0.7], [0.24, 0.28, 0.22]).to(dev)
    if use_channels_last(dev):
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    gen = torch.Generator(device=dev.type).manual_seed(0)
    x = torch.randint(0, 256, (BATCH[dev.type], 96, 96, 3), dtype=torch.uint8, device=dev)
    y = (torch.arange(BATCH[dev.type], device=dev) % 2).float()

    def step() -> None:
        x01 = augment_batch(to_float01(x), AugmentConfig(), gen)
        with autocast():
            logits = net.forward01(x01)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(dev.type)

    return step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["pcamnet", "plain4", "simple"])
def test_train_step(benchmark, device, arch):
    """The step as training runs it: the device's own precision (see pcamtool.device)."""
    dev = torch.device(device)
    benchmark.pedantic(_step(dev, arch, lambda: autocast_context(dev)),
                       rounds=5 if device == "cpu" else 30, warmup_rounds=2)
    benchmark.extra_info["img_per_s"] = BATCH[device] / benchmark.stats.stats.median
    benchmark.extra_info["precision"] = Precision.for_device(dev).name


STEP: dict[str, float] = {}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_step_precision(benchmark, precision):
    """The default model's CPU step in fp32 and in bf16 autocast, in one run.

    bf16 is what training uses on a CPU with native bf16; elsewhere it would
    be emulated, and the CPU trains in fp32.
    """
    if precision == "bf16" and not cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX-512 BF16 or AMX): training runs in fp32")
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    benchmark.pedantic(_step(torch.device("cpu"), DEFAULT_MODEL, ctx), rounds=5, warmup_rounds=2)
    STEP[precision] = BATCH["cpu"] / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = STEP[precision]
    if len(STEP) == 2:
        print(f"\n{DEFAULT_MODEL} CPU step: bf16 / fp32 = {STEP['bf16'] / STEP['fp32']:.2f}x")
