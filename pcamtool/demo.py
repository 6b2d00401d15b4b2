"""The whole job on built-in synthetic data: ``pcamtool demo [FOLDER]``.

generate -> pack -> train -> export -> infer (TTA) -> evaluate against the
synthetic answer key. Every step is the same library call the individual
commands make, so this doubles as an end-to-end check of a fresh install.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from .config import TrainConfig

log = logging.getLogger("pcamtool")


@dataclass(frozen=True)
class DemoResult:
    folder: Path
    run_dir: Path
    val_auc: float
    test_auc: float
    submission: Path
    seconds: float


def run_demo(folder: str | Path = "demo", n_train: int = 10000, n_test: int = 2000, seed: int = 0,
             tta: int = 8, train: Optional[TrainConfig] = None, force: bool = False,
             progress: bool = True) -> DemoResult:
    """Run every stage on synthetic data in ``folder`` and return the AUCs."""
    from .evaluate import evaluate_submission
    from .export import export_onnx
    from .infer import predict
    from .io.pack import pack
    from .submission import order_like_sample
    from .synth import generate
    from .train.loop import fit
    from .io.csvio import write_rows

    t0 = time.perf_counter()
    root = Path(folder)
    log.info("[1/6] generating %d train + %d test synthetic patches in %s", n_train, n_test, root)
    generate(root, n_train=n_train, n_test=n_test, seed=seed, force=force, progress=progress)
    log.info("[2/6] packing")
    pack(root / "train", force=True, progress=progress)
    pack(root / "test", force=True, progress=progress)
    cfg = train or TrainConfig()
    cfg = replace(cfg, store=str(root / "train.h5"), out=str(root / "run"), seed=seed)
    if (root / "run").exists():
        import shutil

        shutil.rmtree(root / "run")
    log.info("[3/6] training %s", cfg.arch)
    res = fit(cfg, progress=progress)
    log.info("[4/6] exporting")
    export_onnx(res.run_dir, res.run_dir / "model.onnx", force=True)
    log.info("[5/6] inferring the test split with TTA x%d", tta)
    pred = predict(root / "test", [res.run_dir / "model.onnx"], tta=tta, progress=progress)
    ids, probs = order_like_sample(pred.ids, pred.probs, root / "sample_submission.csv")
    sub = write_rows(root / "submission.csv", ids, probs)
    log.info("[6/6] evaluating against the answer key")
    report = evaluate_submission(sub, root / "test_labels.csv", roc_png=root / "roc.png")
    return DemoResult(root, res.run_dir, res.best_auc, report.auc, sub, time.perf_counter() - t0)
