"""Predict with exported ONNX models: ``pcamtool infer --tta 8 > submission.csv``.

Images come from a folder of tifs (the same fast reader as ``pack``, on
worker threads that decode the next batches while the current one runs) or
from a packed store (the next batch read on a helper thread, for the same
overlap). Test-time augmentation averages the dihedral transforms
(:func:`pcamtool.tta.tta_mean` on the CPU, inside the graph on a GPU);
several models are averaged as an ensemble. :func:`write_submission` is the
whole ``infer`` command: predict, order like the sample, write the CSV.

Example::

    pcamtool infer data/test --model runs/a/model.onnx --tta 8 -o submission.csv
"""
from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import numpy as np

from .constants import AVERAGES
from .errors import ModelError, PcamError
from .io.sources import ImageSource
from .onnx_io import ModelSession, open_session
from .progress import progress_bar
from .stain import StainReference
from .tta import tta_mean

log = logging.getLogger("pcamtool")
T = TypeVar("T")
DEFAULT_SOURCES = (Path("data/test"), Path("data/test.h5"))   # what SRC defaults to, first found


@dataclass
class Predictions:
    ids: list[str]
    probs: np.ndarray
    skipped: list[tuple[str, str]] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)
    tta: list[int] = field(default_factory=list)   # transforms averaged, per model


def default_source() -> Path:
    """``data/test`` (tifs) if present, else ``data/test.h5``; logs which it reads (and that the other is there)."""
    found = [p for p in DEFAULT_SOURCES if p.exists()]
    if not found:
        raise PcamError(f"no SRC given and neither {' nor '.join(map(str, DEFAULT_SOURCES))} exists")
    also = f" ({found[1]} is there too: name it to read that instead)" if len(found) > 1 else ""
    log.info("no SRC given: reading %s%s", found[0], also)
    return found[0]


def default_models() -> list[Path]:
    from .train.runs import latest_run

    return [latest_run(want="model.onnx") / "model.onnx"]


def _stain_transform(model_stain: StainReference | dict, source_stain: StainReference | dict, src: Path,
                     workers: int = 1) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """The normalization to apply so test images match what the model was trained on (None: nothing to do).

    Images packed with the model's own normalization pass as they are;
    unnormalized images are normalized on ``workers`` threads (as ``pack``
    does); images normalized another way are refused.
    """
    model_ref, source_ref = (r if isinstance(r, StainReference) else StainReference.from_dict(r)
                             for r in (model_stain, source_stain))
    if source_ref.enabled and source_ref != model_ref:
        how = ("toward another reference than the model's" if source_ref.method == model_ref.method
               else f"but the model was trained with {model_ref.describe()}")
        raise PcamError(f"{src}: images were packed with stain normalization {source_ref.describe()}, {how} "
                        f"(pack the test set without --stain; infer applies the model's)")
    if not model_ref.enabled or source_ref == model_ref:
        return None
    from .stain import normalize

    return lambda images: normalize(images, model_ref, workers=workers)


def prefetched(items: Iterable[T]) -> Iterator[T]:
    """``items``, the next one produced on a helper thread while the caller uses the current one."""
    it = iter(items)
    done = object()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pcam-prefetch") as pool:
        nxt = pool.submit(next, it, done)
        while True:
            item = nxt.result()
            if item is done:
                return
            nxt = pool.submit(next, it, done)
            yield item  # type: ignore[misc]


