"""Score probabilities against labels: ROC AUC (Kaggle's metric), loss, accuracy, the ROC curve.

:func:`binary_metrics` is the one place loss, AUC and accuracy are computed:
training validates every epoch through it, and :func:`evaluate_arrays` /
:func:`evaluate_submission` build their report on it. Beside the AUC the
report gives the accuracy, balanced accuracy (as PCam papers report it) and
confusion matrix at the 0.5 threshold, the accuracy at the threshold that
maximizes Youden's J (TPR - FPR), and can draw the ROC curve.

Example::

    from pcamtool.evaluate import evaluate_submission
    report = evaluate_submission("submission.csv", "data/test_labels.csv", roc_png="roc.png", force=True)
    print(report.format())

A prediction counts as positive when its probability is ``>= threshold``
(scikit-learn's convention, so the thresholds of the ROC curve apply as is).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .io.csvio import read_id_table
from .errors import PcamError, few
from .io.fsutil import atomic_path, check_writable

DEFAULT_THRESHOLD = 0.5
# Probabilities are clipped this far from 0 and 1 before the log loss, so one
# confident mistake costs at most -log(1e-7) = 16.1 instead of infinity.
PROB_EPS = 1e-7


def binary_metrics(probs: np.ndarray, labels: np.ndarray,
                   threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """Mean binary cross-entropy, ROC AUC and accuracy of probabilities against 0/1 labels.

    Unchecked and cheap (a sort for the AUC): the caller vouches for its
    inputs, as training does for its own predictions; user files go through
    :func:`evaluate_arrays`, which validates first.

    Parameters
    ----------
    probs
        Probability of class 1 per row.
    labels
        True class per row, 0 or 1 (any numeric dtype; ``>= 0.5`` counts as 1).
    threshold
        A row is predicted positive when its probability is ``>= threshold``.

    Returns
    -------
    dict
        ``{"loss": ..., "auc": ..., "acc": ...}``: the loss with probabilities
        clipped to ``[PROB_EPS, 1 - PROB_EPS]``; the AUC is NaN when only one
        class is present.
    """
    from sklearn.metrics import roc_auc_score

    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.float64) >= 0.5
    pc = np.clip(p, PROB_EPS, 1 - PROB_EPS)
    loss = float(-np.mean(np.where(y, np.log(pc), np.log(1 - pc)))) if len(p) else np.nan
    two_classes = 0 < int(y.sum()) < len(y)
    auc = float(roc_auc_score(y, p)) if two_classes else np.nan
    acc = float(np.mean((p >= threshold) == y)) if len(p) else np.nan
    return {"loss": loss, "auc": auc, "acc": acc}


@dataclass(frozen=True)
class EvalReport:
    """The scores of one set of probabilities against 0/1 labels.

    Confusion matrices are ``[[TN, FP], [FN, TP]]`` (rows: true class 0, 1;
    columns: predicted class 0, 1), as ``sklearn.metrics.confusion_matrix``.
    """

    n: int                          # scored rows
    n_positive: int                 # rows labelled 1
    auc: float                      # ROC AUC
    loss: float                     # mean binary cross-entropy (log loss)
    accuracy: float                 # at ``threshold``
    threshold: float                # 0.5 unless asked otherwise
    confusion: list[list[int]]      # at ``threshold``
    best_threshold: float           # maximizes Youden's J = TPR - FPR
    best_accuracy: float            # at ``best_threshold``
    best_confusion: list[list[int]]
    youden_j: float                 # TPR - FPR at ``best_threshold``
    roc_png: Optional[str] = None   # the ROC plot written, if any
    ece: float = float("nan")       # expected calibration error, 10 equal-width bins (pcamtool.calibration)
    brier: float = float("nan")     # mean (p - y)^2
    reliability_png: Optional[str] = None   # the reliability diagram written, if any
    balanced_accuracy: float = float("nan")  # mean of TPR and TNR at ``threshold`` (PCam papers report it)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (fresh lists: changing it leaves the report alone)."""
        return asdict(self)

    def format(self) -> str:
        """A few lines for a terminal."""
        def cm(m: list[list[int]]) -> str:
            (tn, fp), (fn, tp) = m
            return f"TN {tn}  FP {fp}  FN {fn}  TP {tp}"

        share = self.n_positive / self.n if self.n else 0.0
        lines = [
            f"{'rows':<12}{self.n} ({self.n_positive} positive, {share:.1%})",
            f"{'ROC AUC':<12}{self.auc:.4f}",
            f"{'log loss':<12}{self.loss:.4f}",
            f"{f'at {self.threshold:g}':<12}accuracy {self.accuracy:.4f}  balanced {self.balanced_accuracy:.4f}  "
            f"{cm(self.confusion)}",
            f"{f'at {self.best_threshold:.4f}':<12}accuracy {self.best_accuracy:.4f}  "
            f"{cm(self.best_confusion)}  (Youden threshold: J {self.youden_j:.4f})",
            f"{'calibration':<12}ECE {self.ece:.4f}  Brier {self.brier:.4f}",
        ]
        if self.roc_png:
            lines.append(f"{'ROC curve':<12}{self.roc_png}")
        if self.reliability_png:
            lines.append(f"{'reliability':<12}{self.reliability_png}")
        return "\n".join(lines)


