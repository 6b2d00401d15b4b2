"""Train a CNN from a store: ``pcamtool train`` (or ``torchrun ... -m pcamtool train``).

:func:`fit` assembles a run (device and precision decided once by
:mod:`pcamtool.device`, parts from :mod:`.parts`, batches from :mod:`.data`,
the run folder from :mod:`.runs`) and loops :func:`train_one_epoch` and
:func:`evaluate`. The step has no CUDA branches and reads nothing back to the
host: the loss sum, the NaN check and the skipped fp16 steps accumulate on
the device and are read once per epoch (and every few steps for the
progress bar).

Example::

    pcamtool train data/train.h5 --epochs 12 -o runs/baseline
"""
from __future__ import annotations

import logging
import math
import os
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..augment import augment_batch
from ..config import AugmentConfig, TrainConfig, auto_epochs
from ..contract import Classifier, to_float01
from ..device import Precision, resolve_device
from ..errors import Interrupted, PcamError, TrainingError
from ..io.store import Store, open_store
from ..jsonutil import jsonable
from ..models import create_model, model_normalization, without_pretrained
from ..progress import progress_bar
from ..stain import StainReference
from ..system import cpu_threads
from .checkpoint import Checkpoint, split_rows
from .data import Batch, BatchLoader, RowSource, resolve_cache
from .finetune import Recipe, apply_epoch, param_groups, recipe_for
from .parts import EMA, Dist, LossScaler, create_optimizer, create_schedule
from .resume import restore, resume_config, training_state
from .runs import discard_unfinished, new_run_dir, open_run_dir, plot_curves, run_lock, write_config, write_metrics
from .tblog import NullLog, open_log

log = logging.getLogger("pcamtool")

BAR_EVERY = 50  # steps between progress-bar loss readings (each one waits for the GPU)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    best_auc: float
    best_epoch: int
    last_epoch: int
    seconds: float