def expand_models(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Model files from ``--model`` arguments: a ``pcamtool cv`` folder stands for its ``fold*/model.onnx``."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            out.append(p)
            continue
        folds = sorted(p.glob("fold*/model.onnx"), key=lambda q: (len(q.parent.name), q.parent.name))
        if not folds:
            raise ModelError(f"{p}: a folder, but no fold*/model.onnx in it (export a cv run with 'pcamtool cv')")
        k = _cv_fold_count(p)
        if k is not None:
            # an ensemble quietly short of a fold is another model than the one cv measured
            missing = [p / f"fold{i}" / "model.onnx" for i in range(k) if not (p / f"fold{i}" / "model.onnx").is_file()]
            if missing:
                raise ModelError(f"{missing[0]}: missing, and the cv run in {p} has {k} folds "
                                 f"({len(missing)} without a model; 'pcamtool cv --resume {p}' exports them)")
            folds = [p / f"fold{i}" / "model.onnx" for i in range(k)]
        out += folds
    return out


def _cv_fold_count(cv_dir: Path) -> Optional[int]:
    """How many folds the cv run in ``cv_dir`` has (its ``cv.json``, else ``cv_config.json``); None if neither says."""
    import json

    for name in ("cv.json", "cv_config.json"):
        try:
            k = json.loads((cv_dir / name).read_text()).get("folds")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(k, int) and not isinstance(k, bool) and k >= 1:
            return k
    return None


def combine(per_model: np.ndarray, average: str = "mean") -> np.ndarray:
    """One probability per image from ``(models, images)``: the mean, or the mean of normalized ranks.

    Rank averaging ignores how each model's scores are calibrated (only
    their order counts, as for ROC AUC); it needs every image at once.
    """
    if average not in AVERAGES:
        raise PcamError(f"unknown --average {average!r} (choose from {', '.join(AVERAGES)})")
    if average == "mean" or len(per_model) == 1:
        return per_model.mean(0)
    from scipy.stats import rankdata

    return ((rankdata(per_model, axis=1) - 1) / max(per_model.shape[1] - 1, 1)).mean(0)


def _model_mean(model: ModelSession, images: np.ndarray) -> np.ndarray:
    """One model's TTA mean: the graph averages on a GPU, one run per transform on the CPU."""
    return model.run(images) if model.tta_in_graph else tta_mean(model.run, images, model.tta)


def predict(src: Optional[str | os.PathLike] = None, models: Optional[Sequence[str | os.PathLike]] = None,
            tta: Optional[int] = None, batch_size: int = 256, provider: str = "auto",
            shard: Optional[tuple[int, int]] = None, skip_bad: bool = False,
            workers: Optional[int] = None, progress: bool = True, average: str = "mean") -> Predictions:
    """Probabilities of tumour for every image of ``src``, averaged over TTA and models.

    Parameters
    ----------
    models
        ONNX files, or ``pcamtool cv`` folders (all their folds); default:
        the latest run's ``model.onnx``.
    tta
        Dihedral transforms averaged (1, 2, 4, 8); None: each model's
        ``tta_default`` metadata (8 for models pcamtool exports).
    average
        How the models of an ensemble are combined: ``mean`` of the
        probabilities or ``rank`` (mean of normalized ranks; not with ``shard``).

    Raises
    ------
    PcamError
        Missing or empty source, foreign or mismatched models, a model whose
        output is not a probability, unreadable images (unless ``skip_bad``),
        or a GPU provider asked for that does not load.
    """
    src_path = Path(src) if src is not None else default_source()
    model_paths = expand_models(models) if models else default_models()
    if average == "rank" and shard is not None and len(model_paths) > 1:
        raise PcamError("--average rank needs every image at once: it cannot be used with --shard")
    source = ImageSource(src_path, shard, workers)
    sessions = [open_session(p, provider, batch_size=batch_size, tta=tta) for p in model_paths]
    stains = [s.checkpoint.stain for s in sessions]
    if any(st != stains[0] for st in stains):
        raise ModelError("the ensemble's models were trained with different stain normalizations")
    transform = _stain_transform(stains[0], source.stain(), src_path, source.workers)
    per_model = np.empty((len(sessions), len(source.ids)), np.float64)
    keep = np.ones(len(source.ids), bool)
    skipped: list[tuple[str, str]] = []
    pos = 0
    desc = f"infer tta{max(len(s.tta) for s in sessions)}"
    with progress_bar(total=len(source.ids), desc=desc, enabled=progress) as bar:
        for images, errors in prefetched(source.batches(batch_size)):
            n = len(images)
            bad = [i for i, e in enumerate(errors) if e is not None]
            if bad:
                if not skip_bad:
                    raise errors[bad[0]]  # type: ignore[misc]
                for i in bad:
                    keep[pos + i] = False
                    skipped.append((errors[i].path, errors[i].problem))  # type: ignore[union-attr]
            if transform is not None:
                images = transform(images)
            for m, sess in enumerate(sessions):
                per_model[m, pos:pos + n] = _model_mean(sess, images)
            pos += n
            bar.update(n)
    for path, problem in skipped:
        log.warning("skipped %s: %s", path, problem)
    ids = [i for i, k in zip(source.ids, keep) if k]
    return Predictions(ids, combine(per_model[:, keep], average), skipped, sessions[0].providers, [len(s.tta) for s in sessions])


def sample_beside(src: Path) -> Optional[Path]:
    """Kaggle's ``sample_submission.csv`` beside the data, if there.

    Beside the path as given, not its target: a linked ``data/test`` pairs
    with ``data/sample_submission.csv``, whatever folder it points into.
    """
    cand = Path(os.path.abspath(src)).parent / "sample_submission.csv"
    return cand if cand.is_file() else None


@dataclass(frozen=True)
class Submission:
    """What :func:`write_submission` wrote: rows in submission order, and where (None: stdout)."""

    ids: list[str]
    probs: np.ndarray
    path: Optional[Path]
    predictions: Predictions
    sample: Optional[Path]


def write_submission(src: Optional[str | os.PathLike] = None,
                     models: Optional[Sequence[str | os.PathLike]] = None,
                     out: Optional[str | os.PathLike] = None, sample: Optional[str | os.PathLike] = None,
                     tta: Optional[int] = None, batch_size: int = 256, provider: str = "auto",
                     shard: Optional[tuple[int, int]] = None, skip_bad: bool = False,
                     workers: Optional[int] = None, force: bool = False, progress: bool = True,
                     average: str = "mean") -> Submission:
    """Predict ``src`` and write a Kaggle submission (``id,label``): the whole ``infer`` command.

    Rows follow ``sample`` (default: the ``sample_submission.csv`` beside
    ``src``, unless ``shard`` is given), else sorted by id. ``out`` is
    written atomically; None writes the whole CSV to stdout in one write, so
    a failure leaves no partial CSV there.

    Raises
    ------
    PcamError
        Everything :func:`predict` raises; ``out`` exists without ``force``
        (before any work); sample ids that do not match (naming ``--sample``
        when the sample was the one found beside ``src``); a failed write
        (naming ``out``).
    """
    from .io.csvio import format_rows, write_rows
    from .io.fsutil import check_writable
    from .submission import order_like_sample

    if out is not None:
        check_writable(out, force)
    src_path = Path(src) if src is not None else default_source()
    pred = predict(src_path, models, tta=tta, batch_size=batch_size, provider=provider, shard=shard,
                   skip_bad=skip_bad, workers=workers, progress=progress, average=average)
    found = sample is None and shard is None
    sample_path = Path(sample) if sample is not None else (sample_beside(src_path) if found else None)
    try:
        ids, probs = order_like_sample(pred.ids, pred.probs, sample_path,
                                       allow_missing={Path(p).stem for p, _ in pred.skipped})
    except PcamError as exc:
        if not (found and sample_path is not None):
            raise
        raise PcamError(f"{exc} (that sample_submission.csv sits beside {src_path}: pass --sample "
                        f"with the right one)") from None
    log.info("%d predictions (tta %s, %s)%s", len(ids), "/".join(map(str, sorted(set(pred.tta)))),
             pred.providers[0], f", {len(pred.skipped)} skipped" if pred.skipped else "")
    try:
        if out is None:
            sys.stdout.write(format_rows(ids, probs))  # whole text at once: no partial CSV on failure
            sys.stdout.flush()
        else:
            write_rows(out, ids, probs, force=force)
    except OSError as exc:
        where = out if out is not None else "stdout"
        raise PcamError(f"{where}: cannot write the submission ({exc.strerror or exc})") from None
    return Submission(ids, probs, Path(out) if out is not None else None, pred, sample_path)
