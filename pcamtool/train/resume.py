"""Resuming a run: its own config with the options that may change, and everything ``last.pt`` restores.

``pcamtool train --resume RUN`` continues from the end of the last finished
epoch exactly where an uninterrupted run would be: weights, EMA, optimizer,
learning-rate schedule, fp16 loss scaler, the sampler's epoch and every
random generator. The run's ``config.json`` is the configuration; the
options in :data:`RESUMABLE` may be given again with new values (with a new
``--epochs`` the learning rate follows, from the step the run resumes at,
the schedule laid out for the new length), any other change is refused in
one line; a continued ``pcamtool cv`` allows only :data:`MACHINE`
(:func:`check_changes` is the one policy for both). A store replaced by
another (other row count, other stain normalization) is refused.
"""
from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from ..config import PATH_FIELDS, AugmentConfig, TrainConfig, flag, option_flags
from ..device import Precision
from ..errors import PcamError
from ..io.store import open_store
from ..stain import StainReference
from .checkpoint import Checkpoint
from .data import BatchLoader
from .parts import EMA, LossScaler
from .runs import load_weights, read_run_config, remove_dead_temporaries

log = logging.getLogger("pcamtool")

# Where and how fast a run goes: none changes what is learnt, so a continued run or cv may change them.
MACHINE = ("device", "threads", "cache", "compile", "tensorboard")
# A continued training run may also go on longer, stop earlier, export at the end or log elsewhere.
# (Spelled out rather than MACHINE + ...: the refusal lists these once each, in this order.)
RESUMABLE = ("device", "threads", "cache", "compile", "epochs", "patience", "export", "tensorboard")
assert set(MACHINE) <= set(RESUMABLE)
# What identifies a run: a last.pt disagreeing with config.json on these is another run's.
_IDENTITY = ("arch", "model_kwargs", "pretrained", "img_size", "store", "seed", "batch_size", "optimizer")