class _Forward01(torch.nn.Module):
    """Training forward on augmented floats, as a module so DDP can wrap it."""

    def __init__(self, net: Classifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.net.forward01(x01)


@dataclass
class Trainer:
    """Everything one training step touches, built once by :func:`fit`."""

    module: torch.nn.Module               # the forward on augmented floats (DDP / compiled wrapper)
    net: Classifier                       # the trained network itself
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: LossScaler
    ema: EMA
    gen: torch.Generator                  # augmentation's random numbers, on the device
    augment: AugmentConfig
    label_smoothing: float
    autocast: AbstractContextManager      # entered every step, built once
    memory_format: torch.memory_format
    micro_batch: int = 0                  # images per forward/backward; 0: the whole batch (device.py)


@dataclass(frozen=True)
class EpochStats:
    loss: float          # mean training loss (nan/inf when it diverged)
    images: int
    skipped_steps: int   # fp16 steps skipped for overflowing gradients
    seconds: float


def create_trainer(cfg: TrainConfig, net: Classifier, device: torch.device, precision: Precision,
                   total_steps: int, rank: int = 0, backbone_mult: float = 1.0) -> Trainer:
    """The parts that train ``net`` on ``device`` for ``total_steps`` steps, as ``cfg`` and ``precision`` say.

    ``net`` moves to ``device`` in the precision's memory format; the
    augmentation generator is seeded from ``cfg.seed`` and the DDP ``rank``;
    all but a transfer network's head learn at ``lr * backbone_mult``.
    """
    net = net.to(device, memory_format=precision.memory_format)
    opt = create_optimizer(param_groups(net, cfg.lr, backbone_mult), cfg, device)
    return Trainer(module=_Forward01(net), net=net, opt=opt, sched=create_schedule(opt, cfg, total_steps),
                   scaler=LossScaler(precision, device), ema=EMA(net, cfg.ema),
                   gen=torch.Generator(device=device).manual_seed(cfg.seed + 1000 * rank),
                   augment=cfg.augment, label_smoothing=cfg.label_smoothing, autocast=precision.autocast(),
                   memory_format=precision.memory_format, micro_batch=precision.micro_batch)


def train_step(t: Trainer, b: Batch) -> torch.Tensor:
    """One optimizer step on batch ``b``; returns the batch's loss, still on the device (nothing is read).

    With ``t.micro_batch`` set (``PCAMTOOL_MICRO_BATCH``, off by default) the
    batch runs forward and backward in slices of that many images whose
    gradients add up (each slice's loss is summed and divided by the whole
    batch's size, so the gradient is the batch mean's), then one optimizer
    step: faster on a CPU, the same step but for batch norm's statistics,
    which each slice computes for itself (:mod:`pcamtool.device`). Under DDP
    only the last slice all-reduces.
    """
    x01 = augment_batch(to_float01(b.x), t.augment, t.gen).contiguous(memory_format=t.memory_format)
    y = b.y * (1 - t.label_smoothing) + 0.5 * t.label_smoothing
    n = len(y)
    step = t.micro_batch if 0 < t.micro_batch < n else n
    t.opt.zero_grad(set_to_none=True)
    for s in range(0, n, step):
        with nullcontext() if s + step >= n else _no_sync(t.module):
            with t.autocast:
                logits = t.module(x01[s:s + step])
            loss = F.binary_cross_entropy_with_logits(logits.float(), y[s:s + step], reduction="sum") / n
            t.scaler.backward(loss)
        loss_sum = loss.detach() if s == 0 else loss_sum + loss.detach()
    t.scaler.step(t.opt)
    t.sched.step()
    t.ema.update()
    return loss_sum


def _no_sync(module: torch.nn.Module) -> AbstractContextManager:
    """DDP's ``no_sync()`` (gradients kept local until the last slice); a no-op for a plain module."""
    no_sync = getattr(module, "no_sync", None)
    return no_sync() if no_sync is not None else nullcontext()


def train_one_epoch(t: Trainer, loader: BatchLoader, bar: Any = None) -> EpochStats:
    """One pass over ``loader``; reads from the device once at the end (and every ``BAR_EVERY`` steps for ``bar``)."""
    t0 = time.perf_counter()
    t.net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=t.scaler.skipped.device)
    skipped_before = t.scaler.skipped.clone()
    seen, show_every = 0, BAR_EVERY if bar is not None and not bar.disable else 0
    with warnings.catch_warnings():
        # fp16: the GradScaler skips the first steps while it finds its scale, so the schedule
        # steps before the optimizer ever did; expected, and not worth a warning on every T4 run
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        for k, b in enumerate(loader, 1):
            loss_sum += train_step(t, b) * len(b.index)  # a NaN anywhere makes the sum NaN: checked by fit
            seen += len(b.index)
            if bar is not None:
                bar.update(len(b.index))
                if show_every and k % show_every == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", refresh=False)
    total, skipped = torch.stack([loss_sum, (t.scaler.skipped - skipped_before).double()]).tolist()
    return EpochStats(total / max(seen, 1), seen, int(skipped), time.perf_counter() - t0)


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader: BatchLoader, autocast: AbstractContextManager,
             dist: Optional[Dist] = None, keep: Optional[dict[str, np.ndarray]] = None) -> dict[str, float]:
    """Validation loss, ROC AUC and accuracy of ``net`` over ``loader`` (no augmentation).

    Under DDP every rank scores its share and the results are gathered;
    rows padded onto several ranks count once.

    Raises
    ------
    TrainingError
        The network puts out NaN or infinite probabilities.
    """
    from ..evaluate import binary_metrics

    net.eval()
    probs, ys, rows = [], [], []
    for b in loader:
        with autocast:
            probs.append(torch.sigmoid(net(b.x).float()))
        ys.append(b.y)
        rows.append(b.index)
    p, y = torch.cat(probs), torch.cat(ys)
    r = torch.from_numpy(np.concatenate(rows)).to(p.device)
    if dist is not None:
        p, y, r = (dist.all_gather(v) for v in (p, y, r))
    p_np, y_np, r_np = (v.cpu().numpy() for v in (p, y, r))
    _, first = np.unique(r_np, return_index=True)
    if not np.isfinite(p_np).all():
        raise TrainingError("the model's validation outputs are not finite (diverged); try a lower --lr")
    m = binary_metrics(p_np[first], y_np[first])
    if keep is not None:  # the probabilities themselves, for TensorBoard's curves
        keep.update(probs=p_np[first], labels=y_np[first])
    return {"val_loss": m["loss"], "val_auc": m["auc"], "val_acc": m["acc"]}


