"""The GPU check: run the gpu tests, then measure training and TTA inference on this GPU.

``make gpu-check`` runs this (``python benchmarks/gpu_check.py``). Without an
NVIDIA GPU visible to torch it prints one line and exits 0. With one, within
a total budget of 9 minutes, it

1. runs the ``gpu``-marked tests;
2. makes a 220,025-image synthetic training store (a smaller set painted by
   ``pcamtool.synth.generate`` and packed, its rows tiled to 220,025 with the
   store writer; cached under ``--data`` so a rerun reuses it) and 57,458
   test tifs (hard links to painted ones) plus their packed store;
3. times one training epoch of the default model for each cache (gpu, ram,
   mmap) and two batch sizes, and with ``--compile`` (img/s, peak GPU
   memory, precision);
4. times TTA x8 over the 57,458 test images from the tifs and from the store
   with CUDA and with TensorRT, recording what actually ran
   (``session.get_providers()``);
5. times ``pcamtool slide`` over a synthetic 10x slide of ~20,000 tissue
   tiles with CUDA and with TensorRT, TTA 1 and 8 (tiles/s end to end:
   reading, tissue finding and heatmaps included), when the ``slides`` extra
   is installed;
6. records ``pcamtool doctor --json`` (CPU flags, GPU name, providers);

and writes ``gpu-results.md`` and ``gpu-results.json`` (default: beside this
script). Every measurement runs under its own time limit inside a per-stage
budget; a failure or a timeout is recorded and the check goes on.

``--dry-run`` does the same on the CPU with a few hundred images and a tiny
model, end to end in well under a minute: the test suite runs it to keep this
script working on machines without a GPU.

Example::

    python benchmarks/gpu_check.py                     # on a GPU machine
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc --data /tmp/gc-data
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOTAL_BUDGET_S = 540          # the promise: under 9 minutes, install excluded (8 before the slides stage)


@dataclass(frozen=True)
class Plan:
    """Sizes and limits of one check (the real one, or the CPU dry run)."""

    device: str
    n_train: int              # rows of the training store
    n_test: int               # test images timed by TTA x8
    n_paint: int              # training images actually painted (the rest are tiled rows)
    n_paint_test: int
    arch: Optional[str]       # None: the default model
    model_kwargs: dict[str, Any]
    batch_sizes: tuple[int, ...]
    caches: tuple[str, ...]
    providers: tuple[str, ...]
    infer_batch: int
    budgets: dict[str, float] = field(default_factory=dict)   # seconds per stage
    n_slide_tiles: int = 20_000   # tissue tiles of the synthetic slide timed by the slides stage


GPU_PLAN = Plan("cuda", 220_025, 57_458, 20_000, 4_000, None, {}, (256, 1024), ("gpu", "ram", "mmap"),
                ("cuda", "tensorrt"), 512,
                {"tests": 90, "data": 110, "train": 150, "infer": 110, "slides": 60, "doctor": 15})
DRY_PLAN = Plan("cpu", 160, 64, 64, 16, "simple", {"width": 4}, (32, 64), ("ram", "mmap"),
                ("cpu", "cuda", "tensorrt"), 32,
                {"tests": 40, "data": 30, "train": 60, "infer": 40, "slides": 40, "doctor": 15}, n_slide_tiles=300)


class StageTimeout(Exception):
    """A measurement ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`StageTimeout` in the main thread after ``seconds`` (SIGALRM; checked between bytecodes)."""
    def _raise(signum: int, frame: Any) -> None:
        raise StageTimeout(f"ran past its {seconds:.0f} s limit")

    if seconds <= 0:
        raise StageTimeout("no time left in this stage's budget")
    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Recorder:
    """Runs measurements under limits and keeps what each gave (or its error)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.start = time.monotonic()
        self.results: dict[str, Any] = {"stages": {}, "measurements": []}
        self._stage_end = 0.0
        self._stage = ""

    def left(self) -> float:
        return min(self._stage_end, self.start + TOTAL_BUDGET_S) - time.monotonic()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        self._stage, self._stage_end = name, t0 + self.plan.budgets[name]
        print(f"gpu-check: {name} (budget {self.plan.budgets[name]:.0f} s)", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            self.results["stages"][name] = {"seconds": round(time.monotonic() - t0, 1),
                                            "budget_s": self.plan.budgets[name]}

    def measure(self, name: str, fn: Callable[[], dict[str, Any]], limit: Optional[float] = None,
                **labels: Any) -> Optional[dict[str, Any]]:
        """``fn()`` under ``min(limit, what the stage has left)``; its dict is recorded with ``labels``."""
        row: dict[str, Any] = {"stage": self._stage, "name": name, **labels}
        t0 = time.monotonic()
        try:
            with time_limit(min(limit or 1e9, self.left())):
                row.update(fn())
            row["ok"] = True
        except StageTimeout as exc:
            row.update(ok=False, error=f"timeout: {exc}")
        except Exception as exc:  # recorded, and the check goes on
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
            row["where"] = traceback.format_exc().strip().splitlines()[-3:]
        row["wall_s"] = round(time.monotonic() - t0, 2)
        self.results["measurements"].append(row)
        state = "ok" if row["ok"] else f"FAILED ({row['error']})"
        print(f"gpu-check:   {name} {labels or ''}: {state}", file=sys.stderr, flush=True)
        return row if row["ok"] else None


# ---------------------------------------------------------------- the stages

def run_gpu_tests(rec: Recorder) -> None:
    def tests() -> dict[str, Any]:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
               str(ROOT / "tests" / "test_gpu.py") if rec.plan.device == "cpu" else str(ROOT / "tests")]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, rec.left() - 2))
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
        return {"returncode": done.returncode, "summary": tail[0][:300]}

    rec.measure("gpu tests", tests)


