"""Galleries of what a model gets wrong and right, with where it looked: ``pcamtool interpret``.

For scored rows (probability and 0/1 label per image) it draws the most
confident mistakes and the most confident hits, each tile the patch with the
central 32x32 (the part the label is about) outlined beside the same patch
under a saliency map, titled with id, label and probability:

* ``false_positives.png``  label 0, highest probabilities (>= threshold)
* ``false_negatives.png``  label 1, lowest probabilities (< threshold)
* ``true_positives.png`` / ``true_negatives.png``  the surest hits
* ``overview.png``  the first four of each, one row per kind
* ``gallery.csv``  kind, rank, id, label, probability (and fold) of every tile

The rows come from

* a run folder: its validation rows, predicted with its ``best.pt``
  (saliency: Grad-CAM on the last convolutional block, or occlusion through
  its ``model.onnx``);
* a ``pcamtool cv`` folder: ``oof.csv``, every row predicted by the fold that
  did not train on it (saliency: occlusion through that fold's ``model.onnx``,
  or Grad-CAM from its ``best.pt``);
* a submission CSV (``id,label`` probabilities) with ``images`` (a tif folder
  or a store) and labels (``labels`` CSV, or the store's / the
  ``<folder>_labels.csv`` beside the tifs); saliency from ``model`` if given
  (ONNX files or a cv folder: occlusion; a run folder or ``.pt``: Grad-CAM).

Example::

    pcamtool interpret runs/20261206-101500-plain4 --n 8
    pcamtool interpret submission.csv --images data/val.h5 --model runs/a/model.onnx -o look/
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import ModelError, PcamError, few
from .io.fsutil import atomic_path, check_output_folder

log = logging.getLogger("pcamtool")

KINDS = ("false_positives", "false_negatives", "true_positives", "true_negatives")
TITLES = {"false_positives": "Most confident false positives (label 0, predicted tumour)",
          "false_negatives": "Most confident false negatives (label 1, predicted normal)",
          "true_positives": "Most confident true positives (label 1)",
          "true_negatives": "Most confident true negatives (label 0)"}
OUTPUTS = tuple(f"{k}.png" for k in KINDS) + ("overview.png", "gallery.csv")
SALIENCY = ("auto", "gradcam", "occlusion", "none")
OVERVIEW_PER_KIND = 4
# log-odds drop below which an occlusion map is drawn as "nothing matters" rather than stretched noise
OCCLUSION_FLOOR = 0.1
COLS = 4            # tiles per figure row


@dataclass
class Scored:
    """Rows to choose from: id, 0/1 label, probability, and where each image is."""

    ids: list[str]
    labels: np.ndarray
    probs: np.ndarray
    source: object                                   # an ImageSource holding every id
    fold: Optional[np.ndarray] = None                # cv: the fold that predicted each row
    saliency: dict[int, Callable[[np.ndarray, np.ndarray], np.ndarray]] = field(default_factory=dict)
    saliency_name: str = "none"                      # what the maps are, for the figures


@dataclass(frozen=True)
class InterpretResult:
    out_dir: Path
    files: list[Path]
    counts: dict[str, int]                           # rows of each kind among the scored rows
    shown: dict[str, list[str]]                      # ids drawn per kind, most confident first
    saliency: str


def select_rows(probs: np.ndarray, labels: np.ndarray, n: int, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Row indices of the ``n`` most confident rows of each kind, most confident first.

    A row is predicted positive when ``prob >= threshold``. False positives
    and true positives are ranked by descending probability, false and true
    negatives by ascending; ties keep row order.
    """
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels) >= 0.5
    pred = p >= threshold
    out = {}
    for kind, mask, desc in (("false_positives", ~y & pred, True), ("false_negatives", y & ~pred, False),
                             ("true_positives", y & pred, True), ("true_negatives", ~y & ~pred, False)):
        idx = np.flatnonzero(mask)
        order = np.argsort(-p[idx] if desc else p[idx], kind="stable")
        out[kind] = idx[order][:n]
    return out


def check_outputs(out_dir: str | os.PathLike, force: bool) -> None:
    """Refuse a folder holding interpret's outputs already (unless ``force``), before any work is done."""
    check_output_folder(out_dir, OUTPUTS, force, "interpret")


# ------------------------------------------------------------------ sources