@dataclass
class Run:
    """What :func:`fit` assembles before the first epoch: data, model, parts and where it all goes."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    dist: Dist
    precision: Precision
    store: Store
    stain: StainReference          # the store's stain normalization, recorded in every checkpoint
    train_loader: BatchLoader
    val_loader: BatchLoader
    t: Trainer
    recipe: Recipe
    cache: str
    rows: list[dict[str, Any]]     # metrics so far, one row per finished epoch
    best_auc: float = -1.0
    best_epoch: int = 0
    start_epoch: int = 1


def _open_data(cfg: TrainConfig) -> tuple[Store, Store, np.ndarray, np.ndarray]:
    """The training store, the validation store and their rows (:func:`~.checkpoint.split_rows`)."""
    store = open_store(cfg.store, need_labels=True)
    tr, va = split_rows(cfg, store)
    if cfg.val_store:
        val_store = open_store(cfg.val_store, need_labels=True)
        return store, val_store, tr, np.arange(len(val_store))
    return store, store, tr, va


def fit(cfg: TrainConfig, resume: Optional[str | os.PathLike] = None, progress: bool = True,
        overrides: Optional[dict[str, Any]] = None) -> TrainResult:
    """Train a model as ``cfg`` says; returns where the run went and its best AUC.

    Parameters
    ----------
    resume
        A run folder whose ``last.pt`` to continue from. The run's own
        ``config.json`` is the configuration; what ``cfg`` sets differently
        counts as given options (see ``overrides``), so ``fit(replace(cfg,
        epochs=20), resume=run)`` trains on to epoch 20.
    overrides
        With ``resume``: the options the user gave explicitly, as
        :meth:`TrainConfig.from_options` returns them (then ``cfg`` is not
        compared). Those in :data:`~pcamtool.train.resume.RESUMABLE` are
        applied; any other that differs from the run is refused. With a new
        ``epochs`` the learning rate follows the schedule laid out for the
        new length from the step the run resumes at.

    Raises
    ------
    PcamError
        Bad store or options, a mismatched resume, NaN loss, out of memory,
        a full disk.
    Interrupted
        Ctrl-C; the message says what was kept and how to continue.
    """
    t_start = time.perf_counter()
    run_dir = Path(resume) if resume is not None else Path(cfg.out) if cfg.out else new_run_dir(cfg.arch.replace(":", "-"))
    with run_lock(run_dir, create=resume is None):
        return _fit(cfg, run_dir, resume is not None, progress, overrides, t_start)


def _fit(cfg: TrainConfig, run_dir: Path, resuming: bool, progress: bool, overrides: Optional[dict[str, Any]],
         t_start: float) -> TrainResult:
    """:func:`fit` inside the run folder's lock."""
    ck: Optional[Checkpoint] = None
    if resuming:
        cfg, ck = resume_config(run_dir, overrides, cfg)
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads or cpu_threads())
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN time its kernels once
    dist = Dist(device)
    device = dist.local_device(device)
    torch.manual_seed(cfg.seed)
    data = _open_data(cfg)
    if cfg.epochs is None:  # resolved once; config.json records the number, so --resume keeps it
        cfg = replace(cfg, epochs=auto_epochs(len(data[2])))
    created = open_run_dir(run_dir) if not resuming and dist.main else False
    try:
        run = _build_run(cfg, ck, device, dist, data, run_dir)
        with open_log(cfg.tensorboard, run_dir, dist.main) as tb:  # a stand-in doing nothing without --tensorboard
            tb.start(cfg.to_dict(), data[0], data[2], cfg.augment, cfg.seed)
            _loop(run, progress, tb)
        if cfg.export and dist.main:
            from ..export import export_onnx

            export_onnx(run_dir / "best.pt", run_dir / "model.onnx", store_path=cfg.store, force=True)
        last = run.rows[-1]["epoch"] if run.rows else run.start_epoch - 1
        return TrainResult(run_dir, run.best_auc, run.best_epoch, last, time.perf_counter() - t_start)
    except KeyboardInterrupt:
        if dist.main and discard_unfinished(run_dir, created):
            raise Interrupted("stopped before the first epoch ended, so nothing was kept; "
                              "the same command starts again") from None
        raise Interrupted(f"{run_dir} keeps every finished epoch; "
                          f"continue with: pcamtool train --resume {run_dir}") from None
    except torch.cuda.OutOfMemoryError:
        if dist.main:
            discard_unfinished(run_dir, created)
        raise TrainingError(f"out of GPU memory at --batch-size {cfg.batch_size}; "
                            f"try --batch-size {max(1, cfg.batch_size // 2)}") from None
    except BaseException:
        if dist.main:  # a run that never saved a checkpoint leaves nothing behind
            discard_unfinished(run_dir, created)
        raise
    finally:
        dist.close()


