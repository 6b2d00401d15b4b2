"""Train a CNN from a store: ``pcamtool train`` (or ``torchrun ... -m pcamtool train``).

The device and precision are decided once (:mod:`pcamtool.device`); the loop
itself has no CUDA branches. Batches arrive as uint8 from the store
(:mod:`pcamtool.data`), are converted, augmented and normalized on the
device, and the run folder records config, metrics, curves and checkpoints.

Example::

    pcamtool train data/train.h5 --epochs 12 -o runs/baseline
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..augment import augment_batch
from .checkpoint import load_checkpoint, save_checkpoint
from ..config import TrainConfig, auto_epochs
from .data import BatchLoader, RowSource, resolve_cache
from ..device import Precision, autocast_context, resolve_device, use_channels_last
from ..errors import PcamError, TrainingError
from ..models import create_model
from ..contract import Classifier, to_float01
from ..progress import progress_bar
from ..system import cpu_threads
from .runs import new_run_dir, plot_curves, write_metrics
from .split import make_split, read_groups
from ..io.store import Store, open_store

log = logging.getLogger("pcamtool")


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_auc: float
    best_epoch: int
    epochs_run: int
    seconds: float


class _Forward01(torch.nn.Module):
    """Training forward on augmented floats, as a module so DDP can wrap it."""

    def __init__(self, net: Classifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.net.forward01(x01)


class _Dist:
    """Rank and world size under torchrun; a single process otherwise."""

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


def _schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate multiplier: linear warm-up, then cosine decay.

    ``onecycle`` warms up from lr/25 and anneals to lr/25,000 (the shape of
    torch's OneCycleLR, which fails on runs shorter than its phases);
    ``cosine`` warms up from 0 and anneals to 0.
    """
    warm = max(1, int(cfg.warmup_frac * total))
    lo, end = (1 / 25, 1 / 25_000) if cfg.schedule == "onecycle" else (0.0, 0.0)

    def lam(step: int) -> float:
        if step < warm:
            return lo + (1 - lo) * (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, lam)


def _optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class _EMA:
    """Exponential moving average of the weights (buffers copied as they are)."""

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(net).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        for e, p in zip(self.shadow.parameters(), net.parameters()):
            e.lerp_(p.detach(), 1 - self.decay)
        for e, b in zip(self.shadow.buffers(), net.buffers()):
            e.copy_(b)


