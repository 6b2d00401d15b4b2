"""K-fold cross-validation: train every fold, predict its held-out rows, export it; ``pcamtool cv``.

:func:`run_cv` calls :func:`pcamtool.train.fit` once per fold (``folds=K,
fold=i``: stratified, slide-disjoint with ``groups``) into ``CV_DIR/fold<i>``,
predicts each fold's validation rows with its ``best.pt`` and exports it to
``fold<i>/model.onnx``. The out-of-fold AUC, over every row of the store
predicted by the one model that never saw it, is the honest estimate of how
an ensemble of the folds does on new data. It writes::

    CV_DIR/cv_config.json     the training config shared by the folds (resume checks it)
    CV_DIR/fold<i>/           a run folder (config.json, metrics.csv, best.pt, last.pt, model.onnx)
                   val_predictions.csv   id,label,prob of the fold's validation rows
                   cv_fold.json          the marker: "trained", then "done"
    CV_DIR/oof.csv            id,label,fold,prob of every row
    CV_DIR/cv.json, cv.csv    each fold's AUC and the out-of-fold AUC

Resumable: run the same command again (or ``pcamtool cv --resume CV_DIR``)
and finished folds are skipped, a fold killed while training continues from
its ``last.pt``, a trained fold not yet exported or predicted is finished,
a finished fold whose ``model.onnx`` is gone is exported again (and a
damaged ``val_predictions.csv`` predicted again from its ``best.pt``), and a
fold that never finished an epoch starts again.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..config import TrainConfig
from ..errors import PcamError
from ..io.fsutil import atomic_path
from ..io.store import Store, open_store
from ..jsonutil import jsonable
from .checkpoint import Checkpoint, split_rows
from .resume import MACHINE, check_changes, given_options
from .runs import RUNS, new_run_dir, run_lock

log = logging.getLogger("pcamtool")

DEFAULT_FOLDS = 5
CV_CONFIG = "cv_config.json"
MARKER = "cv_fold.json"
PREDICTIONS = "val_predictions.csv"
FORMAT = "pcamtool-cv"
PREDICT_BATCH = 256
# Options every fold sets for itself (out, fold, export), and where and how fast it runs: not part of
# what makes two cv runs the same run.
_PER_RUN = MACHINE + ("export", "out", "fold")


@dataclass(frozen=True)
class FoldResult:
    """One fold: where it went, its best training-time AUC and its ``best.pt``'s AUC on its held-out rows."""

    fold: int
    run_dir: Path
    best_auc: float        # the best epoch's validation AUC as training measured it
    best_epoch: int
    val_auc: float         # best.pt re-predicted in fp32 on the fold's validation rows
    val_rows: int
    onnx: Optional[Path]


@dataclass(frozen=True)
class CvResult:
    cv_dir: Path
    folds: list[FoldResult]
    oof_auc: float         # AUC of every row's out-of-fold prediction
    mean_auc: float        # mean and std of the folds' val_auc
    std_auc: float
    seconds: float


def _cv_dir_name(arch: str) -> str:
    # "timm:resnet34" makes a folder name Windows refuses
    return "cv-" + arch.replace(":", "-").replace("/", "-")


def _comparable(cfg: TrainConfig) -> dict[str, Any]:
    d = jsonable(cfg.to_dict())
    for key in _PER_RUN:
        d.pop(key, None)
    return d


