"""The parts a training loop is assembled from: optimizer, schedule, EMA, loss scaler, DDP.

Each is built once by ``fit`` from the config and the device's
:class:`~pcamtool.device.Precision`; the parts that a device does not need
are stand-ins that do nothing (EMA with decay 0, a disabled GradScaler, a
single-process ``Dist``), so the loop has no branches for them.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Iterable

import torch

from ..config import TrainConfig
from ..device import Precision


def create_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig,
                     device: torch.device) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD as ``cfg`` says.

    On CUDA the fused kernels: one launch for all parameters, and with an
    fp16 GradScaler they skip inf steps on the device instead of asking the
    host (the unfused path reads ``found_inf`` with ``.item()`` every step).
    The CPU keeps the default implementation (same results as before).
    """
    fused = True if device.type == "cuda" else None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay,
                               fused=fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def create_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate multiplier over ``total`` steps: linear warm-up, then cosine decay.

    ``onecycle`` warms up from lr/25 and anneals to lr/25,000 (the shape of
    torch's OneCycleLR, which fails on runs shorter than its phases);
    ``cosine`` warms up from 0 and anneals to 0. The curve is a function of
    the step and ``total`` only (a closure, so the scheduler's state holds
    just the step): a run resumed with a new ``--epochs`` follows the curve
    laid out for the new length from the step it resumes at.
    """
    warm = max(1, int(cfg.warmup_frac * total))
    lo, end = (1 / 25, 1 / 25_000) if cfg.schedule == "onecycle" else (0.0, 0.0)

    def multiplier(step: int) -> float:
        if step < warm:
            return lo + (1 - lo) * (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, multiplier)


class EMA:
    """Exponential moving average of the weights (buffers copied as they are).

    ``decay == 0`` is the stand-in for no EMA: :attr:`model` is the trained
    network itself and :meth:`update` does nothing.
    """

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = net
        if decay > 0:
            self.model = copy.deepcopy(net).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
            self._params = ([p for p in self.model.parameters()], [p.detach() for p in net.parameters()])
            self._buffers = ([b for b in self.model.buffers()], [b for b in net.buffers()])
            self.update = self._update  # type: ignore[method-assign]

    def update(self) -> None:
        """Move the average one step towards the trained weights."""

    @torch.no_grad()
    def _update(self) -> None:
        # one multi-tensor kernel per list rather than a launch per parameter (timm does the same)
        torch._foreach_lerp_(self._params[0], self._params[1], 1 - self.decay)
        if self._buffers[0]:
            torch._foreach_copy_(self._buffers[0], self._buffers[1])


class LossScaler:
    """``torch.amp.GradScaler`` for fp16, a pass-through otherwise; counts skipped steps on the device.

    A step whose gradients overflowed is skipped and the scale halved; the
    scale only ever drops on such a step, so comparing it before and after
    ``update()`` counts them without reading anything back to the host.
    """

    def __init__(self, precision: Precision, device: torch.device) -> None:
        self.scaler = precision.grad_scaler()
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._update = self._update_counting if self.scaler.is_enabled() else self.scaler.update

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass of the (scaled) loss; gradients add up until :meth:`step`."""
        self.scaler.scale(loss).backward()

    def step(self, opt: torch.optim.Optimizer) -> None:
        """Optimizer step (unless the gradients overflowed) and scale update."""
        self.scaler.step(opt)
        self._update()

    def _update_counting(self) -> None:
        before = self.scaler._scale.clone()  # private, but the only sync-free view of the scale
        self.scaler.update()
        self.skipped += self.scaler._scale < before   # a bool added in place to the int64 count stays int64

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict(), "skipped": int(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped.fill_(int(state.get("skipped", 0)))


class Dist:
    """Rank and world size under torchrun; a single process (every call a no-op) otherwise."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def local_device(self, device: torch.device) -> torch.device:
        """This rank's GPU under torchrun (``LOCAL_RANK``); ``device`` itself otherwise."""
        if device.type != "cuda" or not self.enabled:
            return device
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``module`` under DistributedDataParallel when there are several ranks."""
        if not self.enabled:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return t
        out = [torch.empty_like(t) for _ in range(self.world)]
        torch.distributed.all_gather(out, t)
        return torch.cat(out)

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