class Resumable(Protocol):
    """The parts of a training run that ``last.pt`` saves and restores (:class:`pcamtool.train.loop.Trainer`)."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: LossScaler
    ema: EMA
    gen: torch.Generator


def given_options(cfg: TrainConfig, run_cfg: TrainConfig) -> dict[str, Any]:
    """The options of ``cfg`` that differ from the run's own, as overrides (a library caller's ``fit(cfg, resume=...)``).

    Fields ``cfg`` leaves unset (None) or at their default count as not
    given, so ``fit(TrainConfig(), resume=run)`` continues the run as it was.
    """
    default, default_aug = TrainConfig(), AugmentConfig()
    out: dict[str, Any] = {}
    for f in fields(TrainConfig):
        mine, theirs = getattr(cfg, f.name), getattr(run_cfg, f.name)
        if f.name == "augment":
            aug = {a.name: getattr(mine, a.name) for a in fields(AugmentConfig)
                   if getattr(mine, a.name) != getattr(theirs, a.name)
                   and getattr(mine, a.name) != getattr(default_aug, a.name)}
            if aug:
                out["augment"] = aug
        elif mine is not None and mine != theirs and mine != getattr(default, f.name):
            out[f.name] = mine
    return out


def check_changes(run_cfg: TrainConfig, overrides: dict[str, Any], run_dir: Path,
                  allowed: tuple[str, ...] = RESUMABLE, what: str = "--resume") -> dict[str, Any]:
    """The ``overrides`` that change ``run_cfg``; any outside ``allowed`` is refused in one line.

    The one policy of what may change when a run continues: ``train --resume``
    allows :data:`RESUMABLE`, a continued ``cv`` only :data:`MACHINE`.

    Raises
    ------
    PcamError
        A change outside ``allowed``, naming the option, the run's value and what to do instead.
    """
    def same(key: str, value: Any) -> bool:
        was = getattr(run_cfg, key, None)
        if key == "augment":
            return all(getattr(run_cfg.augment, k, None) == v for k, v in dict(value).items())
        if key == "out":
            return value is None or Path(value).resolve() == run_dir.resolve()
        if key in PATH_FIELDS and value is not None and was is not None:
            return Path(value).resolve() == Path(was).resolve()
        return value == was

    known = {f.name for f in fields(TrainConfig)}
    changed = {k: v for k, v in overrides.items() if not same(k, v)}
    refused = {k: v for k, v in changed.items() if k not in allowed or k not in known}
    if refused:
        aug = {f.name for f in fields(AugmentConfig)}
        was = []
        for key, value in refused.items():
            for k in (value if key == "augment" else [key]):
                current = getattr(run_cfg.augment, k) if key == "augment" and k in aug else getattr(run_cfg, k, "?")
                was.append(f"{flag(k)} {current}")
        raise PcamError(f"{what}: cannot change {', '.join(option_flags(refused))} on resume (the run was "
                        f"trained with {', '.join(dict.fromkeys(was))}); only {', '.join(flag(k) for k in allowed)} "
                        f"may change: start a new run with another -o instead")
    return changed


def resume_config(run_dir: Path, overrides: Optional[dict[str, Any]] = None,
                  cfg: Optional[TrainConfig] = None) -> tuple[TrainConfig, Checkpoint]:
    """The run's own config with the allowed changes applied, and its ``last.pt``.

    The changes are ``overrides`` (the options the user gave) or, without
    them, whatever ``cfg`` sets differently from the run (:func:`given_options`).

    Raises
    ------
    PcamError
        Not a run folder, a garbled ``config.json``, a ``last.pt`` that is
        missing or another run's, a refused change, or a store that changed
        (row count or stain normalization).
    """
    saved = read_run_config(run_dir)
    remove_dead_temporaries(run_dir)  # a SIGKILL mid-save leaves one; this run will not rewrite every file
    saved.pop("resolved")
    run_cfg = TrainConfig.from_dict(saved, source=run_dir / "config.json")
    if not (run_dir / "last.pt").is_file():
        raise PcamError(f"{run_dir}: not a run folder to resume (no last.pt: it stopped before its first "
                        f"epoch ended; run the command that started it again)")
    ck = Checkpoint.load(run_dir / "last.pt")
    if ck.training_state is None or "optimizer" not in ck.training_state or not ck.config:
        raise PcamError(f"{run_dir}/last.pt: holds no training state to resume from")
    other = [k for k in _IDENTITY if ck.config.get(k) != saved.get(k)]
    if other:
        raise PcamError(f"{run_dir}/last.pt: belongs to another run ({', '.join(f'{k} {ck.config.get(k)!r}' for k in other)}, "
                        f"where config.json says {', '.join(repr(saved.get(k)) for k in other)})")
    if overrides is None:
        overrides = given_options(cfg, run_cfg) if cfg is not None else {}
    changed = check_changes(run_cfg, overrides, run_dir)
    if changed:
        log.info("resuming %s with %s", run_dir, ", ".join(f"{flag(k)} {v}" for k, v in changed.items()))
    run_cfg = replace(run_cfg, **changed)
    if run_cfg.epochs is not None and run_cfg.epochs < ck.epoch:
        raise PcamError(f"--epochs {run_cfg.epochs}: {run_dir} has already trained {ck.epoch} epochs")
    store = open_store(run_cfg.store)
    if ck.store_count is not None and len(store) != ck.store_count:
        raise PcamError(f"{run_dir}: run was trained on {ck.store_count} images, {run_cfg.store} has {len(store)}")
    now = StainReference.from_dict(store.stain())
    if now != ck.stain:
        raise PcamError(f"{run_cfg.store}: packed with stain normalization {now.describe()}, but {run_dir} was "
                        f"trained on images normalized with {ck.stain.describe()} (the store was replaced; "
                        f"resume on the store it was trained on, or start a new run)")
    return replace(run_cfg, out=str(run_dir)), ck


def training_state(t: Resumable, loader: BatchLoader, device: torch.device) -> dict[str, Any]:
    """What ``last.pt`` adds so a resumed run continues exactly: optimizer, schedule, scaler, RNGs, sampler."""
    return {
        "train_weights": t.net.state_dict(),
        "optimizer": t.opt.state_dict(),
        "scheduler": t.sched.state_dict(),
        "scaler": t.scaler.state_dict(),
        "sampler": loader.state_dict(),
        "rng": {"device": device.type,
                "augment": t.gen.get_state(),               # a CPU ByteTensor for CPU and CUDA generators alike
                "cpu": torch.get_rng_state(),               # dropout on the CPU draws from the global generators
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
    }


def restore(t: Resumable, loader: BatchLoader, ck: Checkpoint, where: Path, precision: Precision,
            device: torch.device) -> None:
    """Load ``last.pt``'s training state (read from ``where``) into the freshly built parts."""
    state = {**(ck.training_state or {}), "weights": ck.weights, "epoch": ck.epoch, "precision": ck.precision}
    load_weights(t.net, state["train_weights"], str(where))
    if t.ema.decay > 0:
        load_weights(t.ema.model, state["weights"], str(where))
    try:
        t.opt.load_state_dict(state["optimizer"])
        t.sched.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise PcamError(f"{where}: optimizer state does not fit this run ({str(exc).splitlines()[0]})") from None
    loader.load_state_dict(state.get("sampler", {"epoch": state["epoch"]}))
    if state["precision"] == precision.name:
        t.scaler.load_state_dict(state.get("scaler", {}))
    else:
        log.warning("%s: trained in %s, resumed in %s: the loss scaler starts afresh",
                    where, state["precision"], precision.name)
    rng = state.get("rng", {})
    if rng.get("device") == device.type:
        t.gen.set_state(rng["augment"])
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
    else:  # a CUDA generator's state does not fit a CPU one (nor the reverse): reseed deterministically
        log.warning("%s: saved on %s, resumed on %s: random augmentation restarts from the seed, so the run "
                    "will not repeat an uninterrupted one exactly", where, rng.get("device", "?"), device.type)
        t.gen.manual_seed(int(ck.config["seed"]) + 7919 * int(ck.epoch))
