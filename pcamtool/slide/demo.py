"""The whole-slide path on synthetic slides: ``make demo-slides`` (``python -m pcamtool.slide.demo FOLDER``).

Trains the demo's model on synthetic patches (or takes ``--model``), paints
three synthetic slides (40x with a tumour top-left, 20x with two tumours, 40x
without tumour), runs ``pcamtool slide`` over them and prints ``slides.csv``
and, per slide, the tile-level ROC AUC against the painted mask.

Example::

    python -m pcamtool.slide.demo demo-slides --model demo/run/model.onnx
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger("pcamtool")

SLIDES = (  # name, mpp, tumours (cx, cy, r in fractions)
    ("tumour_top_left_40x", 0.243, ((0.28, 0.3, 0.12),)),
    ("two_tumours_20x", 0.486, ((0.3, 0.65, 0.08), (0.72, 0.4, 0.1))),
    ("negative_40x", 0.243, ()),
)


def train_demo_model(folder: Path, n_train: Optional[int] = None, epochs: Optional[int] = None, seed: int = 0,
                     progress: bool = True) -> Path:
    """The demo's model (:mod:`pcamtool.demo`'s architecture, size and epochs), exported for the CPU.

    The int8 export is the fast one on a CPU; when it is refused (its AUC
    not within 0.002 of fp32's), the fp32 graph is used instead.
    """
    from ..config import TrainConfig
    from ..demo import DEMO_ARCH, DEMO_BATCH, DEMO_EPOCHS, DEMO_TRAIN
    from ..errors import PcamError
    from ..export import export_onnx
    from ..io.pack import pack
    from ..synth import generate
    from ..train import fit

    folder = Path(folder)
    generate(folder / "data", n_train=n_train or DEMO_TRAIN, n_test=0, seed=seed, force=True, progress=progress)
    store = pack(folder / "data" / "train", force=True, progress=progress).path
    cfg = TrainConfig(arch=DEMO_ARCH, epochs=epochs or DEMO_EPOCHS, batch_size=DEMO_BATCH, store=str(store),
                      out=str(folder / "run"), seed=seed)
    run = fit(cfg, progress=progress).run_dir
    try:
        return export_onnx(run, run / "model-int8.onnx", int8=True, force=True).path
    except PcamError as exc:
        log.info("int8 export refused (%s); using fp32", exc)
        return export_onnx(run, run / "model.onnx", force=True).path


def tile_auc(slide: Path, tiles_csv: Path) -> Optional[float]:
    """ROC AUC of the tiles' probabilities against the painted tumour mask (None: one class only)."""
    import csv
    import json

    from sklearn.metrics import roc_auc_score

    from ..synth.slide import TUMOUR, label_at, read_answer_key
    from .reader import MODEL_MPP, TILE

    cells, cell_px = read_answer_key(slide)
    f0 = MODEL_MPP / json.loads(slide.with_suffix(".json").read_text())["mpp"]
    with open(tiles_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return None
    xy = np.array([[float(r["x"]), float(r["y"])] for r in rows]) + TILE / 2 * f0
    y = label_at(cells, cell_px, xy[:, 0], xy[:, 1]) == TUMOUR
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, [float(r["probability"]) for r in rows]))


def run_slide_demo(folder: str | Path = "demo-slides", model: Optional[str | Path] = None,
                   progress: bool = True) -> dict[str, Optional[float]]:
    """Paint the demo slides, run the model over them, return each slide's tile AUC."""
    from ..synth.slide import write_slide
    from .run import COHORT_CSV, run_slides

    root = Path(folder)
    t0 = time.perf_counter()
    if model is None:
        log.info("[1/3] training the demo model on synthetic patches (give --model to skip)")
        model = train_demo_model(root / "model", progress=progress)
    log.info("[2/3] painting %d synthetic slides in %s", len(SLIDES), root / "slides")
    for name, mpp, tumours in SLIDES:
        write_slide(root / "slides" / f"{name}.tif", cells=(32, 24), mpp=mpp, tumours=tumours, seed=0,
                    force=True)   # one staining style (seed) for the three: one hospital
    log.info("[3/3] pcamtool slide %s --model %s -o %s", root / "slides", model, root / "heatmaps")
    run_slides([root / "slides"], [model], root / "heatmaps", force=True, progress=progress)
    sys.stdout.write((root / "heatmaps" / COHORT_CSV).read_text())
    aucs = {name: tile_auc(root / "slides" / f"{name}.tif", root / "heatmaps" / name / "tiles.csv")
            for name, _, _ in SLIDES}
    for name, auc in aucs.items():
        log.info("%-22s tile AUC against the painted mask: %s", name, "n/a (no tumour)" if auc is None else f"{auc:.3f}")
    log.info("heatmaps in %s/*/heatmap.png (%.0f s)", root / "heatmaps", time.perf_counter() - t0)
    return aucs


def main(argv: Optional[list[str]] = None) -> int:
    from ..cli import _setup_logging
    from ..errors import PcamError

    ap = argparse.ArgumentParser(prog="python -m pcamtool.slide.demo", description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default="demo-slides")
    ap.add_argument("--model", default=None, help="ONNX model (default: train the demo's model first)")
    args = ap.parse_args(argv)
    _setup_logging(False)
    try:
        run_slide_demo(args.folder, args.model)
    except PcamError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