def _device():
    from .device import resolve_device

    return resolve_device("auto")


def _gradcam_from(checkpoint: Path) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    from .saliency import grad_cam
    from .train.checkpoint import Checkpoint

    net = Checkpoint.load(checkpoint).build_model().to(_device())
    return lambda images, probs: grad_cam(net, images, sign=np.where(probs >= 0.5, 1.0, -1.0))[0]


def _occlusion_from(models: Sequence[Path], provider: str, transform=None) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    from .saliency import display_scale, occlusion, onnx_runner

    run = onnx_runner(models, provider, transform=transform)
    return lambda images, probs: display_scale(
        occlusion(run, images, sign=np.where(probs >= 0.5, 1.0, -1.0))[0], floor=OCCLUSION_FLOOR)


def _choose(saliency: str, can_gradcam: bool, can_occlusion: bool, default: str, where: object) -> str:
    if saliency not in SALIENCY:
        raise PcamError(f"unknown saliency {saliency!r} (choose from {', '.join(SALIENCY)})")
    if saliency == "auto":
        return default
    if saliency == "gradcam" and not can_gradcam:
        raise PcamError(f"{where}: Grad-CAM needs a PyTorch checkpoint (a run folder or best.pt)")
    if saliency == "occlusion" and not can_occlusion:
        raise ModelError(f"{where}: occlusion needs an ONNX model (export it with 'pcamtool export')")
    return saliency


def _from_run(run_dir: Path, saliency: str, provider: str) -> Scored:
    from .config import TrainConfig
    from .io.sources import ImageSource
    from .io.store import open_store
    from .train.checkpoint import split_rows
    from .train.cv import predict_rows
    from .train.runs import read_run_config

    saved = read_run_config(run_dir)
    saved.pop("resolved", None)
    cfg = TrainConfig.from_dict(saved, source=run_dir / "config.json")
    val_path = cfg.val_store or cfg.store
    store = open_store(val_path, need_labels=True)
    # the rows training validated on: the one split fit made (every row of a --val-store)
    rows = np.arange(len(store)) if cfg.val_store else np.sort(split_rows(cfg, store)[1])
    ckpt = run_dir / "best.pt"
    onnx = run_dir / "model.onnx"
    how = _choose(saliency, True, onnx.is_file(), "gradcam", run_dir)
    log.info("%s: predicting its %d validation rows of %s", run_dir, len(rows), val_path)
    probs = predict_rows(ckpt, store, rows, _device())
    source = ImageSource(val_path).subset(rows)
    sal = {}
    if how == "gradcam":
        sal[-1] = _gradcam_from(ckpt)
    elif how == "occlusion":
        sal[-1] = _occlusion_from([onnx], provider)
    return Scored(list(source.ids), np.asarray(store.labels)[rows].astype(np.int8), probs, source,
                  saliency=sal, saliency_name=how)


def _from_cv(cv_dir: Path, saliency: str, provider: str) -> Scored:
    from .io.sources import ImageSource

    oof = cv_dir / "oof.csv"
    try:
        cfg = json.loads((cv_dir / "cv_config.json").read_text())["config"]
        with open(oof, newline="", encoding="utf-8") as f:
            table = list(csv.DictReader(f))
        ids = [r["id"] for r in table]
        labels = np.array([int(r["label"]) for r in table], np.int8)
        folds = np.array([int(r["fold"]) for r in table], np.int64)
        probs = np.array([float(r["prob"]) for r in table], np.float64)
    except FileNotFoundError as exc:
        raise PcamError(f"{exc.filename}: not found (is {cv_dir} a finished 'pcamtool cv' folder?)") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise PcamError(f"{oof}: not a pcamtool cv out-of-fold table ({type(exc).__name__}: {exc})") from None
    source = _source_for(ImageSource(cfg["store"]), ids, cfg["store"])
    fold_dirs = {int(k): cv_dir / f"fold{k}" for k in np.unique(folds)}
    has_onnx = all((d / "model.onnx").is_file() for d in fold_dirs.values())
    has_pt = all((d / "best.pt").is_file() for d in fold_dirs.values())
    how = _choose(saliency, has_pt, has_onnx, "occlusion" if has_onnx else "gradcam" if has_pt else "none", cv_dir)
    sal = {}
    for k, d in fold_dirs.items():   # each row explained by the fold model that predicted it
        if how == "gradcam":
            sal[k] = _gradcam_from(d / "best.pt")
        elif how == "occlusion":
            sal[k] = _occlusion_from([d / "model.onnx"], provider)
    return Scored(ids, labels, probs, source, fold=folds, saliency=sal, saliency_name=how)


