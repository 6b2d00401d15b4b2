"""Can the probabilities be read as probabilities? Reliability diagram, expected calibration error, Brier score.

ROC AUC only judges the order of the scores; a model can rank perfectly and
still say 0.99 where one patch in two is tumour. Calibration compares each
probability with how often the label is 1 among rows given that
probability: rows are binned by predicted probability (10 equal-width bins
by default) and, per bin, the mean probability is set against the fraction
of positives.

* **ECE** (expected calibration error): the mean over bins of
  ``|fraction positive - mean probability|``, weighted by the bin's share of
  rows. 0 for a perfectly calibrated model; computed on the probability of
  class 1 (the binary reliability diagram), not on the top-label confidence.
* **Brier score**: the mean squared error ``(p - y)^2`` of the probabilities;
  0.25 for a constant 0.5, lower is better; it mixes calibration and
  discrimination.

Example::

    from pcamtool.calibration import calibration, plot_reliability
    cal = calibration(probs, labels)
    print(cal.ece, cal.brier)
    plot_reliability(cal, "reliability.png")
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import PcamError
from .io.fsutil import atomic_path

DEFAULT_BINS = 10


@dataclass(frozen=True)
class Calibration:
    """Per-bin reliability of probabilities of class 1 against 0/1 labels.

    ``edges`` has ``n_bins + 1`` entries; bin ``b`` holds the rows with
    ``edges[b] <= p < edges[b + 1]`` (the last bin includes 1.0). Empty bins
    have ``count`` 0 and NaN ``mean_prob`` / ``frac_pos``.
    """

    n: int
    ece: float                # expected calibration error
    mce: float                # maximum calibration error (over non-empty bins)
    brier: float              # mean (p - y)^2
    edges: list[float]
    count: list[int]
    mean_prob: list[float]
    frac_pos: list[float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN (empty bins) becomes None."""
        d = asdict(self)
        for k in ("mean_prob", "frac_pos"):
            d[k] = [None if not np.isfinite(v) else v for v in d[k]]
        return d


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared difference between the probabilities and the 0/1 labels."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.float64)
    return float(np.mean((p - y) ** 2)) if len(p) else float("nan")


def calibration(probs: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> Calibration:
    """Bin ``probs`` into ``n_bins`` equal-width bins and measure ECE, MCE and the Brier score.

    Raises
    ------
    PcamError
        Lengths differ, no rows, fewer than one bin, or a probability
        outside [0, 1] (the caller usually checked already).
    """
    p = np.asarray(probs, np.float64).ravel()
    y = (np.asarray(labels, np.float64).ravel() >= 0.5).astype(np.float64)
    if len(p) != len(y):
        raise PcamError(f"{len(p)} probabilities but {len(y)} labels")
    if len(p) == 0:
        raise PcamError("nothing to calibrate (no rows)")
    if n_bins < 1:
        raise PcamError(f"need at least one bin, got {n_bins}")
    if not (np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0):
        raise PcamError("probabilities must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # np.digitize against the inner edges: bin b is [edges[b], edges[b+1]), and p == 1.0 lands in the last
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    sum_p = np.bincount(which, weights=p, minlength=n_bins)
    sum_y = np.bincount(which, weights=y, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.where(count > 0, sum_p / count, np.nan)
        frac = np.where(count > 0, sum_y / count, np.nan)
    gap = np.abs(frac - mean_p)
    full = count > 0
    ece = float(np.sum(count[full] * gap[full]) / len(p))
    mce = float(gap[full].max())
    return Calibration(n=len(p), ece=ece, mce=mce, brier=brier_score(p, y), edges=edges.tolist(),
                       count=count.astype(int).tolist(), mean_prob=mean_p.tolist(), frac_pos=frac.tolist())


def plot_reliability(cal: Calibration, path: str | os.PathLike, force: bool = False,
                     title: Optional[str] = None) -> Path:
    """Draw the reliability diagram (fraction positive against mean probability, per bin) over a histogram.

    Written atomically; ``force=False`` refuses to replace ``path`` (ExistsError).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    edges = np.asarray(cal.edges)
    width = np.diff(edges)
    mean_p = np.asarray(cal.mean_prob)
    frac = np.asarray(cal.frac_pos)
    full = np.asarray(cal.count) > 0

    fig = Figure(figsize=(5, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(edges[:-1][full], frac[full], width=width[full], align="edge", color="C0", alpha=0.75,
           edgecolor="white", label="fraction positive")
    # the gap to the diagonal, drawn where the model's own average probability sits in each bin
    ax.bar(edges[:-1][full], (mean_p - frac)[full], bottom=frac[full], width=width[full], align="edge",
           color="C3", alpha=0.25, edgecolor="C3", hatch="//", label="gap to mean probability")
    ax.plot(mean_p[full], frac[full], "o-", color="k", ms=4, lw=1, label="per bin (mean probability)")
    ax.plot([0, 1], [0, 1], color="0.5", ls="--", lw=1, label="perfectly calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction labelled tumour")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"Reliability, {cal.n} rows: ECE {cal.ece:.4f}, Brier {cal.brier:.4f}", fontsize=10)
    hist.bar(edges[:-1], cal.count, width=width, align="edge", color="0.6", edgecolor="white")
    hist.set_xlabel("predicted probability of tumour")
    hist.set_ylabel("rows")
    hist.set_xlim(0, 1)
    hist.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png")  # the temporary's suffix is not .png: say it
    return Path(path)