def open_cv_dir(cfg: TrainConfig, folds: int, out: Optional[Path], resume: bool,
                overrides: Optional[dict[str, Any]] = None) -> tuple[TrainConfig, int, Path]:
    """The config, fold count and folder of a new or continued cv run (``cv_config.json`` written or checked).

    With ``resume`` the saved config is the run's; the options given
    (``overrides``, else what ``cfg`` sets differently) may change only
    where and how fast it runs (:data:`pcamtool.train.resume.MACHINE`, the
    policy of :func:`pcamtool.train.resume.check_changes`).

    Raises
    ------
    PcamError
        ``resume`` of a folder that is not a cv run, or with an option that
        may not change; an existing cv folder started with other options
        (the first differing one named); a non-empty folder that is not a cv run.
    """
    from ..config import flag

    cv_dir = out if out is not None else Path(cfg.out) if cfg.out else new_run_dir(_cv_dir_name(cfg.arch), RUNS)
    path = cv_dir / CV_CONFIG
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            saved_cfg = TrainConfig.from_dict(saved["config"], source=path)
            saved_folds = int(saved["folds"])
        except (ValueError, KeyError, TypeError) as exc:
            raise PcamError(f"{path}: not a pcamtool cv config ({type(exc).__name__})") from None
        if resume:
            given = overrides if overrides is not None else given_options(cfg, saved_cfg)
            given = {k: v for k, v in given.items() if k not in ("out", "export")}   # cv sets these per fold
            changed = check_changes(saved_cfg, given, cv_dir, allowed=MACHINE, what=f"--resume {cv_dir}")
            return replace(saved_cfg, **changed), saved_folds, cv_dir
        mine, theirs = _comparable(cfg), _comparable(saved_cfg)
        diff = [k for k in theirs if mine.get(k) != theirs.get(k)]
        if saved_folds != folds:
            diff.insert(0, "folds")
        if diff:
            k = diff[0]
            raise PcamError(f"{cv_dir}: holds a cv run with other options ({flag(k)} "
                            f"{saved_folds if k == 'folds' else theirs.get(k)!r}, now "
                            f"{folds if k == 'folds' else mine.get(k)!r}); continue it with "
                            f"'pcamtool cv --resume {cv_dir}' or choose another -o")
        return cfg, folds, cv_dir
    if resume:
        raise PcamError(f"{cv_dir}: not a cv run to resume (no {CV_CONFIG})")
    if cv_dir.exists() and (not cv_dir.is_dir() or any(cv_dir.iterdir())):
        raise PcamError(f"{cv_dir}: exists and is not a cv run folder (choose another -o)")
    cv_dir.mkdir(parents=True, exist_ok=True)
    record = {"format": FORMAT, "folds": folds, "config": jsonable(replace(cfg, out=None).to_dict())}
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return cfg, folds, cv_dir


def fold_rows(cfg: TrainConfig, store: Store, folds: int, fold: int) -> np.ndarray:
    """The store rows fold ``fold`` validates on: the split :func:`~pcamtool.train.fit` makes (:func:`split_rows`)."""
    return split_rows(replace(cfg, folds=folds, fold=fold, val_store=None), store)[1]