def tile_store(base: Path, out: Path, n: int) -> Path:
    """A store of ``n`` rows made by repeating ``base``'s rows (ids made unique and sorted)."""
    import h5py
    import numpy as np

    from pcamtool.io.fsutil import atomic_path
    from pcamtool.io.store import StoreWriter, open_store

    src = open_store(base)
    images = src.gather(np.arange(len(src)))
    labels = np.asarray(src.labels)
    with h5py.File(base, "r") as f:
        attrs = dict(f.attrs)
    tiled = labels[np.arange(n) % len(src)]
    # the counts follow the rows; mean and std are the painted rows' (the same pixels, repeated)
    attrs.update(count=n, n_positive=int((tiled == 1).sum()), n_unlabelled=int((tiled < 0).sum()),
                 gpu_check=f"{len(src)} painted rows tiled to {n}")
    with atomic_path(out, force=True) as tmp, StoreWriter(tmp, n) as writer:
        step = 8192
        for a in range(0, n, step):
            rows = np.arange(a, min(a + step, n)) % len(src)
            writer.write(images[rows])
        writer.finish([f"{i:040x}" for i in range(n)], tiled, attrs)
    return out


def link_tifs(src: Path, out: Path, n: int) -> Path:
    """``n`` test tifs in ``out``: hard links (copies where links fail) to ``src``'s, cycled."""
    import shutil

    files = sorted(src.glob("*.tif"))
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        dst = out / f"{i:040x}.tif"
        if not dst.exists():
            try:
                os.link(files[i % len(files)], dst)
            except OSError:
                shutil.copyfile(files[i % len(files)], dst)
    return out


def make_data(rec: Recorder, data: Path) -> dict[str, Path]:
    """The training store, the test tifs and the test store: reused when already there."""
    from pcamtool.io.pack import pack
    from pcamtool.synth import generate
    from pcamtool.system import cpu_threads

    p = rec.plan
    paths = {"train": data / f"train-{p.n_train}.h5", "test_tifs": data / f"test-{p.n_test}",
             "test_store": data / f"test-{p.n_test}.h5"}
    done = data / f".complete-{p.n_train}-{p.n_test}"

    def build() -> dict[str, Any]:
        if done.exists():
            return {"reused": True}
        painted = data / "painted"
        t0 = time.monotonic()
        generate(painted, n_train=p.n_paint, n_test=p.n_paint_test, seed=0, force=True, progress=False,
                 workers=cpu_threads())
        t_paint = time.monotonic() - t0
        base = pack(painted / "train", out=data / "painted-train.h5", force=True, progress=False).path
        tile_store(base, paths["train"], p.n_train)
        link_tifs(painted / "test", paths["test_tifs"], p.n_test)
        pack(paths["test_tifs"], out=paths["test_store"], force=True, progress=False)
        done.write_text("ok\n")
        return {"reused": False, "paint_s": round(t_paint, 1),
                "note": f"{p.n_paint} painted training images tiled to {p.n_train} rows; "
                        f"{p.n_paint_test} painted test tifs linked to {p.n_test} names"}

    rec.measure("synthetic data", build)
    return paths