def _confusion(labels: np.ndarray, pred: np.ndarray) -> list[list[int]]:
    tp = int(np.sum(pred & labels))
    fp = int(np.sum(pred & ~labels))
    fn = int(np.sum(~pred & labels))
    tn = int(len(labels) - tp - fp - fn)
    return [[tn, fp], [fn, tp]]


def _balanced_accuracy(confusion: list[list[int]]) -> float:
    """Mean of the true positive and true negative rates: accuracy as if the classes were balanced."""
    (tn, fp), (fn, tp) = confusion
    return 0.5 * (tp / (tp + fn) + tn / (tn + fp))


def _check_inputs(probs: np.ndarray, labels: np.ndarray, ids: Optional[Sequence[str]],
                  probs_source: str, labels_source: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 probabilities and bool labels; errors name the source and a few rows."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels)
    if p.ndim != 1 or y.ndim != 1:
        raise PcamError(f"probabilities and labels must be 1-D, got shapes {p.shape} and {y.shape}")
    if len(p) != len(y):
        raise PcamError(f"{len(p)} probabilities ({probs_source}) but {len(y)} labels ({labels_source})")
    if ids is not None and len(ids) != len(p):
        raise PcamError(f"{len(ids)} ids for {len(p)} probabilities")
    if len(p) == 0:
        raise PcamError(f"{labels_source}: nothing to score (no rows)")

    def name(rows: np.ndarray) -> str:
        return few([ids[i] for i in rows] if ids is not None else [f"row {i}" for i in rows])

    bad = np.flatnonzero(~np.isfinite(p) | (p < 0.0) | (p > 1.0))
    if bad.size:
        raise PcamError(f"{probs_source}: {bad.size} probabilit{'y is' if bad.size == 1 else 'ies are'} "
                        f"outside [0, 1] or not finite: {name(bad)} "
                        f"(e.g. {float(p[bad[0]])!r}; a submission holds probabilities, not logits)")
    bad = np.flatnonzero((y != 0) & (y != 1))
    if bad.size:
        raise PcamError(f"{labels_source}: {bad.size} label(s) are not 0 or 1: {name(bad)}")
    y = y.astype(bool)
    n_pos = int(y.sum())
    if n_pos in (0, len(y)):
        raise PcamError(f"{labels_source}: every one of the {len(y)} labels is {int(y[0])}; "
                        f"ROC AUC is undefined with a single class")
    return p, y


def evaluate_arrays(probs: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                    roc_png: Optional[str | os.PathLike] = None, *,
                    threshold: float = DEFAULT_THRESHOLD,
                    ids: Optional[Sequence[str]] = None,
                    probs_source: str = "probabilities", labels_source: str = "labels",
                    force: bool = False, reliability_png: Optional[str | os.PathLike] = None) -> EvalReport:
    """Score probabilities against 0/1 labels of the same rows.

    Parameters
    ----------
    probs
        Probability of class 1 per row, each in [0, 1].
    labels
        True class per row, 0 or 1; both classes must occur.
    roc_png
        Where to draw the ROC curve (PNG, written atomically); None: no plot.
    threshold
        The fixed threshold reported beside the Youden one (a row is predicted
        positive when its probability is ``>= threshold``).
    ids
        Row ids, so that error messages name the offending rows.
    probs_source, labels_source
        What the inputs are called in error messages (file names, usually).
    force
        Replace an existing ``roc_png``; without it an existing one is refused
        (ExistsError) before anything is computed.
    reliability_png
        Where to draw the reliability diagram (:mod:`pcamtool.calibration`);
        None: no plot. ECE and Brier score are always in the report.

    Returns
    -------
    EvalReport

    Raises
    ------
    PcamError
        Lengths differ, a probability outside [0, 1] or not finite, a label
        other than 0/1, or a single class (AUC undefined).
    ExistsError
        ``roc_png`` exists and ``force`` is not set.
    """
    from sklearn.metrics import roc_curve

    from .calibration import calibration, plot_reliability

    for out in (roc_png, reliability_png):
        if out is not None:
            check_writable(out, force)
    p, y = _check_inputs(probs, labels, ids, probs_source, labels_source)
    cal = calibration(p, y)
    scores = binary_metrics(p, y, threshold)
    # Every distinct score is a candidate threshold (no dropped points), so
    # ties in J resolve the same way whatever sklearn's pruning does: the
    # first, i.e. the highest threshold, wins. Rounded, so that equal J computed
    # from different fractions (1 - 1/3 against 2/3 - 0) tie instead of one
    # winning by its last bit; distinct J differ by at least 1 / (positives * negatives), >> 1e-12.
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # the first threshold (inf) predicts nothing positive
    j = np.where(finite, np.round(tpr - fpr, 12), -np.inf)
    k = int(np.argmax(j))
    best = float(thresholds[k])
    at_fixed = p >= threshold
    at_best = p >= best
    report = EvalReport(
        n=len(y), n_positive=int(y.sum()), auc=scores["auc"], loss=scores["loss"],
        accuracy=scores["acc"], threshold=float(threshold),
        confusion=_confusion(y, at_fixed),
        best_threshold=best, best_accuracy=float(np.mean(at_best == y)),
        best_confusion=_confusion(y, at_best), youden_j=float(j[k]),
        roc_png=str(roc_png) if roc_png is not None else None,
        balanced_accuracy=_balanced_accuracy(_confusion(y, at_fixed)),
        ece=cal.ece, brier=cal.brier,
        reliability_png=str(reliability_png) if reliability_png is not None else None,
    )
    if roc_png is not None:
        plot_roc(fpr, tpr, report, roc_png, force=force)
    if reliability_png is not None:
        plot_reliability(cal, reliability_png, force=force)
    return report


def _rates(report: EvalReport, confusion: list[list[int]]) -> tuple[float, float]:
    """(FPR, TPR) of a confusion matrix: where that threshold sits on the curve."""
    (_, fp), (_, tp) = confusion
    return fp / (report.n - report.n_positive), tp / report.n_positive


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, report: EvalReport,
             path: str | os.PathLike, force: bool = False) -> Path:
    """Draw the ROC curve with the AUC, the chance diagonal and both operating points.

    Written atomically; ``force=False`` refuses to replace ``path`` (ExistsError).
    """
    # The object API with the Agg canvas: no pyplot global state, no display
    # needed, safe beside other threads that plot.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="C0", lw=2, label=f"ROC (AUC = {report.auc:.4f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="chance")
    ax.plot(*_rates(report, report.best_confusion), "o", color="C3", ms=8,
            label=f"Youden threshold {report.best_threshold:.3f} (acc {report.best_accuracy:.3f})")
    ax.plot(*_rates(report, report.confusion), "s", color="C2", ms=6,
            label=f"threshold {report.threshold:g} (acc {report.accuracy:.3f})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC curve, {report.n} rows ({report.n_positive} positive)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, force=force) as tmp:
        # The temporary name ends in .partial: say the format outright.
        fig.savefig(tmp, format="png")
    return Path(path)


def _answer_key(path: str | os.PathLike) -> dict[str, float]:
    """``{id: label}`` from an ``id,label`` CSV, or from a labelled store (e.g. PCam's test split, packed)."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as fh:
            is_hdf5 = fh.read(8) == b"\x89HDF\r\n\x1a\n"
        if is_hdf5:
            from .io.store import open_store

            store = open_store(path, need_labels=True)
            return dict(zip(store.ids.tolist(), store.labels.tolist()))
    return read_id_table(path)


def evaluate_submission(submission_csv: str | os.PathLike, labels_csv: str | os.PathLike,
                        roc_png: Optional[str | os.PathLike] = None, *,
                        threshold: float = DEFAULT_THRESHOLD, force: bool = False,
                        reliability_png: Optional[str | os.PathLike] = None) -> EvalReport:
    """Score a Kaggle submission (``id,label`` probabilities) against an ``id,label`` answer key.

    Parameters
    ----------
    submission_csv
        The submission: one probability of class 1 per id.
    labels_csv
        The answer key: one 0/1 label per id, an ``id,label`` CSV or a
        labelled store (PCam's test split packed: ids ``pcam-test-<row>``).
    roc_png
        Where to draw the ROC curve; None: no plot.
    threshold, force
        As in :func:`evaluate_arrays`: an existing ``roc_png`` is refused
        (ExistsError) unless ``force``, before either file is read.

    Raises
    ------
    PcamError
        Either file is missing or malformed (LabelsError naming the line), the
        ids of the two files differ (the message names both files and a few
        ids), or the values are out of range (see :func:`evaluate_arrays`).
    ExistsError
        ``roc_png`` exists and ``force`` is not set.
    """
    for out in (roc_png, reliability_png):
        if out is not None:
            check_writable(out, force)
    submission = read_id_table(submission_csv, as_float=True, kind="submission")
    truth = _answer_key(labels_csv)
    missing = [k for k in truth if k not in submission]
    extra = [k for k in submission if k not in truth]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} id(s) of {labels_csv} are missing from {submission_csv}: "
                         f"{few(missing)}")
        if extra:
            parts.append(f"{len(extra)} id(s) of {submission_csv} are not in {labels_csv}: {few(extra)}")
        raise PcamError("; ".join(parts))
    ids = list(truth)
    probs = np.fromiter((submission[k] for k in ids), np.float64, len(ids))
    labels = np.fromiter((truth[k] for k in ids), np.int8, len(ids))
    return evaluate_arrays(probs, labels, roc_png, threshold=threshold, ids=ids,
                           probs_source=str(submission_csv), labels_source=str(labels_csv),
                           force=force, reliability_png=reliability_png)
