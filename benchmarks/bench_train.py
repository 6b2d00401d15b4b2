"""Training throughput: the real epoch loop per device and cache, augmentation, and CPU fp32 vs bf16.

``test_train_epoch`` times :func:`pcamtool.train.loop.train_one_epoch` as
``fit`` runs it: batches gathered by the loader thread from a packed store
(GPU, RAM or memory-map cache), copied, augmented and trained in the
device's own precision (:mod:`pcamtool.device`). CUDA cases run only where a
GPU is present. Batch reading alone is in ``bench_store.py``.

Run: ``.venv/bin/pytest benchmarks/bench_train.py -q``.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pcamtool.augment import augment_batch
from pcamtool.config import AugmentConfig, TrainConfig
from pcamtool.contract import Classifier, to_float01
from pcamtool.device import Precision, cpu_bf16_feature
from pcamtool.io.store import open_store
from pcamtool.models import DEFAULT_MODEL, create_model
from pcamtool.train.data import BatchLoader, RowSource
from pcamtool.train.loop import create_trainer, train_one_epoch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
BATCH = {"cpu": 128, "cuda": 512}
EPOCH_ROWS = {"cpu": 384, "cuda": 6000}   # the CPU trains ~100-300 images/s: keep its epoch to seconds


def _record(record, benchmark, *args) -> float:
    """``record(...)`` when timings were taken (``--benchmark-disable`` runs each case once, untimed)."""
    return record(benchmark, *args) if benchmark.stats is not None else float("nan")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
def test_augment_throughput(benchmark, record, device):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (BATCH[device], 96, 96, 3), dtype=torch.uint8, device=device)
    cfg = AugmentConfig()

    def run():
        out = augment_batch(to_float01(x), cfg, gen)
        _sync(device)
        return out

    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    _record(record, benchmark, "train", f"augment {device}", "augment_batch", BATCH[device])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache", ["gpu", "ram", "mmap"])
def test_train_epoch(benchmark, record, packed_store: Path, device, cache):
    """One epoch of the default model through the real loop, loader thread included."""
    if cache == "gpu" and device != "cuda":
        pytest.skip("the GPU cache needs CUDA")
    dev = torch.device(device)
    store = open_store(packed_store)
    rows = np.arange(min(EPOCH_ROWS[device], len(store)))
    loader = BatchLoader(RowSource(store, cache, dev), rows, BATCH[device], shuffle=True, drop_last=True)
    precision = Precision.for_device(dev)
    cfg = TrainConfig(store=str(packed_store), batch_size=BATCH[device], epochs=1000)
    net = Classifier(create_model(DEFAULT_MODEL), store.mean, store.std)
    trainer = create_trainer(cfg, net, dev, precision, total_steps=1000 * len(loader))
    images = len(loader) * BATCH[device]
    benchmark.pedantic(lambda: train_one_epoch(trainer, loader), rounds=2, warmup_rounds=1)
    _record(record, benchmark, "train", f"epoch {DEFAULT_MODEL} {device}", f"{cache} cache, {precision.name}", images)
    benchmark.extra_info["precision"] = precision.reason


def _step(dev: torch.device, arch: str, autocast: Callable[[], object]) -> Callable[[], None]:
    """One augmented optimizer step of ``arch`` on a fixed batch, under ``autocast()``, in the device's layout."""
    fmt = Precision.for_device(dev).memory_format    # channels-last on CPUs and GPUs, as fit() trains
    net = Classifier(create_model(arch), [0.7, 0.55, 0.7], [0.24, 0.28, 0.22]).to(dev, memory_format=fmt)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    gen = torch.Generator(device=dev.type).manual_seed(0)
    x = torch.randint(0, 256, (BATCH[dev.type], 96, 96, 3), dtype=torch.uint8, device=dev)
    y = (torch.arange(BATCH[dev.type], device=dev) % 2).float()

    def step() -> None:
        x01 = augment_batch(to_float01(x), AugmentConfig(), gen).contiguous(memory_format=fmt)
        with autocast():
            logits = net.forward01(x01)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


STEP: dict[str, float] = {}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cpu_step_precision(benchmark, record, precision):
    """The default model's CPU step in fp32 and in bf16 autocast, in one run (a paired ratio).

    bf16 is what training uses on a CPU with native bf16; elsewhere it would
    be emulated, and the CPU trains in fp32.
    """
    if precision == "bf16" and cpu_bf16_feature() is None:
        pytest.skip("this CPU has no native bf16 (AVX-512 BF16 or AMX): training runs in fp32")
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    benchmark.pedantic(_step(torch.device("cpu"), DEFAULT_MODEL, ctx), rounds=5, warmup_rounds=2)
    STEP[precision] = _record(record, benchmark, "train", f"step {DEFAULT_MODEL} cpu", precision, BATCH["cpu"])
    if len(STEP) == 2:
        print(f"\n{DEFAULT_MODEL} CPU step: bf16 / fp32 = {STEP['bf16'] / STEP['fp32']:.2f}x")