def predict_rows(checkpoint: Path | Checkpoint, store: Store, rows: np.ndarray, device: torch.device,
                 batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Probabilities of ``store`` rows ``rows`` (any order, repeats allowed) from a checkpoint, fp32, no TTA.

    ``out[j]`` is the probability of row ``rows[j]``. Each batch is read in
    ascending row order (the store reads fastest that way) and its results
    are put back in the order asked for.
    """
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.load(checkpoint)
    net = ck.build_model().to(device)
    rows = np.asarray(rows, np.int64)
    out = np.empty(len(rows), np.float64)
    with torch.no_grad():
        for s in range(0, len(rows), batch_size):
            part = rows[s:s + batch_size]
            order = np.argsort(part, kind="stable")
            images = torch.from_numpy(store.gather(part[order])).to(device)
            probs = torch.sigmoid(net(images).float()).cpu().numpy()
            out[s + order] = probs   # the j-th sorted row is part[order[j]]: its result goes back there
    return out


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with atomic_path(path, force=True) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


def _read_marker(fold_dir: Path) -> dict[str, Any]:
    try:
        marker = json.loads((fold_dir / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    # a marker is believed only while the checkpoint it vouches for is there
    return marker if isinstance(marker, dict) and (fold_dir / "best.pt").is_file() else {}


def _read_predictions(path: Path) -> Optional[np.ndarray]:
    """A finished fold's validation probabilities; None when the file is gone or damaged (then re-predicted)."""
    try:
        with open(path, newline="") as f:
            probs = np.array([float(r["prob"]) for r in csv.DictReader(f)], np.float64)
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as exc:
        log.warning("%s: unreadable (%s): predicting the fold's validation rows again from its best.pt",
                    path, type(exc).__name__)
        return None
    if not (np.isfinite(probs).all() and ((probs >= 0) & (probs <= 1)).all()):
        log.warning("%s: holds values that are not probabilities: predicting the fold's validation rows "
                    "again from its best.pt", path)
        return None
    return probs


def _train_fold(cfg: TrainConfig, fold_dir: Path, progress: bool) -> dict[str, Any]:
    from .loop import fit

    resume = fold_dir if (fold_dir / "last.pt").is_file() else None
    if resume is not None:
        log.info("%s: continuing from its last.pt", fold_dir)
    res = fit(cfg, resume=resume, progress=progress)
    marker = {"stage": "trained", "best_auc": res.best_auc, "best_epoch": res.best_epoch}
    _write_json(fold_dir / MARKER, marker)
    return marker


def _export(fold_dir: Path, store_path: str) -> Path:
    from ..export import export_onnx

    return export_onnx(fold_dir / "best.pt", fold_dir / "model.onnx", store_path=store_path, force=True).path


def run_cv(cfg: TrainConfig, folds: Optional[int] = None, out: Optional[str | Path] = None, resume: bool = False,
           export: bool = True, progress: bool = True, overrides: Optional[dict[str, Any]] = None) -> CvResult:
    """Train, predict and export every fold of a K-fold split of ``cfg.store``; write cv.json and cv.csv.

    Parameters
    ----------
    cfg
        The training config every fold uses; its ``folds`` (default
        :data:`DEFAULT_FOLDS`), ``groups`` and ``seed`` make the split (each
        fold validates on 1/K, so ``val_frac`` plays no part: given in
        ``overrides`` it is refused), its ``fold``, ``out`` and ``export``
        are replaced per fold.
    folds
        Number of folds (overrides ``cfg.folds``).
    out
        The cv folder (default ``cfg.out``, else ``runs/<time>-cv-<arch>``).
        A folder holding a cv run with the same options is continued.
    resume
        Continue the cv run in ``out`` with its own saved options; only
        device, threads, cache and compile may change (given in ``overrides``,
        or set differently in ``cfg``); any other change is refused.
    overrides
        With ``resume``: the options the user gave
        (:meth:`TrainConfig.from_options`); None compares ``cfg`` instead.
    export
        Export each fold's ``best.pt`` to ``fold<i>/model.onnx`` (with the
        parity check of :func:`pcamtool.export.export_onnx`).

    Raises
    ------
    PcamError
        ``cfg.val_store`` (cv splits the store itself), a bad store or
        options, a mismatched cv folder, anything :func:`fit` raises.
    BusyError
        Another ``pcamtool cv`` is running into the same folder.
    """
    t0 = time.perf_counter()
    if cfg.val_store:
        raise PcamError("--val-store replaces the split, but cv validates on folds of the store: drop --val-store")
    k = folds if folds is not None else cfg.folds if cfg.folds is not None else DEFAULT_FOLDS
    if "val_frac" in (overrides or {}):   # it sizes a single hold-out; cv's folds are 1/K each
        raise PcamError(f"--val-frac {overrides['val_frac']}: cv validates each fold on 1/K of the store "
                        f"(K = --folds, default {DEFAULT_FOLDS}): drop --val-frac, or choose --folds")
    if cfg.fold != 0 or "fold" in (overrides or {}):
        raise PcamError(f"--fold {cfg.fold}: cv trains every fold (drop --fold; 'pcamtool train --folds K "
                        f"--fold I' trains one)")
    if not resume:   # an impossible split (more folds than images of a class) is refused before the folder is made
        fold_rows(cfg, open_store(cfg.store, need_labels=True), k, 0)
    target = Path(out) if out is not None else Path(cfg.out) if cfg.out else new_run_dir(_cv_dir_name(cfg.arch), RUNS)
    with run_lock(target, create=not resume):   # a second cv into the same folder is refused while this one runs
        cfg, k, cv_dir = open_cv_dir(cfg, k, target, resume, overrides)
        return _run_folds(cfg, k, cv_dir, export, progress, t0)


def _run_folds(cfg: TrainConfig, k: int, cv_dir: Path, export: bool, progress: bool, t0: float) -> CvResult:
    """Train, predict and export each fold not done yet; write the reports (:func:`run_cv`, holding the lock)."""
    from ..device import resolve_device
    from ..evaluate import binary_metrics

    store = open_store(cfg.store, need_labels=True)
    device = resolve_device(cfg.device)
    results: list[FoldResult] = []
    oof = np.full(len(store), np.nan)
    oof_fold = np.full(len(store), -1, np.int64)
    for i in range(k):
        fold_dir = cv_dir / f"fold{i}"
        rows = fold_rows(cfg, store, k, i)
        marker = _read_marker(fold_dir)
        probs: Optional[np.ndarray] = None
        onnx = fold_dir / "model.onnx"
        if marker.get("stage") == "done":
            probs = _read_predictions(fold_dir / PREDICTIONS)
            # a finished fold whose model.onnx was deleted since (or that ran with --no-export) is exported now,
            # so the folder stays what 'infer --model CV_DIR' expects: every fold's model
            missing_export = export and not onnx.is_file()
            if probs is not None and not missing_export:
                log.info("fold %d/%d: done already (%s)", i + 1, k, fold_dir)
            else:
                log.info("fold %d/%d: finishing (%s)", i + 1, k,
                         "its predictions" if probs is None else f"{onnx} is missing: exporting it again")
        else:
            log.info("fold %d/%d: %d validation rows -> %s", i + 1, k, len(rows), fold_dir)
            if marker.get("stage") != "trained":
                marker = _train_fold(replace(cfg, folds=k, fold=i, out=str(fold_dir), export=False), fold_dir,
                                     progress)
        if probs is None or marker.get("stage") != "done" or (export and not onnx.is_file()):
            if probs is None:
                probs = predict_rows(fold_dir / "best.pt", store, rows, device)
                _write_csv(fold_dir / PREDICTIONS, ["id", "label", "prob"],
                           [[store.ids[r], int(store.labels[r]), f"{p:.6f}"] for r, p in zip(rows, probs)])
            if export and (marker.get("stage") != "done" or not onnx.is_file()):
                _export(fold_dir, cfg.store)
            marker = {**marker, "stage": "done", "exported": bool(export) or bool(marker.get("exported"))}
            _write_json(fold_dir / MARKER, marker)
        if len(probs) != len(rows):
            raise PcamError(f"{fold_dir / PREDICTIONS}: {len(probs)} rows, fold {i} validates {len(rows)} "
                            f"(the store changed? start a new cv run)")
        oof[rows], oof_fold[rows] = probs, i
        results.append(FoldResult(i, fold_dir, float(marker["best_auc"]), int(marker["best_epoch"]),
                                  binary_metrics(probs, store.labels[rows])["auc"], len(rows),
                                  onnx if onnx.is_file() else None))
    done = oof_fold >= 0
    m = binary_metrics(oof[done], store.labels[done])
    aucs = np.array([r.val_auc for r in results])
    res = CvResult(cv_dir, results, m["auc"], float(aucs.mean()), float(aucs.std()), time.perf_counter() - t0)
    _write_reports(res, cfg, k, m, store, oof, oof_fold)
    return res


def _write_reports(res: CvResult, cfg: TrainConfig, k: int, m: dict[str, float], store: Store,
                   oof: np.ndarray, oof_fold: np.ndarray) -> None:
    done = np.flatnonzero(oof_fold >= 0)
    _write_csv(res.cv_dir / "oof.csv", ["id", "label", "fold", "prob"],
               [[store.ids[r], int(store.labels[r]), int(oof_fold[r]), f"{oof[r]:.6f}"] for r in done])
    header = ["fold", "best_auc", "best_epoch", "val_auc", "val_rows", "run_dir", "onnx"]
    rows: list[list[Any]] = [[f.fold, f"{f.best_auc:.6f}", f.best_epoch, f"{f.val_auc:.6f}", f.val_rows,
                              str(f.run_dir), str(f.onnx or "")] for f in res.folds]
    rows.append(["oof", "", "", f"{res.oof_auc:.6f}", len(done), str(res.cv_dir), ""])
    _write_csv(res.cv_dir / "cv.csv", header, rows)
    _write_json(res.cv_dir / "cv.json", {
        "format": FORMAT, "folds": k, "arch": cfg.arch, "store": str(Path(cfg.store).resolve()),
        "oof_auc": _num(res.oof_auc), "oof_loss": _num(m["loss"]), "oof_acc": _num(m["acc"]),
        "oof_rows": int(len(done)), "mean_fold_auc": _num(res.mean_auc), "std_fold_auc": _num(res.std_auc),
        "fold_results": [{"fold": f.fold, "best_auc": _num(f.best_auc), "best_epoch": f.best_epoch,
                          "val_auc": _num(f.val_auc), "val_rows": f.val_rows, "run_dir": str(f.run_dir),
                          "onnx": str(f.onnx) if f.onnx else None} for f in res.folds],
        "seconds": round(res.seconds, 1),
        "config": jsonable(cfg.to_dict()),
    })


def _num(v: float) -> Optional[float]:
    return float(v) if math.isfinite(v) else None  # JSON has no NaN
