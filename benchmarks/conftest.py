"""Shared benchmark data, warm-up, and the end-of-run ratio table.

Speed claims in this project are ratios between methods timed in one run on
the same (page-cached) files, never absolute timings asserted in tests: the
benchmark machines are small and shared, so only ratios travel.

Run with::

    .venv/bin/pytest benchmarks -q            # or: make bench
    .venv/bin/pytest benchmarks/bench_pack.py -q

The machine (CPU model, features, torch's kernel ISA, training precision)
is printed first at any verbosity, and every benchmark gets a line of its own
with its figures as it ends (-q and the default verbosity are raised to -v
here; -qq keeps the dots). Each benchmark stores its throughput in
``benchmark.extra_info`` and in a run-wide table (the ``record`` fixture); at
the end of the session the table and the ratios against the targets are
printed under "pcamtool benchmark ratios".
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import tifffile

# The real Kaggle sample: PCAMTOOL_REAL_DIR, else ../shared/pcam-real beside
# the repository (the same rule as tests/helpers.py).
REAL = Path(os.environ.get("PCAMTOOL_REAL_DIR")
            or Path(__file__).resolve().parents[1].parent / "shared" / "pcam-real").expanduser()

N_GENERATED = 3000    # tifs timed by bench_pack
N_STORE = 6000        # rows of the store timed by bench_store

# Targets the ratio table checks against (see benchmarks/RESULTS.md).
TARGETS = {
    ("pack", "pack", "raw floor"): 0.5,
    ("pack", "pack", "PIL loop"): 5.0,
    ("store", "Store.gather", "numpy arr[idx]"): 0.5,
}


# --------------------------------------------------------------------------
# Header: the machine, so that every table of ratios says where it came from.

# doctor's /proc/cpuinfo flag -> the feature name the tables use
_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx512_bf16": "BF16", "amx_tile": "AMX"}


def machine_line() -> str:
    """``CPU: <model>, N threads; features: AVX2 yes, ...; torch CPU precision: fp32 (reason)``."""
    from pcamtool.device import Precision
    from pcamtool.doctor import cpu_info

    info = cpu_info()
    found = ", ".join(f"{name} {'yes' if info['flags'].get(flag) else 'no'}" for flag, name in _FEATURES.items())
    try:
        import torch

        isa = f"; torch kernels: {torch.backends.cpu.get_cpu_capability()}"
    except Exception:  # an old torch without the probe: the flags above still say it
        isa = ""
    precision = Precision.for_device("cpu")
    return (f"CPU: {info['model']}, {info['threads']} threads; features: {found}{isa}\n"
            f"training precision on this CPU: {precision.reason or precision.name}")


def pytest_configure(config: pytest.Config) -> None:
    # Benchmarks run for minutes: a row of dots says nothing. At the default
    # verbosity and at -q (what `make bench` passes) every benchmark gets its
    # own line with its figures; -qq still silences them.
    if config.option.verbose in (-1, 0):
        config.option.verbose = 1


def pytest_sessionstart(session: pytest.Session) -> None:
    # The machine heads every set of figures, before pytest's own header and
    # at any verbosity (pytest_report_header is hidden by -q). The terminal
    # reporter's own session start runs last, so these are the first lines.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for line in machine_line().splitlines():
            reporter.write_line(line)


# --------------------------------------------------------------------------
# Collection: the files are named bench_*.py, which pytest's default pattern
# (test_*.py, and pyproject.toml sets no other) would skip when it is given
# the folder. A file named on the command line is collected by pytest itself,
# so only the others are added here (adding both would run them twice).

def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Optional[pytest.Module]:
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


# --------------------------------------------------------------------------
# Data

@dataclass(frozen=True)
class Dataset:
    """A Kaggle-layout folder of tifs and its sorted file list."""

    name: str
    folder: Path
    paths: list[str]


def make_id(i: int, salt: str) -> str:
    """A 40-hex id like Kaggle's."""
    return hashlib.sha1(f"{salt}{i}".encode()).hexdigest()


