"""Resuming a run: its own config with the options that may change, and everything ``last.pt`` restores.

``pcamtool train --resume RUN`` continues from the end of the last finished
epoch exactly where an uninterrupted run would be: weights, EMA, optimizer,
learning-rate schedule, fp16 loss scaler, the sampler's epoch and every
random generator. The run's ``config.json`` is the configuration; the
options in :data:`RESUMABLE` may be given again with new values (with a new
``--epochs`` the learning rate follows, from the step the run resumes at,
the schedule laid out for the new length), any other change is refused in
one line.
"""
from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import AugmentConfig, TrainConfig, flag, option_flags
from ..device import Precision
from ..errors import PcamError
from ..io.store import open_store
from .data import BatchLoader
from .runs import load_checkpoint, load_weights, read_run_config, remove_dead_temporaries

if TYPE_CHECKING:
    from .loop import Trainer

log = logging.getLogger("pcamtool")

# how long the run goes on, and where and how fast it runs: none changes what is learnt per step
RESUMABLE = ("epochs", "patience", "device", "threads", "cache", "compile", "export")
_PATHS = ("store", "val_store", "groups", "init_weights")
# what identifies a run: a last.pt disagreeing with config.json on these is another run's
_IDENTITY = ("arch", "model_kwargs", "pretrained", "img_size", "store", "seed", "batch_size", "optimizer")


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """The run's own config with the allowed ``overrides`` applied, and its ``last.pt``.

    Raises
    ------
    PcamError
        Not a run folder, a garbled ``config.json``, a ``last.pt`` that is
        missing or another run's, a refused override, or a store that changed.
    """
    saved = read_run_config(run_dir)
    remove_dead_temporaries(run_dir)  # a SIGKILL mid-save leaves one; this run will not rewrite every file
    saved.pop("resolved")
    run_cfg = TrainConfig.from_dict(saved, source=run_dir / "config.json")
    if not (run_dir / "last.pt").is_file():
        raise PcamError(f"{run_dir}: not a run folder to resume (no last.pt: it stopped before its first "
                        f"epoch ended; run the command that started it again)")
    state = load_checkpoint(run_dir / "last.pt")
    if not isinstance(state.get("config"), dict) or "optimizer" not in state or "epoch" not in state:
        raise PcamError(f"{run_dir}/last.pt: holds no training state to resume from")
    ck = state["config"]
    other = [k for k in _IDENTITY if ck.get(k) != saved.get(k)]
    if other:
        raise PcamError(f"{run_dir}/last.pt: belongs to another run ({', '.join(f'{k} {ck.get(k)!r}' for k in other)}, "
                        f"where config.json says {', '.join(repr(saved.get(k)) for k in other)})")
    run_cfg = _apply_overrides(run_cfg, overrides, run_dir)
    if run_cfg.epochs is not None and run_cfg.epochs < state["epoch"]:
        raise PcamError(f"--epochs {run_cfg.epochs}: {run_dir} has already trained {state['epoch']} epochs")
    store_count = state["store"]["count"]
    store = open_store(run_cfg.store)
    if len(store) != store_count:
        raise PcamError(f"{run_dir}: run was trained on {store_count} images, {run_cfg.store} has {len(store)}")
    return replace(run_cfg, out=str(run_dir)), state


def _apply_overrides(run_cfg: TrainConfig, overrides: dict[str, Any], run_dir: Path) -> TrainConfig:
    """Apply the :data:`RESUMABLE` options the user changed; refuse any other change in one line."""
    def same(key: str, value: Any) -> bool:
        was = getattr(run_cfg, key, None)
        if key == "augment":
            return all(getattr(run_cfg.augment, k, None) == v for k, v in dict(value).items())
        if key == "out":
            return value is None or Path(value).resolve() == run_dir.resolve()
        if key in _PATHS and value is not None and was is not None:
            return Path(value).resolve() == Path(was).resolve()
        return value == was

    known = {f.name for f in fields(TrainConfig)}
    changed = {k: v for k, v in overrides.items() if not same(k, v)}
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE or k not in known}
    if refused:
        aug = {f.name for f in fields(AugmentConfig)}
        was = []
        for key, value in refused.items():
            for k in (value if key == "augment" else [key]):
                current = getattr(run_cfg.augment, k) if key == "augment" and k in aug else getattr(run_cfg, k, "?")
                was.append(f"{flag(k)} {current}")
        raise PcamError(f"--resume: cannot change {', '.join(option_flags(refused))} on resume (the run was "
                        f"trained with {', '.join(dict.fromkeys(was))}); start a new run with another -o instead")
    if changed:
        log.info("resuming %s with %s", run_dir, ", ".join(f"{flag(k)} {v}" for k, v in changed.items()))
    return replace(run_cfg, **changed)


def training_state(t: "Trainer", loader: BatchLoader, device: torch.device) -> dict[str, Any]:
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


def restore(t: "Trainer", loader: BatchLoader, state: dict[str, Any], where: Path, precision: Precision,
            device: torch.device) -> None:
    """Load ``last.pt``'s training state (read from ``where``) into the freshly built parts."""
    load_weights(t.net, state["train_weights"], str(where))
    if t.ema.decay > 0:
        load_weights(t.ema.model, state["weights"], str(where))
    try:
        t.opt.load_state_dict(state["optimizer"])
        t.sched.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise PcamError(f"{where}: optimizer state does not fit this run ({str(exc).splitlines()[0]})") from None
    loader.load_state_dict(state.get("sampler", {"epoch": state["epoch"]}))
    if state.get("precision", precision.name) == precision.name:
        t.scaler.load_state_dict(state.get("scaler", {}))
    else:
        log.warning("%s: trained in %s, resumed in %s: the loss scaler starts afresh",
                    where, state.get("precision"), precision.name)
    rng = state.get("rng", {})
    if rng.get("device") == device.type:
        t.gen.set_state(rng["augment"])
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
    else:  # a CUDA generator's state does not fit a CPU one (nor the reverse): reseed deterministically
        log.warning("%s: saved on %s, resumed on %s: random augmentation restarts from the seed, so the run "
                    "will not repeat an uninterrupted one exactly", where, rng.get("device", "?"), device.type)
        t.gen.manual_seed(int(state["config"]["seed"]) + 7919 * int(state["epoch"]))
