"""Training-side throughput: augmentation and one optimizer step per architecture.

Run: ``.venv/bin/pytest benchmarks/bench_train.py -q``. Reports images/s in
``extra_info``; CUDA variants run only where a GPU is present. Batch reading
from the store is in ``bench_store.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pcamtool.augment import AugmentConfig, augment_batch
from pcamtool.device import autocast_context, use_channels_last
from pcamtool.models import create_model
from pcamtool.preprocess import PcamNet, to_float01

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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["pcamnet", "plain4", "simple"])
def test_train_step(benchmark, device, arch):
    dev = torch.device(device)
    net = PcamNet(create_model(arch), [0.7, 0.55, 0.7], [0.24, 0.28, 0.22]).to(dev)
    if use_channels_last(dev):
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (BATCH[device], 96, 96, 3), dtype=torch.uint8, device=dev)
    y = (torch.arange(BATCH[device], device=dev) % 2).float()

    def step():
        x01 = augment_batch(to_float01(x), AugmentConfig(), gen)
        with autocast_context(dev):
            logits = net.forward01(x01)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)

    benchmark.pedantic(step, rounds=5 if device == "cpu" else 30, warmup_rounds=2)
    benchmark.extra_info["img_per_s"] = BATCH[device] / benchmark.stats.stats.median