def write_tifs(folder: Path, n: int, seed: int) -> list[str]:
    """Write ``n`` 96x96 RGB tifs the way Kaggle's were written (tifffile, one strip).

    The content is smooth colour plus noise: the decoder copies bytes, so
    only the layout matters for speed, but a real-looking histogram keeps the
    statistics kernel honest.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:96, 0:96].astype(np.float32) / 96
    paths = []
    for i in range(n):
        base = rng.uniform(120, 230, 3).astype(np.float32)
        tilt = rng.uniform(-40, 40, (2, 3)).astype(np.float32)
        img = base + yy[..., None] * tilt[0] + xx[..., None] * tilt[1]
        img += rng.normal(0, 18, (96, 96, 3)).astype(np.float32)
        p = folder / f"{make_id(i, f'bench{seed}')}.tif"
        tifffile.imwrite(p, np.clip(img, 0, 255).astype(np.uint8), photometric="rgb")
        paths.append(str(p))
    return sorted(paths)


def warm_files(paths: list[str]) -> int:
    """Read every file once so that timings measure page-cached reads; returns bytes read."""
    total = 0
    for p in paths:
        with open(p, "rb") as fh:
            total += len(fh.read())
    return total


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """``N_GENERATED`` freshly written tifs in a temporary folder."""
    folder = tmp_path_factory.mktemp("generated") / "train"
    paths = write_tifs(folder, N_GENERATED, seed=1)
    warm_files(paths)
    return Dataset("generated", folder, paths)


@pytest.fixture(scope="session")
def real() -> Dataset:
    """The real Kaggle sample ``$PCAMTOOL_REAL_DIR/train`` (default ``../shared/pcam-real``; read in place, never written)."""
    folder = REAL / "train"
    if not folder.is_dir():
        pytest.skip(f"real sample {folder} not present")
    paths = sorted(str(p) for p in folder.glob("*.tif"))
    if not paths:
        pytest.skip(f"real sample {folder} holds no tifs")
    warm_files(paths)
    return Dataset("real", folder, paths)


@pytest.fixture(params=["generated", "real"])
def dataset(request: pytest.FixtureRequest) -> Dataset:
    """Each benchmark of bench_pack runs once per data set."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def warm_numba(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One small pack, so kernel loading (numba's disk cache) and h5py set-up are not timed."""
    from pcamtool.io.pack import pack

    root = tmp_path_factory.mktemp("warm")
    write_tifs(root / "train", 64, seed=2)
    pack(root / "train", out=root / "warm.h5", workers=2, chunk=16, progress=False)


@pytest.fixture(scope="session")
def packed_store(tmp_path_factory: pytest.TempPathFactory, warm_numba: None) -> Path:
    """An uncompressed store of ``N_STORE`` generated rows (default chunking), in page cache."""
    from pcamtool.io.pack import pack

    root = tmp_path_factory.mktemp("store")
    write_tifs(root / "train", N_STORE, seed=3)
    res = pack(root / "train", out=root / "train.h5", workers=2, progress=False)
    warm_files([str(res.path)])
    return res.path


# --------------------------------------------------------------------------
# Results: one line per benchmark as it ends, and one table per run, printed
# with the ratios at the end.

_RATES = pytest.StashKey[dict]()
_NODE_RATES = pytest.StashKey[list]()   # "method rate unit" of one benchmark, for its line


def _summary(item: pytest.Item) -> str:
    """What one benchmark measured: its recorded rates, else pytest-benchmark's best round."""
    rates = item.stash.get(_NODE_RATES, [])
    if rates:
        return "; ".join(rates)
    bench = getattr(item, "funcargs", {}).get("benchmark")
    parts = []
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    if stats is not None and getattr(stats, "rounds", 0):
        parts.append(f"best round {stats.min * 1e3:,.1f} ms")
    for key, value in (getattr(bench, "extra_info", None) or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{key} {_fmt(value)}")
    return "; ".join(parts)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if call.when == "call" and report.passed:
        report.bench_summary = _summary(item)  # type: ignore[attr-defined]
    return report


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):
    if report.when == "call" and report.passed and hasattr(report, "bench_summary"):
        figures = f": {report.bench_summary}" if report.bench_summary else ""
        return "passed", ".", f"PASSED in {report.duration:.1f} s{figures}"
    return None


