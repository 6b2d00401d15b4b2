"""The fp32 CPU training step, side by side: memory format, torch.compile, threads, batch size.

What the CPU ``auto`` choice in :mod:`pcamtool.device` should be, measured
on this machine in one run. For each model, every variant is built first and
then timed in turns (A B C A B C ...), so that load from other processes on
a shared machine falls on all of them alike; the best round of each is the
figure, and ratios are against ``eager`` (contiguous NCHW, all threads,
batch 128: what fp32 training on a CPU does today).

A step is the model's own work as ``fit`` runs it, in fp32 (autocast off,
as with ``PCAMTOOL_AMP=0``): uint8 batch -> float -> normalization ->
forward -> BCE loss -> backward -> AdamW step. Augmentation and loading are
timed in ``bench_train.py``.

* ``channels_last``: weights and the float batch in NHWC (oneDNN's blocked
  convolutions without reorders);
* ``compile``: ``torch.compile`` (inductor, C++ code generation for the
  CPU), compiled once before timing; skipped, with the reason, if inductor
  cannot build here (it needs a C++ compiler);
* ``batch 64``: images per step (rates are per image; on plain4 batch 256
  measured 0.90x and one thread 0.60x with torch 2.13, now untimed);
* ``micro N``: the 128-image step in slices of N whose gradients add up
  before the one optimizer step (``PCAMTOOL_MICRO_BATCH=N``; opt-in, as
  batch norm then sees N-image statistics, which cost AUC on real tissue).

``channels_last`` is the CPU's ``auto`` choice (:mod:`pcamtool.device`).

oneDNN's post-op fusions (conv + bias + ReLU) apply to frozen inference
graphs, not to training; for training they come only through inductor.

Run: ``PCAMTOOL_AMP=0 .venv/bin/pytest benchmarks/bench_cpu_step.py -q -s``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

from pcamtool.contract import Classifier, to_float01
from pcamtool.models import create_model

MEAN, STD = [0.70, 0.55, 0.70], [0.24, 0.28, 0.22]
ROUNDS = 5          # timed turns per variant (best taken); one warm-up turn before
STEPS = 2           # optimizer steps per timed turn


@dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool = False
    compile: bool = False
    threads: Optional[int] = None   # None: all cores
    batch: int = 128
    micro: int = 0                  # images per forward/backward; 0: the whole batch


VARIANTS = {
    "plain4": [Variant("eager"), Variant("channels_last", channels_last=True),
               Variant("compile + channels_last", channels_last=True, compile=True),
               Variant("batch 64", batch=64), Variant("channels_last + micro 64", channels_last=True, micro=64)],
    "pcamnet": [Variant("eager"), Variant("channels_last", channels_last=True), Variant("compile", compile=True)],
    "simple": [Variant("eager"), Variant("channels_last", channels_last=True), Variant("compile", compile=True)],
}
for _variants in VARIANTS.values():   # the opt-in PCAMTOOL_MICRO_BATCH=32 step
    _variants.append(Variant("channels_last + micro 32", channels_last=True, micro=32))


def make_step(arch: str, v: Variant) -> Callable[[], None]:
    """``STEPS`` fp32 optimizer steps of ``arch`` as ``v`` says, on a fixed random batch."""
    torch.manual_seed(0)
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    net = Classifier(create_model(arch), MEAN, STD).to(memory_format=fmt)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    forward = torch.compile(net.forward01) if v.compile else net.forward01
    x = torch.randint(0, 256, (v.batch, 96, 96, 3), dtype=torch.uint8)
    y = (torch.arange(v.batch) % 2).float()
    net.train()

    micro = v.micro or v.batch

    def steps() -> None:
        for _ in range(STEPS):
            x01 = to_float01(x, fmt)
            opt.zero_grad(set_to_none=True)
            for s in range(0, v.batch, micro):   # as pcamtool.train.loop.train_step slices a batch
                loss = F.binary_cross_entropy_with_logits(forward(x01[s:s + micro]), y[s:s + micro],
                                                          reduction="sum") / v.batch
                loss.backward()
            opt.step()

    return steps


def _timed(fn: Callable[[], None], threads: int) -> float:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@pytest.mark.parametrize("arch", list(VARIANTS))
def test_cpu_train_step(arch, record_rate):
    all_threads = torch.get_num_threads()
    steps: dict[str, tuple[Variant, Callable[[], None]]] = {}
    skipped: dict[str, str] = {}
    for v in VARIANTS[arch]:
        fn = make_step(arch, v)
        try:
            compile_s = _timed(fn, v.threads or all_threads)   # the warm-up turn; compiles when v.compile
        except Exception as exc:  # inductor without a working C++ toolchain, or an op it cannot lower
            skipped[v.name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
            continue
        if v.compile:
            print(f"\n{arch} {v.name}: first call (compiles) {compile_s:.1f} s")
        steps[v.name] = (v, fn)
    best = {name: float("inf") for name in steps}
    try:
        for _ in range(ROUNDS):
            for name, (v, fn) in steps.items():
                best[name] = min(best[name], _timed(fn, v.threads or all_threads))
    finally:
        torch.set_num_threads(all_threads)
    base = STEPS * 128 / best["eager"]
    for name, (v, _) in steps.items():
        rate = STEPS * v.batch / best[name]
        record_rate("cpu step fp32", arch, f"{name} ({rate / base:.2f}x)", rate, rate, "images/s")
    for name, why in skipped.items():
        print(f"\n{arch} {name}: skipped ({why})")
    assert "eager" in steps and all(r > 0 for r in best.values())