def _build_run(cfg: TrainConfig, ck: Optional[Checkpoint], device: torch.device, dist: Dist,
               data: tuple[Store, Store, np.ndarray, np.ndarray], run_dir: Path) -> Run:
    """Loaders, model, optimizer and the rest, restored from ``ck`` (``last.pt``) when resuming; writes config.json."""
    store, val_store, tr_idx, va_idx = data
    precision = Precision.for_device(device)
    cache = resolve_cache(cfg.cache, store, device)
    source = RowSource(store, cache, device)
    val_source = source if val_store is store else RowSource(val_store, resolve_cache(cfg.cache, val_store, device), device)
    train_loader = BatchLoader(source, tr_idx, cfg.batch_size, shuffle=True, seed=cfg.seed,
                               drop_last=len(tr_idx) > cfg.batch_size, rank=dist.rank, world=dist.world)
    val_loader = BatchLoader(val_source, va_idx, max(256, cfg.batch_size), rank=dist.rank, world=dist.world)

    kwargs = cfg.resolved_model_args()
    # a resumed run's weights come from last.pt: never reload (or download) the pretrained file
    backbone = create_model(cfg.arch, **(kwargs if ck is None else without_pretrained(kwargs)))
    # pretrained networks keep the statistics they were trained with; others use the store's
    mean, std = model_normalization(cfg.arch, kwargs) or (store.mean, store.std)
    net = Classifier(backbone, torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32))
    if cfg.init_weights and ck is None:
        _init_weights(net, cfg.init_weights)
    recipe = recipe_for(cfg, kwargs)
    t = create_trainer(cfg, net, device, precision, cfg.epochs * len(train_loader), dist.rank, recipe.backbone_mult)
    run = Run(cfg, run_dir, device, dist, precision, store, StainReference.from_dict(store.stain()),
              train_loader, val_loader, t, recipe, cache, [])
    if ck is not None:
        restore(t, train_loader, ck, run_dir / "last.pt", precision, device)
        run.rows = list(ck.metrics)
        run.best_auc, run.best_epoch, run.start_epoch = ck.best_auc, ck.best_epoch, ck.epoch + 1
    t.module = dist.wrap(t.module, device)
    if cfg.compile:
        t.module = torch.compile(t.module)
    if dist.main:
        write_config(run_dir / "config.json", {**cfg.to_dict(), "resolved": {
            "device": str(device), "precision": precision.name, "precision_reason": precision.reason,
            "cache": cache, "world_size": dist.world, "train_rows": int(len(tr_idx)), "val_rows": int(len(va_idx)),
            "model": {"name": cfg.arch, "kwargs": kwargs}, "store_path": str(Path(cfg.store).resolve())}})
        log.info("training %s on %s (%s, %s cache): %d train / %d val images, %d epochs, run %s",
                 cfg.arch, device, precision.reason, cache, len(tr_idx), len(va_idx), cfg.epochs, run_dir)
    return run


