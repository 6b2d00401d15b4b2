"""The whole job on built-in synthetic data: ``pcamtool demo [FOLDER]``.

generate -> pack -> train -> export -> infer (TTA) -> evaluate against the
synthetic answer key. Every step is the same library call the individual
commands make, so this doubles as an end-to-end check of a fresh install.

The defaults are sized by measurement to finish in about 3 minutes on a
2-core x86 CPU without bf16 (fp32 training: ``PCAMTOOL_AMP=0`` reproduces it
on a bf16 CPU), with a test AUC on the shifted synthetic centre above 0.95;
the time of each stage is logged at the end.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Optional

from .config import TrainConfig
from .constants import DEFAULT_TTA

log = logging.getLogger("pcamtool")

# Measured defaults (benchmarks/RESULTS.md, "Quickstart"): the compact residual
# model, which trains ~3.5x faster than plain4 on a CPU, and a short run in
# batches of 64 (twice the optimizer steps of 128 for the same compute: on
# 4,800 images x 5 epochs, shifted-centre test AUC 0.987 with 64, val AUC
# 0.940 vs 0.964 with 128).
DEMO_ARCH = "pcamnet"
DEMO_TRAIN, DEMO_TEST, DEMO_EPOCHS, DEMO_BATCH = 5000, 1000, 4, 64


@dataclass(frozen=True)
class DemoResult:
    folder: Path
    run_dir: Path
    val_auc: float
    test_auc: float
    submission: Path
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)   # stage name -> wall seconds, in order
    tta: int = DEFAULT_TTA                                          # transforms averaged on the test split


@contextmanager
def _stage(times: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t0


def format_stage_times(times: dict[str, float]) -> str:
    """A small table of the stages' wall times and their total (for stderr)."""
    total = sum(times.values())
    rows = [f"  {name:<10} {sec:7.1f} s  {100 * sec / total if total else 0:5.1f}%" for name, sec in times.items()]
    return "\n".join(["stage         time   share", *rows, f"  {'total':<10} {total:7.1f} s"])


def run_demo(folder: str | Path = "demo", n_train: Optional[int] = None, n_test: Optional[int] = None,
             seed: int = 0, tta: int = DEFAULT_TTA, train: Optional[TrainConfig] = None, epochs: Optional[int] = None,
             arch: Optional[str] = None, force: bool = False, progress: bool = True) -> DemoResult:
    """Run every stage on synthetic data in ``folder`` and return the AUCs and each stage's time.

    Unset sizes take :data:`DEMO_TRAIN` / :data:`DEMO_TEST`. ``train``
    defaults to :data:`DEMO_ARCH` for :data:`DEMO_EPOCHS` epochs in batches
    of :data:`DEMO_BATCH`; ``epochs`` and ``arch`` override it; its store,
    output folder and seed are always the demo's.
    """
    from .evaluate import evaluate_submission
    from .export import export_onnx
    from .infer import write_submission
    from .io.pack import pack
    from .synth import generate
    from .train import fit

    t0 = time.perf_counter()
    n_train = DEMO_TRAIN if n_train is None else n_train
    n_test = DEMO_TEST if n_test is None else n_test
    times: dict[str, float] = {}
    root = Path(folder)
    with _stage(times, "generate"):
        log.info("[1/6] generating %d train + %d test synthetic patches in %s", n_train, n_test, root)
        generate(root, n_train=n_train, n_test=n_test, seed=seed, force=force, progress=progress)
    with _stage(times, "pack"):
        log.info("[2/6] packing")
        pack(root / "train", force=True, progress=progress)
        pack(root / "test", force=True, progress=progress)
    cfg = train or TrainConfig(arch=DEMO_ARCH, epochs=DEMO_EPOCHS, batch_size=DEMO_BATCH)
    cfg = replace(cfg, store=str(root / "train.h5"), out=str(root / "run"), seed=seed,
                  epochs=epochs or cfg.epochs, arch=arch or cfg.arch)
    if (root / "run").exists():
        import shutil

        shutil.rmtree(root / "run")
    with _stage(times, "train"):
        log.info("[3/6] training %s", cfg.arch)
        res = fit(cfg, progress=progress)
    with _stage(times, "export"):
        log.info("[4/6] exporting")
        export_onnx(res.run_dir, res.run_dir / "model.onnx", force=True)
    sub = root / "submission.csv"
    with _stage(times, "infer"):
        log.info("[5/6] inferring the test split with TTA x%d", tta)
        write_submission(root / "test", [res.run_dir / "model.onnx"], sub, root / "sample_submission.csv",
                         tta=tta, force=True, progress=progress)
    with _stage(times, "evaluate"):
        log.info("[6/6] evaluating against the answer key")
        report = evaluate_submission(sub, root / "test_labels.csv", roc_png=root / "roc.png", force=True)
    log.info("demo stage times:\n%s", format_stage_times(times))
    return DemoResult(root, res.run_dir, res.best_auc, report.auc, sub, time.perf_counter() - t0, times, tta)
