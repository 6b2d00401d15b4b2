"""Run folders and what they hold: config, metrics, curves and checkpoints.

The checkpoints themselves are :class:`pcamtool.train.checkpoint.Checkpoint`
(what they hold, and how they are read and written); this module lays out the
folder around them. Every file is written under a temporary name and renamed
(:func:`writing`), so a kill never leaves half a file under a final name.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from ..errors import ModelError, PcamError
from ..io.fsutil import atomic_path, output_lock
from .checkpoint import FORMAT, VERSION

RUNS = Path("runs")
METRIC_FIELDS = ["epoch", "train_loss", "val_loss", "val_auc", "val_acc", "lr", "img_per_s", "seconds",
                 "skipped_steps"]
CHECKPOINTS = ("last.pt", "best.pt")
RUN_FILES = ("config.json", "metrics.csv", "curves.png")


def new_run_dir(arch: str, root: Path = RUNS) -> Path:
    """A fresh ``runs/<UTC time>-<arch>`` folder (suffixed if taken)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = root / f"{stamp}-{arch}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{arch}-{n}"
    return path


def latest_run(root: Path = RUNS, want: str = "best.pt") -> Path:
    """The most recently written run folder holding ``want``."""
    cands = [p for p in root.glob(f"*/{want}")] if root.is_dir() else []
    if not cands:
        raise ModelError(f"no run with {want} under {root}/ (train one with 'pcamtool train')")
    return max(cands, key=lambda p: p.stat().st_mtime).parent


def open_run_dir(path: Path) -> bool:
    """Make ``path`` ready for a new run; True when this call created it.

    A folder holding no checkpoint yet (a run killed or failed before its
    first epoch ended) is taken over, so the same command simply runs again.
    A folder with a checkpoint is a run to ``--resume``; one holding files a
    run would overwrite that a run did not write is refused.
    """
    if not path.exists():
        path.mkdir(parents=True)
        return True
    if not path.is_dir():
        raise PcamError(f"{path}: exists and is not a folder (choose another -o)")
    held = [name for name in CHECKPOINTS if (path / name).exists()]
    if held:
        raise PcamError(f"{path}: holds a trained run ({held[0]}); continue it with "
                        f"'pcamtool train --resume {path}' or choose another -o")
    for name in RUN_FILES:
        if (path / name).exists() and not (name == "config.json" and _is_run_config(path / name)):
            raise PcamError(f"{path / name}: exists and was not written by a pcamtool run (choose another -o)")
    remove_dead_temporaries(path)
    return False


def remove_dead_temporaries(path: Path) -> None:
    """Remove what killed processes left half-written in run folder ``path`` (their own temporaries only)."""
    from ..io.fsutil import remove_dead_temps

    for name in (*CHECKPOINTS, *RUN_FILES, "model.onnx"):
        remove_dead_temps(path / name)


def discard_unfinished(path: Path, created: bool) -> bool:
    """Remove what a run wrote to ``path`` if it never got to a checkpoint; True if it did so.

    Only the run's own files go, and the folder itself only when the run made
    it and nothing else is left in it.
    """
    if any((path / name).exists() for name in CHECKPOINTS):
        return False
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    if created and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    return True


def _is_run_config(path: Path) -> bool:
    try:
        return "resolved" in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


@contextlib.contextmanager
def run_lock(folder: Path, create: bool = True) -> Iterator[None]:
    """Hold ``folder``'s output lock (as ``pack`` holds its store's) on the main rank: a second run into it is refused.

    Raises
    ------
    BusyError
        Another process is training into (or continuing) ``folder``.
    """
    if int(os.environ.get("RANK", "0")) != 0 or not (create or folder.parent.is_dir()):
        yield   # under torchrun the main rank alone writes the folder; a missing one to continue fails later
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(folder):
        yield


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[Path]:
    """:func:`atomic_path` whose failures (disk full, permissions) name the final path in one line."""
    try:
        with atomic_path(path, force=True) as tmp:
            yield tmp
    except OSError as exc:
        raise PcamError(f"{path}: cannot write {what}: {exc.strerror or exc}") from None
    except RuntimeError as exc:  # torch.save reports a full disk as "PytorchStreamWriter failed writing"
        raise PcamError(f"{path}: cannot write {what}: {str(exc).splitlines()[0]}") from None


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of a run folder, as written (one clear line if it is not one)."""
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise PcamError(f"{run_dir}: not a run folder to resume (no config.json)") from None
    except (OSError, ValueError) as exc:
        raise PcamError(f"{path}: not a readable run config ({type(exc).__name__})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("resolved"), dict):
        raise PcamError(f"{path}: not a pcamtool run config")
    return saved


def write_config(path: Path, config: dict[str, Any]) -> None:
    """``config.json``: the run's configuration with everything resolved."""
    with writing(path, "the run config") as tmp:
        tmp.write_text(json.dumps(config, indent=2))


def write_metrics(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rewrite ``metrics.csv`` with ``rows`` (small: one row per epoch)."""
    with writing(path, "metrics") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in METRIC_FIELDS})


def plot_curves(path: Path, rows: Sequence[dict[str, Any]], title: Optional[str] = None) -> None:
    """``curves.png``: losses and validation AUC by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    a.plot(ep, [r["val_loss"] for r in rows], "o-", label="validation")
    a.set_xlabel("epoch")
    a.set_ylabel("loss (BCE)")
    a.legend()
    a.grid(alpha=0.3)
    b.plot(ep, [r["val_auc"] for r in rows], "o-", color="C2")
    b.set_xlabel("epoch")
    b.set_ylabel("validation ROC AUC")
    b.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in (a, b):  # epochs are whole numbers: no 2.5 ticks on a short run
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with writing(path, "curves") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write a checkpoint payload (a :meth:`Checkpoint.to_dict`-shaped dict); prefer :meth:`Checkpoint.save`."""
    from .checkpoint import Checkpoint

    return Checkpoint.from_dict({"format": FORMAT, "version": VERSION, **payload}, path).save(path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint file as its payload dict (for scripts; pcamtool's stages use :meth:`Checkpoint.load`)."""
    from .checkpoint import Checkpoint

    return Checkpoint.load(path).to_dict()


def load_weights(net: torch.nn.Module, weights: dict[str, Any], where: str) -> None:
    """``net.load_state_dict(weights)``, a mismatch reported in one line naming ``where``."""
    try:
        net.load_state_dict(weights)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0].rstrip(":. ")
        raise ModelError(f"{where}: weights do not fit the model ({first})") from None


def build_model(ckpt: Any) -> torch.nn.Module:
    """The :class:`~pcamtool.contract.Classifier` of a :class:`Checkpoint` (or its payload dict), in eval mode."""
    from .checkpoint import Checkpoint

    return (ckpt if isinstance(ckpt, Checkpoint) else Checkpoint.from_dict(ckpt)).build_model()