@torch.no_grad()
def predict_loader(net: torch.nn.Module, loader: BatchLoader, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities, labels and store rows over a loader (no augmentation), on the device."""
    net.eval()
    probs, ys, rows = [], [], []
    with autocast_context(device):
        for b in loader:
            probs.append(torch.sigmoid(net(b.x).float()))
            ys.append(b.y)
            rows.append(torch.from_numpy(b.index).to(device))
    return torch.cat(probs), torch.cat(ys), torch.cat(rows)


def evaluate_probs(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Loss, ROC AUC and accuracy at 0.5 of probabilities ``p`` against labels ``y``."""
    from sklearn.metrics import roc_auc_score

    pt = torch.from_numpy(p.astype(np.float64)).clamp(1e-7, 1 - 1e-7)
    loss = float(F.binary_cross_entropy(pt, torch.from_numpy(y.astype(np.float64))))
    auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")
    return {"val_loss": loss, "val_auc": auc, "val_acc": float(((p >= 0.5) == (y >= 0.5)).mean())}


def _open_data(cfg: TrainConfig) -> tuple[Store, Store, np.ndarray, np.ndarray]:
    store = open_store(cfg.store, need_labels=True)
    if cfg.val_store:
        val_store = open_store(cfg.val_store, need_labels=True)
        tr, va = np.arange(len(store)), np.arange(len(val_store))
    else:
        val_store = store
        groups = read_groups(cfg.groups, store.ids) if cfg.groups else None
        tr, va = make_split(store.labels, cfg.val_frac, cfg.seed, cfg.folds, cfg.fold, groups)
    if cfg.max_train is not None and cfg.max_train < len(tr):
        tr = np.sort(np.random.default_rng(cfg.seed).choice(tr, cfg.max_train, replace=False))
    return store, val_store, tr, va


def fit(cfg: TrainConfig, resume: Optional[str | os.PathLike] = None, progress: bool = True) -> TrainResult:
    """Train a model as ``cfg`` says; returns where the run went and its best AUC.

    Parameters
    ----------
    resume
        A run folder whose ``last.pt`` to continue from (its config is used;
        ``cfg`` only supplies what the run did not record).

    Raises
    ------
    PcamError
        Bad store or options, a mismatched resume, NaN loss or out of memory.
    """
    t_start = time.perf_counter()
    state: Optional[dict[str, Any]] = None
    if resume is not None:
        run_dir = Path(resume)
        cfg, state = _load_resume(run_dir, cfg)
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads or cpu_threads())
    dist = _Dist(device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)

    store, val_store, tr_idx, va_idx = _open_data(cfg)
    if cfg.epochs is None:  # resolved once; config.json records the number, so --resume keeps it
        cfg = replace(cfg, epochs=auto_epochs(len(tr_idx)))
    if resume is None:
        run_dir = Path(cfg.out) if cfg.out else new_run_dir(cfg.arch)
        if dist.main:
            if run_dir.exists() and any(run_dir.iterdir()):
                raise PcamError(f"{run_dir}: run folder exists and is not empty (choose another -o)")
            run_dir.mkdir(parents=True, exist_ok=True)
    cache = resolve_cache(cfg.cache, store, device)
    source = RowSource(store, cache, device)
    val_source = source if val_store is store else RowSource(val_store, resolve_cache(cfg.cache, val_store, device), device)
    train_loader = BatchLoader(source, tr_idx, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=len(tr_idx) > cfg.batch_size,
                               rank=dist.rank, world=dist.world)
    val_loader = BatchLoader(val_source, va_idx, max(256, cfg.batch_size), rank=dist.rank, world=dist.world)

    net = Classifier(create_model(cfg.arch, **cfg.model_kwargs),
                  torch.tensor(store.mean, dtype=torch.float32), torch.tensor(store.std, dtype=torch.float32))
    if cfg.init_weights and state is None:
        _init_weights(net, cfg.init_weights)
    net.to(device)
    if use_channels_last(device):
        net = net.to(memory_format=torch.channels_last)
    opt = _optimizer(net.parameters(), cfg)
    steps_per_epoch = len(train_loader)
    sched = _schedule(opt, cfg, cfg.epochs * steps_per_epoch)
    ema = _EMA(net, cfg.ema) if cfg.ema > 0 else None
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * dist.rank)

    rows: list[dict[str, Any]] = []
    best_auc, best_epoch, start_epoch = -1.0, 0, 1
    if state is not None:
        net.load_state_dict(state["train_weights"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None and "weights" in state:
            ema.shadow.load_state_dict(state["weights"])
        gen.set_state(state["generator"])  # a CPU ByteTensor for CPU and CUDA generators alike
        torch.set_rng_state(state["torch_rng"])  # dropout draws from the global generator
        rows = list(state["metrics"])
        best_auc, best_epoch, start_epoch = state["best_auc"], state["best_epoch"], state["epoch"] + 1
        train_loader.epoch = val_loader.epoch = state["epoch"]
    step_module: torch.nn.Module = _Forward01(net)
    if dist.enabled:
        step_module = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        step_module = torch.compile(step_module)
    eval_net = ema.shadow if ema is not None else net

    if dist.main:
        (run_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), "resolved": {
            "device": str(device), "precision": Precision.for_device(device).name,
            "cache": cache, "world_size": dist.world,
            "train_rows": int(len(tr_idx)), "val_rows": int(len(va_idx)),
            "store_path": str(Path(cfg.store).resolve())}}, indent=2))
        log.info("training %s on %s (%s, %s cache): %d train / %d val images, %d epochs, run %s",
                 cfg.arch, device, Precision.for_device(device).name, cache, len(tr_idx), len(va_idx),
                 cfg.epochs, run_dir)

    bad_patience = 0
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            net.train()
            total, seen = 0.0, 0
            bar = progress_bar(total=steps_per_epoch * cfg.batch_size, desc=f"epoch {epoch}/{cfg.epochs}",
                               enabled=progress and dist.main)
            for b in train_loader:
                x01 = augment_batch(to_float01(b.x), cfg.augment, gen)
                if use_channels_last(device):
                    x01 = x01.contiguous(memory_format=torch.channels_last)
                y = b.y * (1 - cfg.label_smoothing) + 0.5 * cfg.label_smoothing
                with autocast_context(device):
                    logits = step_module(x01)
                loss = F.binary_cross_entropy_with_logits(logits.float(), y)
                if not torch.isfinite(loss):
                    raise TrainingError(f"loss became {loss.item()} in epoch {epoch}; try a lower --lr "
                                        f"(last good checkpoint: {run_dir / 'last.pt'})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if ema is not None:
                    ema.update(net)
                total += loss.item() * len(y)
                seen += len(y)
                bar.update(len(y))
                bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
            bar.close()
            train_s = time.perf_counter() - t0
            p, yv, rows_v = (dist.all_gather(t).cpu().numpy() for t in predict_loader(eval_net, val_loader, device))
            # ranks pad their shares to equal length: count every validation row once
            _, first = np.unique(rows_v, return_index=True)
            m = evaluate_probs(p[first], yv[first])
            row = {"epoch": epoch, "train_loss": total / max(seen, 1), **m,
                   "lr": opt.param_groups[0]["lr"], "img_per_s": seen * dist.world / train_s,
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            improved = m["val_auc"] > best_auc
            if improved:
                best_auc, best_epoch, bad_patience = m["val_auc"], epoch, 0
            else:
                bad_patience += 1
            if dist.main:
                payload = _payload(cfg, store, eval_net, epoch, rows, best_auc, best_epoch)
                if improved:
                    save_checkpoint(run_dir / "best.pt", payload)
                save_checkpoint(run_dir / "last.pt", {**payload, "train_weights": net.state_dict(),
                                                      "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                                      "generator": gen.get_state().cpu(),
                                                      "torch_rng": torch.get_rng_state()})
                write_metrics(run_dir / "metrics.csv", rows)
                plot_curves(run_dir / "curves.png", rows, title=f"{cfg.arch} on {Path(cfg.store).name}")
                log.info("epoch %d/%d  loss %.4f  val_loss %.4f  val_auc %.4f  val_acc %.4f  %.0f img/s  %.1fs%s",
                         epoch, cfg.epochs, row["train_loss"], m["val_loss"], m["val_auc"], m["val_acc"],
                         row["img_per_s"], row["seconds"], "  *best" if improved else "")
            dist.barrier()
            if cfg.patience and bad_patience >= cfg.patience:
                if dist.main:
                    log.info("early stop: no AUC gain for %d epochs", cfg.patience)
                break
    except torch.cuda.OutOfMemoryError:
        raise TrainingError(f"out of GPU memory at --batch-size {cfg.batch_size}; "
                            f"try --batch-size {max(1, cfg.batch_size // 2)}") from None
    finally:
        dist.close()
    if cfg.export and dist.main:
        from ..export import export_onnx

        export_onnx(run_dir / "best.pt", run_dir / "model.onnx", store_path=cfg.store, force=True)
    return TrainResult(run_dir, best_auc, best_epoch, epoch, time.perf_counter() - t_start)


def _payload(cfg: TrainConfig, store: Store, net: torch.nn.Module, epoch: int,
             rows: list[dict[str, Any]], best_auc: float, best_epoch: int) -> dict[str, Any]:
    return {
        "model": {"name": cfg.arch, "kwargs": dict(cfg.model_kwargs)},
        "weights": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "mean": [float(v) for v in store.mean],
        "std": [float(v) for v in store.std],
        "stain": store.stain(),
        "store": {"path": str(Path(cfg.store).resolve()), "count": len(store)},
        "config": json.loads(json.dumps(cfg.to_dict())),
        "epoch": epoch,
        "metrics": rows,
        "val_auc": rows[-1]["val_auc"],
        "best_auc": best_auc,
        "best_epoch": best_epoch,
    }


def _init_weights(net: Classifier, path: str) -> None:
    """Load local weights (a pcamtool checkpoint or a plain state dict); never downloads."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PcamError(f"{path}: --init-weights file not found") from None
    except Exception as exc:
        raise PcamError(f"{path}: not a readable weights file ({type(exc).__name__})") from None
    if isinstance(sd, dict) and "weights" in sd:
        sd = sd["weights"]
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        raise PcamError(f"{path}: weights do not fit the model: {str(exc).splitlines()[0]}") from None
    if len(missing) == len(net.state_dict()):
        raise PcamError(f"{path}: no weight matches the model")
    log.info("initialized from %s (%d tensors missing, %d unexpected)", path, len(missing), len(unexpected))


def _load_resume(run_dir: Path, cfg: TrainConfig) -> tuple[TrainConfig, dict[str, Any]]:
    if not (run_dir / "last.pt").is_file() or not (run_dir / "config.json").is_file():
        raise PcamError(f"{run_dir}: not a run folder to resume (needs config.json and last.pt)")
    saved = json.loads((run_dir / "config.json").read_text())
    saved.pop("resolved", None)
    run_cfg = TrainConfig.from_dict(saved)
    state = load_checkpoint(run_dir / "last.pt")
    if "optimizer" not in state:
        raise PcamError(f"{run_dir}/last.pt: holds no optimizer state to resume from")
    store_count = state["store"]["count"]
    store = open_store(run_cfg.store)
    if len(store) != store_count:
        raise PcamError(f"{run_dir}: run was trained on {store_count} images, {run_cfg.store} has {len(store)}")
    # everything comes from the run itself: the schedule was laid out for its epochs
    run_cfg = replace(run_cfg, out=str(run_dir))
    return run_cfg, state