def _source_for(source, ids: Sequence[str], where: object):
    """``source`` restricted to ``ids``, in that order; every id must be there."""
    pos = {k: i for i, k in enumerate(source.ids)}
    missing = [k for k in ids if k not in pos]
    if missing:
        raise PcamError(f"{where}: {len(missing)} id(s) have no image there: {few(missing)}")
    return source.subset([pos[k] for k in ids])


def _from_submission(csv_path: Path, images: Optional[Path], labels_csv: Optional[Path],
                     model: Optional[Sequence[Path]], saliency: str, provider: str) -> Scored:
    from .io.csvio import read_id_table, read_labels
    from .io.sources import ImageSource

    if images is None:
        raise PcamError(f"{csv_path}: a submission needs its images (--images: a tif folder or a store)")
    sub = read_id_table(csv_path, as_float=True, kind="submission")
    source = ImageSource(images)
    if labels_csv is not None:
        truth = read_labels(labels_csv)
        where = labels_csv
    else:
        known = source.labels()
        if known is None:
            raise PcamError(f"{images}: no labels (pass --labels, an id,label CSV)")
        truth = {k: int(v) for k, v in zip(source.ids, known) if v >= 0}
        where = images
    ids = [k for k in sub if k in truth]
    if not ids:
        raise PcamError(f"{csv_path}: none of its ids has a label in {where}")
    if len(ids) < len(sub):
        log.warning("%s: %d of %d rows have no label in %s and are left out", csv_path, len(sub) - len(ids),
                    len(sub), where)
    probs = np.array([sub[k] for k in ids], np.float64)
    if not (np.isfinite(probs).all() and probs.min() >= 0 and probs.max() <= 1):
        raise PcamError(f"{csv_path}: holds values outside [0, 1]; a submission holds probabilities")
    source = _source_for(source, ids, images)
    sal = {}
    how = "none"
    if model:
        from .infer import _stain_transform, expand_models

        paths = [Path(m) for m in model]
        pts = [p for p in paths if p.suffix == ".pt" or (p.is_dir() and (p / "best.pt").is_file()
                                                          and not list(p.glob("fold*/model.onnx")))]
        how = _choose(saliency, len(pts) == 1 and len(paths) == 1, not pts, "gradcam" if pts else "occlusion",
                      ", ".join(map(str, paths)))
        if how == "gradcam":
            sal[-1] = _gradcam_from(pts[0] / "best.pt" if pts[0].is_dir() else pts[0])
        elif how == "occlusion":
            from .onnx_io import open_session

            # the stain normalization infer would apply to these images before the model
            model_stain = open_session(expand_models(paths)[0], "cpu", tta=1).checkpoint.stain
            transform = _stain_transform(model_stain, source.stain(), images)
            sal[-1] = _occlusion_from(paths, provider, transform)
    elif saliency not in ("auto", "none"):
        raise PcamError(f"--saliency {saliency}: give the model (--model) that made {csv_path}")
    return Scored(ids, np.array([truth[k] for k in ids], np.int8), probs, source, saliency=sal,
                  saliency_name=how)


# ------------------------------------------------------------------ drawing

def _gather(source, positions: np.ndarray) -> np.ndarray:
    """uint8 images of ``source`` at ``positions`` (in that order); unreadable images are errors."""
    if len(positions) == 0:
        return np.zeros((0, 96, 96, 3), np.uint8)
    sub = source.subset(list(map(int, positions)))
    out = []
    for batch, errors in sub.batches(256):
        bad = [e for e in errors if e is not None]
        if bad:
            raise bad[0]
        out.append(batch)
    return np.concatenate(out)