def _epoch(rec: Recorder, store: Path, runs: Path, cache: str, batch: int, compile_: bool) -> dict[str, Any]:
    """One training epoch; img/s from the run's metrics (the training loop, loader included)."""
    import torch

    from pcamtool.config import TrainConfig
    from pcamtool.device import Precision
    from pcamtool.train import fit

    p = rec.plan
    if p.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    kw: dict[str, Any] = {"arch": p.arch} if p.arch else {}
    cfg = TrainConfig(store=str(store), out=str(runs / f"{cache}-{batch}-{'c' if compile_ else 'e'}"),
                      model_kwargs=p.model_kwargs, epochs=1, batch_size=batch, device=p.device, cache=cache,
                      compile=compile_, **kw)
    if Path(cfg.out).exists():
        import shutil

        shutil.rmtree(cfg.out)
    t0 = time.monotonic()
    res = fit(cfg, progress=False)
    wall = time.monotonic() - t0
    with open(res.run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    out = {"img_per_s": round(float(rows[-1]["img_per_s"]), 1) if rows and rows[-1].get("img_per_s") else None,
           "fit_wall_s": round(wall, 1), "precision": Precision.for_device(p.device).name,
           "run_dir": str(res.run_dir)}
    if p.device == "cuda":
        out["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return out


def train_epochs(rec: Recorder, data: dict[str, Path], runs: Path) -> Optional[Path]:
    """Every cache x batch size, then --compile at the first batch size; the run folder of one that worked."""
    p = rec.plan
    n = len(p.caches) * len(p.batch_sizes) + 1
    good: Optional[Path] = None
    for cache in p.caches:
        for batch in p.batch_sizes:
            row = rec.measure("train epoch", lambda: _epoch(rec, data["train"], runs, cache, batch, False),
                              limit=rec.left() / max(1, n), cache=cache, batch_size=batch, compile=False)
            n -= 1
            good = good or (Path(row["run_dir"]) if row else None)
    if p.device == "cpu":
        rec.measure("train epoch", lambda: {"skipped": "dry run: torch.compile takes minutes on a CPU"},
                    cache="auto", batch_size=p.batch_sizes[0], compile=True)
    else:
        rec.measure("train epoch", lambda: _epoch(rec, data["train"], runs, "auto", p.batch_sizes[-1], True),
                    cache="auto", batch_size=p.batch_sizes[-1], compile=True)
    return good


def time_inference(rec: Recorder, data: dict[str, Path], run_dir: Optional[Path]) -> None:
    """TTA x8 over the test images from tifs and from the store, per provider, recording what ran."""
    from pcamtool.export import export_onnx
    from pcamtool.infer import predict
    from pcamtool.onnx_io import provider_problems
    from pcamtool.system import cpu_threads

    p = rec.plan
    if run_dir is None:
        rec.measure("tta8", lambda: {"skipped": "no training run finished: nothing to export"})
        return
    problems = provider_problems()
    check = next((q for q in ("cuda", "cpu") if problems[q] is None), "cpu")
    model = rec.measure("export", lambda: {"path": str(export_onnx(run_dir, run_dir / "model.onnx", force=True,
                                                                   provider=check).path),
                                           "parity_provider": check})
    if model is None:
        return
    path = Path(model["path"])
    for provider in p.providers:
        if problems[provider] is not None:
            rec.measure("tta8", lambda: {"skipped": f"{provider} does not load: {problems[provider]}"},
                        provider=provider)
            continue
        # the first run of a session builds what it caches (TensorRT engines): timed apart
        warm = rec.measure("tta8 warm-up", lambda: _predict(predict, data["test_store"], path, provider,
                                                             p.infer_batch, cpu_threads(), limit=p.infer_batch),
                           provider=provider)
        if warm is None:
            continue
        for source in ("test_tifs", "test_store"):
            rec.measure("tta8", lambda: _predict(predict, data[source], path, provider, p.infer_batch,
                                                 cpu_threads()),
                        provider=provider, source="tifs" if source == "test_tifs" else "store")


def _predict(predict: Callable, src: Path, model: Path, provider: str, batch: int, workers: int,
             limit: Optional[int] = None) -> dict[str, Any]:
    if limit is not None:  # a warm-up on the first shard of about ``limit`` images
        from pcamtool.io.sources import ImageSource

        n = len(ImageSource(src))
        shard = (0, max(1, n // limit))
    else:
        shard = None
    t0 = time.perf_counter()
    pred = predict(src, [model], tta=8, batch_size=batch, provider=provider, shard=shard, workers=workers,
                   progress=False)
    seconds = time.perf_counter() - t0
    return {"images": len(pred.ids), "seconds": round(seconds, 2),
            "img_per_s": round(len(pred.ids) / seconds, 1), "ran_on": pred.providers}


def time_slides(rec: Recorder, data_dir: Path, run_dir: Optional[Path]) -> None:
    """``pcamtool slide`` over one synthetic slide per provider and TTA: tiles/s end to end, what ran."""
    from pcamtool.onnx_io import provider_problems

    try:
        import openslide  # noqa: F401
    except ImportError:
        rec.measure("slide", lambda: {"skipped": "no OpenSlide: pip install 'pcamtool[slides]'"})
        return
    model = run_dir / "model.onnx" if run_dir is not None else None
    if model is None or not model.is_file():
        rec.measure("slide", lambda: {"skipped": "no exported model (the infer stage did not finish)"})
        return
    p = rec.plan

    def make() -> dict[str, Any]:
        from pcamtool.synth.slide import write_repeated_slide

        path = data_dir / f"slide-{p.n_slide_tiles}.tif"
        if not path.is_file():
            write_repeated_slide(path, p.n_slide_tiles)
        return {"path": str(path)}

    made = rec.measure("slide data", make)
    if made is None:
        return
    problems = provider_problems()
    for provider in p.providers:   # what does not load is recorded first: it takes no time
        if problems[provider] is not None:
            rec.measure("slide", lambda: {"skipped": f"{provider} does not load: {problems[provider]}"},
                        provider=provider)
    for provider in (q for q in p.providers if problems[q] is None):
        for tta in ((1, 8) if provider != "cpu" else (1,)):   # TTA 8 on a CPU: 8x the time, nothing new
            rec.measure("slide", lambda: _slide(Path(made["path"]), model, provider, tta,
                                                data_dir / f"heatmaps-{provider}-{tta}"),
                        provider=provider, tta=tta)


def _slide(slide: Path, model: Path, provider: str, tta: int, out: Path) -> dict[str, Any]:
    from pcamtool.slide.run import SlideOptions, run_slides

    t0 = time.perf_counter()
    res = run_slides([slide], [model], out, SlideOptions(tta=tta), provider=provider, batch_size=512,
                     force=True, progress=False)
    seconds = time.perf_counter() - t0
    s = res.done[0]
    return {"tiles": s.tiles, "seconds": round(seconds, 2), "tiles_per_s": round(s.tiles / seconds, 1),
            "slide_seconds": s.seconds, "ran_on": res.providers}


def doctor_report(rec: Recorder) -> None:
    from pcamtool.doctor import diagnose

    def run() -> dict[str, Any]:
        report = diagnose()
        rec.results["doctor"] = report
        return {}

    rec.measure("doctor --json", run)


# ---------------------------------------------------------------- reporting

def machine_line(results: dict[str, Any]) -> str:
    doc = results.get("doctor", {})
    cpu = doc.get("cpu", {})
    flags = " ".join(f for f, on in cpu.get("flags", {}).items() if on) if isinstance(cpu, dict) else "?"
    gpus = doc.get("torch", {}).get("gpus", []) if isinstance(doc.get("torch"), dict) else []
    gpu = ", ".join(f"{g['name']} (cc {g['capability']}, {g['memory_gib']} GiB)" for g in gpus) or "none"
    return f"GPU: {gpu}; CPU: {cpu.get('model', '?')}, {cpu.get('threads', '?')} threads, flags: {flags or 'none'}"


def write_results(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``gpu-results.json`` (everything) and ``gpu-results.md`` (tables for people)."""
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "gpu-results.json", out / "gpu-results.md"
    js.write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = [f"# gpu-check results{' (CPU dry run)' if results['dry_run'] else ''}", "",
             f"{results['when']}, {results['total_s']} s in all (budget {TOTAL_BUDGET_S} s).", "",
             machine_line(results), ""]
    for m in results["measurements"]:
        if m["name"] == "synthetic data" and m.get("note"):
            lines += [f"Data: {m['note']}.", ""]
    heads = {"train epoch": ("cache", "batch_size", "compile", "img_per_s", "peak_gpu_mem_gib", "precision", "fit_wall_s"),
             "tta8": ("provider", "source", "images", "seconds", "img_per_s", "ran_on"),
             "slide": ("provider", "tta", "tiles", "seconds", "tiles_per_s", "ran_on")}
    for name, cols in heads.items():
        lines += [f"## {name}", "", "| " + " | ".join(cols) + " | note |", "|" + "---|" * (len(cols) + 1)]
        for m in results["measurements"]:
            if m["name"] == name:
                note = m.get("error") or m.get("skipped") or ""
                lines.append("| " + " | ".join(str(m.get(c, "")) for c in cols) + f" | {note} |")
        lines.append("")
    lines += ["## every step", "", "| stage | step | ok | wall s | detail |", "|---|---|---|---|---|"]
    for m in results["measurements"]:
        detail = m.get("error") or m.get("summary") or m.get("skipped") or ""
        lines.append(f"| {m['stage']} | {m['name']} | {m['ok']} | {m['wall_s']} | {detail} |")
    md.write_text("\n".join(lines) + "\n")
    return md, js


def gpu_missing() -> Optional[str]:
    """Why there is no NVIDIA GPU for torch here (None: there is)."""
    try:
        import torch
    except Exception as exc:
        return f"torch does not import ({exc})"
    if torch.cuda.is_available():
        return None
    return ("this torch is a CPU-only build" if torch.version.cuda is None
            else "no CUDA GPU is visible to torch")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="where gpu-results.{md,json} go (default: benchmarks/)")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "gpu-check",
                    help="cache of the synthetic data (reused by a rerun)")
    ap.add_argument("--dry-run", action="store_true",
                    help="the whole check on the CPU with a few hundred images and a tiny model")
    args = ap.parse_args(argv)
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    if not args.dry_run:
        why = gpu_missing()
        if why is not None:
            print(f"gpu-check: no NVIDIA GPU here ({why}); nothing to measure")
            return 0
    rec = Recorder(plan)
    rec.results.update(dry_run=args.dry_run, when=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                       python=platform.python_version(), plan={k: v for k, v in plan.__dict__.items()})
    args.data.mkdir(parents=True, exist_ok=True)
    # Import the heavy modules before any stage's time limit: a SIGALRM that
    # lands inside torch's first import leaves it half-registered, and every
    # later `import torch` then fails ("... already defined").
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401
    with rec.stage("doctor"):
        doctor_report(rec)
    with rec.stage("tests"):
        run_gpu_tests(rec)
    with rec.stage("data"):
        data = make_data(rec, args.data)
    with rec.stage("train"):
        run_dir = train_epochs(rec, data, args.data / "runs")
    with rec.stage("infer"):
        time_inference(rec, data, run_dir)
    with rec.stage("slides"):
        time_slides(rec, args.data, run_dir)
    rec.results["total_s"] = round(time.monotonic() - rec.start, 1)
    md, js = write_results(rec.results, args.out)
    failed = sum(not m["ok"] for m in rec.results["measurements"])
    print(f"gpu-check: wrote {md} and {js} in {rec.results['total_s']} s ({failed} step(s) failed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
