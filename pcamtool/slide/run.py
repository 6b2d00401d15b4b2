"""A cohort of slides into heatmaps: ``pcamtool slide SLIDE... --model M -o OUT``.

Each slide's outputs are written into a temporary folder beside
``OUT/<stem>/`` and renamed onto it when complete, so ``OUT/<stem>/`` exists
only for finished slides: rerunning the same command skips them and redoes a
slide that a Ctrl-C or ``kill -9`` interrupted (its temporary folder is
removed). ``OUT/run.json`` records what the results depend on (models and
their hashes, TTA, stride, mpp, tissue and score settings); a rerun with
other settings is refused without ``--force``. ``--shard i/n`` takes the
i-th of n contiguous slices of the sorted cohort, for job arrays writing to
one ``OUT``. ``OUT/slides.csv`` is rebuilt from every finished slide's
``slide.json`` after each slide.

Example::

    pcamtool slide slides/ --model runs/a/model-int8.onnx -o heatmaps --shard 0/4
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ..errors import BusyError, ExistsError, Interrupted, PcamError
from ..io.fsutil import TEMP_SUFFIX, atomic_path, output_lock, temp_name
from ..progress import progress_bar
from .reader import MODEL_MPP, SLIDE_SUFFIXES, SlideError, open_slide, slide_geometry

log = logging.getLogger("pcamtool")

SUMMARY = "slide.json"
COHORT_CSV = "slides.csv"
RUN_JSON = "run.json"
COLUMNS = ("slide", "tiles", "tissue_mm2", "max_probability", "top_k_mean", "tumour_mm2", "seconds",
           "unreadable_tiles", "level", "level_mpp", "problem")
NO_TISSUE = "no tissue found"


@dataclass(frozen=True)
class SlideOptions:
    """Everything the numbers of a slide depend on, besides the models (recorded in ``run.json``)."""

    stride: int = 96
    mpp: Optional[float] = None       # overrides every slide's own
    min_tissue: float = 0.25
    threshold: float = 0.5            # tumour area: tiles at or above this probability
    top_k: int = 10                   # the top-k mean
    tta: Optional[int] = 1            # None: the model's own default (8 for pcamtool exports)

    def __post_init__(self) -> None:
        if not 1 <= self.stride <= 96:
            raise PcamError(f"--stride {self.stride}: must be 1 to 96 model pixels")
        if not 0 < self.min_tissue <= 1:
            raise PcamError(f"--min-tissue {self.min_tissue}: must be in (0, 1]")
        if not 0 <= self.threshold <= 1:
            raise PcamError(f"--threshold {self.threshold}: must be in [0, 1]")
        if self.top_k < 1:
            raise PcamError(f"--top-k {self.top_k}: must be at least 1")


@dataclass
class SlideSummary:
    """One row of ``slides.csv`` (also ``OUT/<stem>/slide.json``)."""

    slide: str
    tiles: int = 0
    tissue_mm2: float = 0.0
    max_probability: float = 0.0
    top_k_mean: float = 0.0
    tumour_mm2: float = 0.0
    seconds: float = 0.0
    unreadable_tiles: int = 0
    level: int = -1
    level_mpp: float = 0.0
    problem: str = ""

    @property
    def failed(self) -> bool:
        """Not a result: the slide could not be read (a slide without tissue is a result)."""
        return bool(self.problem) and self.problem != NO_TISSUE

    def row(self) -> list[str]:
        d = asdict(self)
        return [f"{d[c]:.6g}" if isinstance(d[c], float) else str(d[c]) for c in COLUMNS]


@dataclass
class CohortResult:
    out: Path
    done: list[SlideSummary] = field(default_factory=list)       # processed by this run
    skipped: list[Path] = field(default_factory=list)            # finished before
    failed: list[SlideSummary] = field(default_factory=list)
    providers: list[str] = field(default_factory=list)            # what onnxruntime runs on, best first


# ------------------------------------------------------------------ the cohort

def list_slides(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Slides from arguments: files, folders (their slide files) and ``.txt`` lists (one path a line).

    Raises
    ------
    PcamError
        A missing path, an empty folder or list, or two slides with the same
        stem (their outputs would share ``OUT/<stem>/``).
    """
    found: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            these = sorted(q for q in p.iterdir() if q.suffix.lower() in SLIDE_SUFFIXES and q.is_file()
                           and not q.name.startswith("."))
            if not these:
                raise PcamError(f"{p}: a folder with no slides in it ({', '.join(SLIDE_SUFFIXES)})")
            found += these
        elif p.suffix.lower() == ".txt" and p.is_file():
            lines = [s.strip() for s in p.read_text(encoding="utf-8").splitlines()]
            these = [(p.parent / s) if not Path(s).is_absolute() else Path(s) for s in lines if s and s[0] != "#"]
            if not these:
                raise PcamError(f"{p}: a list with no slides in it")
            found += these
        elif os.path.lexists(p):
            found.append(p)
        else:
            raise PcamError(f"{p}: no such slide, folder or list")
    stems: dict[str, Path] = {}
    for p in found:
        if p.stem in stems and stems[p.stem].resolve() != p.resolve():
            raise PcamError(f"{p}: same name as {stems[p.stem]}; their outputs would both go to "
                            f"OUT/{p.stem}/ (rename one)")
        stems[p.stem] = p
    return sorted(stems.values(), key=lambda q: q.stem)


