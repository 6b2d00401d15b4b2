"""Stain normalization: numba kernels (2 threads) vs a per-image numpy loop, same patches.

Target: >= 20x images/s. Run: ``.venv/bin/pytest benchmarks/bench_stain.py -q``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from pcamtool.stain import fit_reference, normalize

# The baseline is the tests' numpy oracle: one copy of those formulas, in tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracles import macenko_numpy, reinhard_numpy  # noqa: E402

from helpers import REAL as _REAL_SAMPLE  # noqa: E402  (honours PCAMTOOL_REAL_DIR)

REAL = _REAL_SAMPLE / "train"
N = 256
RATES: dict[str, float] = {}


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    if REAL.is_dir():
        files = sorted(REAL.glob("*.tif"))[:N]
        return np.stack([tifffile.imread(f) for f in files])
    rng = np.random.default_rng(0)  # fallback: H&E-ish colours
    return np.clip(rng.normal([180, 120, 190], 40, (N, 96, 96, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_stain_numba(benchmark, patches, method):
    ref = fit_reference(patches, method)
    normalize(patches[:4], ref)  # load the compiled kernels
    benchmark.pedantic(lambda: normalize(patches, ref, workers=2), rounds=3, warmup_rounds=1)
    RATES[f"{method}-numba"] = N / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = RATES[f"{method}-numba"]


@pytest.mark.parametrize("method", ["reinhard", "macenko"])
def test_stain_numpy_loop(benchmark, patches, method):
    ref = fit_reference(patches, method)
    fn = reinhard_numpy if method == "reinhard" else macenko_numpy
    sub = patches[:64]
    benchmark.pedantic(lambda: [fn(p, ref) for p in sub], rounds=2, warmup_rounds=0)
    rate = len(sub) / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = rate
    if f"{method}-numba" in RATES:
        benchmark.extra_info["numba_speedup"] = RATES[f"{method}-numba"] / rate
        print(f"\n{method}: numba {RATES[f'{method}-numba']:.0f} img/s vs numpy loop {rate:.0f} img/s "
              f"= {RATES[f'{method}-numba'] / rate:.1f}x")