def _loop(run: Run, progress: bool, tb: NullLog = NullLog()) -> None:
    """Train and validate from ``run.start_epoch`` to the last epoch (or an early stop), checkpointing each."""
    cfg, t, dist, net = run.cfg, run.t, run.dist, run.t.net
    bad_patience = 0
    for epoch in range(run.start_epoch, cfg.epochs + 1):
        changed = apply_epoch(net, epoch, run.recipe)
        if changed is not None and dist.main:
            log.info("epoch %d: %s", epoch, "head only (backbone frozen)" if changed
                     else f"all layers (backbone at lr x {run.recipe.backbone_mult:g})")
        if changed is not None and dist.world > 1:  # DDP hooks only parameters that require grad
            t.module = dist.wrap(_Forward01(net), run.device)
        bar = progress_bar(total=len(run.train_loader) * cfg.batch_size, desc=f"epoch {epoch}/{cfg.epochs}",
                           enabled=progress and dist.main)
        try:
            st = train_one_epoch(t, run.train_loader, bar)
        finally:  # an interrupted epoch's bar must not swallow the message that follows
            bar.close()
        if not math.isfinite(st.loss):
            last = run.run_dir / "last.pt"
            raise TrainingError(f"loss became {st.loss} in epoch {epoch}; try a lower --lr ("
                                + (f"last good checkpoint: {last})" if last.exists() else "no checkpoint kept)"))
        val: dict[str, np.ndarray] = {}
        m = evaluate(t.ema.model, run.val_loader, t.autocast, dist, keep=val)
        row = {"epoch": epoch, "train_loss": st.loss, **m, "lr": t.opt.param_groups[0]["lr"],
               "img_per_s": st.images * dist.world / st.seconds, "skipped_steps": st.skipped_steps,
               "seconds": st.seconds + 0.0}
        run.rows.append(row)
        improved = m["val_auc"] > run.best_auc
        if improved:
            run.best_auc, run.best_epoch, bad_patience = m["val_auc"], epoch, 0
        else:
            bad_patience += 1
        tb.epoch(row, val.get("probs"), val.get("labels"), improved)
        if dist.main:
            _save_epoch(run, epoch, improved)
            log.info("epoch %d/%d  loss %.4f  val_loss %.4f  val_auc %.4f  val_acc %.4f  %.0f img/s  %.1fs%s%s",
                     epoch, cfg.epochs, row["train_loss"], m["val_loss"], m["val_auc"], m["val_acc"],
                     row["img_per_s"], row["seconds"],
                     f"  ({st.skipped_steps} fp16 steps skipped)" if st.skipped_steps else "",
                     "  *best" if improved else "")
        dist.barrier()
        if cfg.patience and bad_patience >= cfg.patience:
            if dist.main:
                log.info("early stop: no AUC gain for %d epochs", cfg.patience)
            break


def checkpoint_of(run: Run, epoch: int) -> Checkpoint:
    """The :class:`Checkpoint` of ``run`` after ``epoch`` (the EMA weights when EMA is on; no training state)."""
    net = run.t.ema.model
    return Checkpoint(
        arch=run.cfg.arch, model_kwargs=run.cfg.resolved_model_args(),
        mean=[float(v) for v in net.normalize.mean], std=[float(v) for v in net.normalize.std],  # what it trained with
        weights={k: v.detach().cpu() for k, v in net.state_dict().items()},
        stain=run.stain, store_path=str(Path(run.cfg.store).resolve()), store_count=len(run.store),
        config=jsonable(run.cfg.to_dict()), precision=run.precision.name, epoch=epoch, metrics=list(run.rows),
        val_auc=run.rows[-1]["val_auc"], best_auc=run.best_auc, best_epoch=run.best_epoch)


def _save_epoch(run: Run, epoch: int, improved: bool) -> None:
    ck = checkpoint_of(run, epoch)
    replace(ck, training_state=training_state(run.t, run.train_loader, run.device)).save(run.run_dir / "last.pt")
    if improved:
        ck.save(run.run_dir / "best.pt")
    write_metrics(run.run_dir / "metrics.csv", run.rows)
    plot_curves(run.run_dir / "curves.png", run.rows, title=f"{run.cfg.arch} on {Path(run.cfg.store).name}")


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
    # counted from the file's side: batch norm never reports a missing num_batches_tracked as missing
    if not isinstance(sd, dict) or not set(sd) & set(net.state_dict()):
        raise PcamError(f"{path}: no weight matches the model")
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        raise PcamError(f"{path}: weights do not fit the model: {str(exc).splitlines()[0]}") from None
    log.info("initialized from %s (%d tensors missing, %d unexpected)", path, len(missing), len(unexpected))