def shard_of(slides: list[Path], shard: Optional[tuple[int, int]]) -> list[Path]:
    """The slides of shard ``i/n`` (contiguous slices of the sorted cohort, as ``infer --shard``)."""
    if shard is None:
        return slides
    from ..submission import shard_slice

    return slides[shard_slice(len(slides), *shard)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_settings(models: Sequence[Path], opts: SlideOptions, tta_used: int) -> dict[str, Any]:
    return {"models": [{"path": str(m), "sha256": _sha256(m)} for m in models], "tta": tta_used,
            "stride": opts.stride, "mpp": opts.mpp, "min_tissue": opts.min_tissue,
            "threshold": opts.threshold, "top_k": opts.top_k, "model_mpp": MODEL_MPP}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for key in new:
        a, b = old.get(key), new[key]
        if key == "models":  # the same files moved elsewhere are still the same models
            a = [m.get("sha256") for m in a or []]
            b = [m["sha256"] for m in b]
            if a != b:
                out.append("other models")
        elif a != b:
            out.append(f"{key} {a} (now {b})")
    return out


def check_out(out: Path, settings: dict[str, Any], force: bool) -> None:
    """Make ``out`` ours: new or empty, or the results of the same settings; else refuse without ``force``."""
    run_json = out / RUN_JSON
    if out.exists() and not out.is_dir():
        raise PcamError(f"{out}: exists and is not a folder")
    if run_json.is_file():
        try:
            old = json.loads(run_json.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        diff = _differences(old, settings)
        if diff and not force:
            raise ExistsError(out, f"holds heatmaps made with {', '.join(diff)}")
        if not diff:
            return
    elif out.is_dir() and any(not e.name.startswith(".") for e in out.iterdir()) and not force:
        raise ExistsError(out, "exists and is not a 'pcamtool slide' output folder (no run.json)")
    text = json.dumps(settings, indent=1)
    _patiently(lambda tmp: tmp.write_text(text, encoding="utf-8"), run_json)


def _patiently(write: Any, path: Path, patience: float = 60.0) -> None:
    """``write(tmp)`` atomically onto ``path``, waiting while another shard of the job array writes it."""
    deadline = time.monotonic() + patience
    while True:
        try:
            with atomic_path(path, force=True) as tmp:
                write(tmp)
            return
        except BusyError:   # shards of a job array start together and share OUT's own files
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def read_summary(folder: Path) -> Optional[SlideSummary]:
    """The summary a finished slide folder holds, or None."""
    try:
        d = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
        return SlideSummary(**{k: d[k] for k in SlideSummary.__dataclass_fields__ if k in d})
    except (OSError, ValueError, TypeError):
        return None


def write_cohort_csv(out: Path, patience: float = 60.0) -> Path:
    """``OUT/slides.csv`` from every ``OUT/*/slide.json``, sorted by slide; waits for another shard's write."""
    def write(tmp: Path) -> None:
        # Read under the lock: a shard that finished a slide after we read would otherwise be left out.
        rows = [s for s in (read_summary(d) for d in sorted(out.iterdir()) if d.is_dir()) if s is not None]
        rows.sort(key=lambda s: s.slide)
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(COLUMNS)
            w.writerows(s.row() for s in rows)

    _patiently(write, out / COHORT_CSV, patience)
    return out / COHORT_CSV


_TEMP_DIR = re.compile(r"\.(.+)\.(\d+)\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))


def remove_dead_temp_dirs(out: Path) -> list[Path]:
    """Temporary slide folders of processes that are gone (a kill -9 mid-slide), removed."""
    removed = []
    for entry in out.iterdir() if out.is_dir() else []:
        m = _TEMP_DIR.fullmatch(entry.name)
        if not (m and entry.is_dir()):
            continue
        try:
            os.kill(int(m.group(2)), 0)
            continue
        except ProcessLookupError:
            pass
        except OSError:   # alive, someone else's
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it onto ``final`` when the block succeeds.

    An existing ``final`` is replaced only when ``replace``; the output lock
    keeps two runs off the same slide.
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PcamError(f"{final.parent}: cannot create the output folder ({exc.strerror})") from None
    with output_lock(final):
        tmp = temp_name(final)
        tmp.mkdir()
        try:
            yield tmp
            if final.exists():
                if not replace:
                    raise ExistsError(final)
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


# ------------------------------------------------------------------ one slide

def summarize(name: str, probs: np.ndarray, tissue_mm2: float, opts: SlideOptions) -> SlideSummary:
    """Slide-level numbers from the tiles' probabilities (NaN: unread tiles, left out)."""
    p = probs[np.isfinite(probs)]
    s = SlideSummary(name, tiles=int(len(p)), tissue_mm2=tissue_mm2)
    if len(p):
        top = np.sort(p)[-opts.top_k:]
        cell_mm2 = (opts.stride * MODEL_MPP / 1000) ** 2   # each tile stands for its stride square
        s.max_probability, s.top_k_mean = float(p.max()), float(top.mean())
        s.tumour_mm2 = float((p >= opts.threshold).sum() * cell_mm2)
    return s


def process_slide(path: Path, model: Any, opts: SlideOptions, out: Path, replace: bool,
                  workers: Optional[int] = None, progress: bool = True) -> SlideSummary:
    """Tissue, tiles, model and outputs of one slide into ``out/<stem>/``; the summary.

    Raises
    ------
    SlideError
        OpenSlide cannot open it, or neither it nor ``opts.mpp`` gives its mpp.
    """
    from .heatmap import probability_map, write_heatmap_png, write_heatmap_tif, write_tiles_csv
    from .predict import predict_tiles
    from .tiles import tile_grid
    from .tissue import find_tissue

    t0 = time.perf_counter()
    slide = open_slide(path)
    try:
        geo = slide_geometry(slide, path, opts.mpp)
        tissue = find_tissue(slide, geo)
    finally:
        slide.close()
    grid = tile_grid(tissue, geo, opts.stride, opts.min_tissue)
    pred = predict_tiles(path, geo, grid, model, workers=workers, progress=progress, desc=path.stem[:24])
    if pred.unreadable:
        log.warning("%s: %d of %d tiles unreadable, skipped (%s)", path, pred.unreadable, len(grid),
                    pred.first_error)
    summary = summarize(path.name, pred.probs, tissue.area_mm2(geo.mpp), opts)
    summary.unreadable_tiles, summary.level, summary.level_mpp = pred.unreadable, geo.level, geo.level_mpp
    if len(grid) == 0:
        summary.problem = NO_TISSUE
    elif summary.tiles == 0:
        summary.problem = "every tile unreadable"
    pmap = probability_map(grid, pred.probs)
    with atomic_dir(out / path.stem, replace) as tmp:
        write_tiles_csv(tmp / "tiles.csv", grid, geo, pred.probs)
        write_heatmap_tif(tmp / "heatmap.tif", pmap, grid, geo)
        title = f"{path.name}: max {summary.max_probability:.3f}, {summary.tiles} tiles"
        write_heatmap_png(tmp / "heatmap.png", pmap, grid, geo, tissue, title)
        summary.seconds = round(time.perf_counter() - t0, 3)
        (tmp / SUMMARY).write_text(json.dumps({**asdict(summary), "path": str(path), "mpp": geo.mpp,
                                               "resampled": geo.resample, "stride": opts.stride}, indent=1),
                                   encoding="utf-8")
    return summary


def _failed(path: Path, out: Path, problem: str) -> SlideSummary:
    """A slide that could not be read: its folder holds only ``slide.json`` with the problem (redone on rerun)."""
    s = SlideSummary(path.name, problem=problem)
    with atomic_dir(out / path.stem, replace=True) as tmp:
        (tmp / SUMMARY).write_text(json.dumps({**asdict(s), "path": str(path)}, indent=1), encoding="utf-8")
    return s


def preflight(slides: Sequence[Path], mpp: Optional[float]) -> dict[Path, str]:
    """Each slide OpenSlide cannot open or that has no mpp, with the one-line reason (opening is cheap)."""
    bad = {}
    for p in slides:
        try:
            s = open_slide(p)
            try:
                slide_geometry(s, p, mpp)
            finally:
                s.close()
        except SlideError as exc:
            bad[p] = str(exc)
    return bad


def run_slides(inputs: Sequence[str | os.PathLike], models: Sequence[str | os.PathLike],
               out: str | os.PathLike = "heatmaps", opts: SlideOptions = SlideOptions(),
               shard: Optional[tuple[int, int]] = None, provider: str = "auto", batch_size: int = 256,
               workers: Optional[int] = None, skip_bad: bool = False, force: bool = False,
               progress: bool = True) -> CohortResult:
    """Heatmaps and slide scores for every slide of ``inputs`` (the ``pcamtool slide`` command).

    Parameters
    ----------
    inputs
        Slide files, folders of slides, ``.txt`` lists of slides.
    models
        ONNX files or ``pcamtool cv`` folders (averaged, as ``infer``).
    shard
        ``(i, n)``: only the i-th of n slices of the sorted cohort.
    skip_bad
        A slide that cannot be opened or has no mpp gets a line in
        ``slides.csv`` with its problem instead of stopping the run.
    force
        Redo finished slides and replace results of other settings.

    Raises
    ------
    PcamError
        No OpenSlide, bad arguments, an unreadable slide or one without mpp
        (before any work, unless ``skip_bad``), ``out`` holding something else
        (unless ``force``).
    Interrupted
        Ctrl-C: the slides finished so far are kept.
    """
    from .predict import SlideModel

    out = Path(out)
    slides = shard_of(list_slides(inputs), shard)
    todo, skipped = [], []
    for p in slides:
        s = read_summary(out / p.stem)
        if s is not None and not s.failed and not force:
            skipped.append(p)
        else:
            todo.append(p)
    bad = preflight(todo, opts.mpp)
    if bad and not skip_bad:
        first = next(iter(bad.values()))
        more = f" (and {len(bad) - 1} more slides; --skip-bad lists them in slides.csv)" if len(bad) > 1 else ""
        raise SlideError(first + more)
    model = SlideModel(models, tta=opts.tta, provider=provider, batch_size=batch_size)
    check_out(out, run_settings(model.paths, opts, model.tta), force)
    remove_dead_temp_dirs(out)
    res = CohortResult(out, skipped=skipped, providers=list(model.sessions[0].providers))
    if skipped:
        log.info("%d of %d slides already finished in %s: skipped", len(skipped), len(slides), out)
    try:
        with progress_bar(total=len(todo), desc="slides", unit="slide", enabled=progress) as bar:
            for p in todo:
                if p in bad:
                    log.warning("skipped %s", bad[p])
                    res.failed.append(_failed(p, out, bad[p]))
                else:
                    res.done.append(process_slide(p, model, opts, out, replace=True, workers=workers,
                                                  progress=progress))
                write_cohort_csv(out)
                bar.update(1)
    except KeyboardInterrupt:
        raise Interrupted(f"{len(res.done)} slides finished in {out}; the same command goes on from there") from None
    if not todo:
        write_cohort_csv(out)
    log.info("%d slides done (%s, tta %d), %d already finished, %d could not be read -> %s",
             len(res.done), model.provider.replace("ExecutionProvider", ""), model.tta, len(skipped),
             len(res.failed), out / COHORT_CSV)
    return res
