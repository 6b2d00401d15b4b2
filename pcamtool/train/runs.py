"""Run folders: where they go, which is the latest, and what they record."""
from __future__ import annotations

import csv
import datetime as _dt
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ModelError

RUNS = Path("runs")
METRIC_FIELDS = ["epoch", "train_loss", "val_loss", "val_auc", "val_acc", "lr", "img_per_s", "seconds"]


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


def write_metrics(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rewrite ``metrics.csv`` with ``rows`` (small: one row per epoch)."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in METRIC_FIELDS})
    os.replace(tmp, path)


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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