def _overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The patch under a colour map of ``heat`` (0..1), opaque where it is high so the tissue still shows elsewhere."""
    from matplotlib import colormaps

    colour = colormaps["jet"](heat)[..., :3]
    alpha = 0.65 * heat[..., None] ** 0.7   # untinted where the map is 0: the tissue stays readable
    return np.clip((1 - alpha) * image / 255.0 + alpha * colour, 0, 1)


def _draw_tiles(fig, rows: list[list[dict]], row_titles: list[str], saliency_name: str) -> None:
    """One tile per dict (image, heat or None, id, label, prob): patch | overlay, central 32x32 outlined."""
    from matplotlib.patches import Rectangle

    pair = 2 if any(t["heat"] is not None for r in rows for t in r) else 1
    grid = fig.add_gridspec(len(rows), 1, hspace=0.35)
    for r, (tiles, title) in enumerate(zip(rows, row_titles)):
        cols = max(1, max(len(t) for t in rows))
        sub = grid[r].subgridspec(1, cols * pair, wspace=0.05)
        if not tiles:
            ax = fig.add_subplot(grid[r])
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{title}: none" if title else "none", ha="center", va="center", fontsize=10)
            continue
        for j, t in enumerate(tiles):
            panels = [t["image"] / 255.0] + ([_overlay(t["image"], t["heat"])] if pair == 2 else [])
            for k, img in enumerate(panels):
                ax = fig.add_subplot(sub[0, j * pair + k])
                ax.imshow(img, interpolation="nearest")
                ax.add_patch(Rectangle((31.5, 31.5), 32, 32, fill=False, lw=1.0,
                                       ec="white" if k else ("#d8453b" if t["label"] else "#3b7dd8")))
                ax.set_xticks([])
                ax.set_yticks([])
                if k == 0:
                    short = t["id"] if len(t["id"]) <= 12 else t["id"][:11] + "…"
                    ax.set_title(f"{short}\nlabel {t['label']}  p={t['prob']:.3f}", fontsize=7, loc="left")
                    if j == 0:
                        ax.set_ylabel(title, fontsize=8)
                elif j == 0 and r == 0:
                    ax.set_title(saliency_name, fontsize=7)


def _figure(rows: list[list[dict]], row_titles: list[str], suptitle: str, saliency_name: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pair = 2 if saliency_name != "none" else 1
    cols = max([1] + [len(t) for t in rows])
    fig = Figure(figsize=(1.35 * cols * pair + 0.6, 1.75 * len(rows) + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    _draw_tiles(fig, rows, row_titles, saliency_name)
    fig.suptitle(suptitle, fontsize=10)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.02, top=1 - 0.55 / (1.75 * len(rows) + 0.6))
    return fig


def _save(fig, path: Path, force: bool) -> Path:
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png")  # the temporary's suffix is not .png: say it
    return path


def _chunks(tiles: list[dict], cols: int) -> list[list[dict]]:
    return [tiles[i:i + cols] for i in range(0, len(tiles), cols)] or [[]]


SALIENCY_NAMES = {"gradcam": "Grad-CAM", "occlusion": "occlusion", "none": "none"}


def interpret(source: Optional[str | os.PathLike] = None, out_dir: Optional[str | os.PathLike] = None, *,
              images: Optional[str | os.PathLike] = None, labels: Optional[str | os.PathLike] = None,
              model: Optional[Sequence[str | os.PathLike]] = None, n: int = 8, saliency: str = "auto",
              threshold: float = 0.5, provider: str = "auto", force: bool = False) -> InterpretResult:
    """Write the galleries of a run, a cv folder or a submission into ``out_dir``.

    Parameters
    ----------
    source
        A run folder, a ``pcamtool cv`` folder or a submission CSV; default:
        the latest run with a ``best.pt``.
    out_dir
        Default: ``interpret/`` inside the run or cv folder, or
        ``<csv stem>-interpret/`` beside a submission.
    images, labels, model
        For a submission: its images (tif folder or store), an ``id,label``
        answer key (default: the labels of ``images``), the model(s) that made it.
    n
        Tiles per kind.
    saliency
        ``auto`` (Grad-CAM for a run, occlusion for a cv folder or ONNX
        models), ``gradcam``, ``occlusion`` or ``none``.

    Raises
    ------
    ExistsError
        ``out_dir`` already holds interpret's outputs and ``force`` is false
        (checked before any work).
    PcamError
        A source that is none of the three, missing images or labels, ids
        without images, a model that cannot give the saliency asked for.
    """
    if n < 1:
        raise PcamError(f"--n must be at least 1, got {n}")
    if source is None:
        from .train.runs import latest_run   # imports torch: only when asked for the latest run

        source = latest_run()
    src = Path(source)
    if src.is_dir() and ((src / "oof.csv").is_file() or (src / "cv_config.json").is_file()):
        kind = "cv"
    elif src.is_dir() and (src / "best.pt").is_file():
        kind = "run"
    elif src.is_file():
        kind = "csv"
    elif not src.exists():
        raise PcamError(f"{src}: not found")
    else:
        raise PcamError(f"{src}: neither a run folder (best.pt), a cv folder (oof.csv) nor a submission CSV")
    out = Path(out_dir) if out_dir is not None else (
        src / "interpret" if kind != "csv" else src.with_name(f"{src.stem}-interpret"))
    check_outputs(out, force)
    if kind == "run":
        scored = _from_run(src, saliency, provider)
    elif kind == "cv":
        scored = _from_cv(src, saliency, provider)
    else:
        scored = _from_submission(src, Path(images) if images is not None else None,
                                  Path(labels) if labels is not None else None,
                                  [Path(m) for m in model] if model else None, saliency, provider)
    return draw_galleries(scored, out, n=n, threshold=threshold, force=force, title=src.name)


def draw_galleries(scored: Scored, out: Path, n: int = 8, threshold: float = 0.5, force: bool = False,
                   title: str = "") -> InterpretResult:
    """Select, explain and draw the rows of ``scored`` into ``out`` (the whole of :func:`interpret` after loading)."""
    check_outputs(out, force)
    picked = select_rows(scored.probs, scored.labels, n, threshold)
    y = np.asarray(scored.labels) >= 0.5
    pred = np.asarray(scored.probs) >= threshold
    counts = {"false_positives": int(np.sum(~y & pred)), "false_negatives": int(np.sum(y & ~pred)),
              "true_positives": int(np.sum(y & pred)), "true_negatives": int(np.sum(~y & ~pred))}
    every = np.concatenate([picked[k] for k in KINDS]).astype(np.int64)
    imgs = _gather(scored.source, every)
    heat = np.zeros((len(every), 96, 96), np.float32)
    if scored.saliency and len(every):
        log.info("%s maps of %d patches", SALIENCY_NAMES[scored.saliency_name], len(every))
        groups = scored.fold[every] if scored.fold is not None else np.full(len(every), -1)
        for g in np.unique(groups):
            sel = np.flatnonzero(groups == g)
            heat[sel] = scored.saliency[int(g)](imgs[sel], scored.probs[every[sel]])
    tiles: dict[str, list[dict]] = {k: [] for k in KINDS}
    pos = 0
    for k in KINDS:
        for i in picked[k]:
            tiles[k].append({"image": imgs[pos], "heat": heat[pos] if scored.saliency else None,
                             "id": scored.ids[i], "label": int(scored.labels[i]), "prob": float(scored.probs[i])})
            pos += 1
    name = SALIENCY_NAMES[scored.saliency_name]
    how = f"; overlay: {name}" if scored.saliency else ""
    files: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)
    for k in KINDS:
        fig = _figure(_chunks(tiles[k], COLS), [""] * len(_chunks(tiles[k], COLS)),
                      f"{TITLES[k]}: {len(tiles[k])} of {counts[k]}{how}", name)
        files.append(_save(fig, out / f"{k}.png", force))
    over = [tiles[k][:OVERVIEW_PER_KIND] for k in KINDS]
    fig = _figure(over, [k.replace("_", " ") for k in KINDS],
                  f"{title}: {len(scored.ids)} rows, threshold {threshold:g}{how}", name)
    files.append(_save(fig, out / "overview.png", force))
    from .io.csvio import write_table

    header = ("kind", "rank", "id", "label", "prob") + (("fold",) if scored.fold is not None else ())
    table = [(k, r + 1, scored.ids[i], int(scored.labels[i]), f"{scored.probs[i]:.6f}")
             + ((int(scored.fold[i]),) if scored.fold is not None else ())
             for k in KINDS for r, i in enumerate(picked[k])]
    files.append(write_table(out / "gallery.csv", header, table, force=force))
    return InterpretResult(out, files, counts, {k: [t["id"] for t in tiles[k]] for k in KINDS},
                           scored.saliency_name)