class Recorder:
    """Collects throughputs into the run-wide table printed at the end.

    The table is ``{(area, case): {method: (best/s, median/s, unit)}}``.
    (A fixture, not an import: bench modules importing ``conftest`` would
    clash with ``tests/conftest.py`` when both folders run in one session.)
    """

    def __init__(self, table: dict, lines: Optional[list] = None) -> None:
        self.table = table
        self.lines = lines if lines is not None else []

    def __call__(self, benchmark, area: str, case: str, method: str,
                 amount: float, unit: str = "images/s") -> float:
        """Store the throughput of a finished benchmark; returns the best rate.

        ``amount`` is what one timed call processes (images, or GB for kernels).
        The best (minimum-time) round is the headline figure: on a shared
        machine noise only ever adds time. The median is kept beside it.
        """
        stats = benchmark.stats.stats
        best, median = amount / stats.min, amount / stats.median
        benchmark.extra_info["rate_unit"] = unit
        benchmark.extra_info["rate_best"] = round(best, 3)
        benchmark.extra_info["rate_median"] = round(median, 3)
        return self.rate(area, case, method, best, median, unit)

    def rate(self, area: str, case: str, method: str, best: float, median: float,
             unit: str = "images/s") -> float:
        """Store rates timed without pytest-benchmark (e.g. variants timed in turns); returns ``best``."""
        self.table.setdefault((area, case), {})[method] = (best, median, unit)
        self.lines.append(f"{case} {method} {_fmt(best)} {unit}")
        return best


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Recorder:
    """``record(benchmark, area, case, method, amount, unit)`` after a benchmark ran."""
    return Recorder(request.config.stash.setdefault(_RATES, {}), request.node.stash.setdefault(_NODE_RATES, []))


@pytest.fixture
def record_rate(request: pytest.FixtureRequest) -> Callable[..., float]:
    """``record_rate(area, case, method, best, median, unit)``: a rate timed by the benchmark itself."""
    return Recorder(request.config.stash.setdefault(_RATES, {}), request.node.stash.setdefault(_NODE_RATES, [])).rate


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.2f}"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    table: dict = config.stash.get(_RATES, {})
    if not table:
        return
    tr = terminalreporter
    tr.section("pcamtool benchmark ratios (best round; median in brackets)")
    for (area, case), methods in sorted(table.items()):
        tr.write_line(f"[{area} / {case}]")
        for method, (best, median, unit) in methods.items():
            tr.write_line(f"  {method:<28} {_fmt(best):>10} {unit}  ({_fmt(median)})")
        for (t_area, num, den), target in TARGETS.items():
            if t_area == area and num in methods and den in methods:
                r_best = methods[num][0] / methods[den][0]
                r_med = methods[num][1] / methods[den][1]
                verdict = "met" if r_best >= target else "MISSED"
                tr.write_line(f"  ratio {num} / {den}: {r_best:.2f}x ({r_med:.2f}x)"
                              f"  target >= {target}x: {verdict}")
        # Ratios without a target, for the record.
        names = list(methods)
        if area == "stats" and len(names) >= 2:
            tr.write_line(f"  ratio {names[0]} / {names[1]}: "
                          f"{methods[names[0]][0] / methods[names[1]][0]:.2f}x")
        if area == "store" and "Store.gather" in methods and "h5py ds[sorted idx]" in methods:
            tr.write_line(f"  ratio Store.gather / h5py: "
                          f"{methods['Store.gather'][0] / methods['h5py ds[sorted idx]'][0]:,.0f}x")
    tr.write_line(f"(cores usable: {len(os.sched_getaffinity(0))}; load average: "
                  f"{', '.join(f'{x:.2f}' for x in os.getloadavg())})")


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory: pytest.TempPathFactory):
    """The default network with random weights (speed, not accuracy): ``(net, fp32 ONNX path)``."""
    import torch

    from pcamtool.contract import Classifier
    from pcamtool.export import export_onnx
    from pcamtool.models import DEFAULT_MODEL, create_model
    from pcamtool.train.runs import save_checkpoint

    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    mean, std = [0.70, 0.55, 0.70], [0.24, 0.28, 0.22]
    net = Classifier(create_model(DEFAULT_MODEL), mean, std).eval()
    save_checkpoint(root / "m.pt", {"model": {"name": DEFAULT_MODEL, "kwargs": {}}, "weights": net.state_dict(),
                                    "mean": mean, "std": std, "stain": {"method": "none"}, "store": {},
                                    "val_auc": 0.5})
    return net, export_onnx(root / "m.pt", root / "m.onnx").path
