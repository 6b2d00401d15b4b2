"""The first-run compile notice of pcamtool/kernels/jit.py.

Each case runs in a fresh process with its own NUMBA_CACHE_DIR, so "cold"
and "warm" mean numba's disk cache, exactly as a user's first and second run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pcamtool.kernels.jit import COMPILE_NOTICE

# Two kernels called twice each: one notice per process, however many compile.
SCRIPT = """
import logging, sys
import numpy as np
logging.basicConfig(level=logging.{level}, stream=sys.stderr, format="%(message)s")
from pcamtool.kernels.stats import channel_sums, lerp_quantile
images = np.arange(2 * 96 * 96 * 3, dtype=np.uint64).astype(np.uint8).reshape(2, 96, 96, 3)
for _ in range(2):
    sums = np.zeros(3, np.uint64); sq = np.zeros(3, np.uint64)
    channel_sums(images, np.ones(2, np.bool_), sums, sq)
    lerp_quantile(1.0, 3.0, 0.25)
print(int(sums.sum()))
"""


def run_python(cache: Path, level: str = "INFO") -> subprocess.CompletedProcess:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    env.pop("PCAMTOOL_NUMBA", None)
    return subprocess.run([sys.executable, "-c", SCRIPT.format(level=level)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_cold_cache_says_compiling_once_and_warm_cache_is_silent(tmp_path: Path) -> None:
    cold = run_python(tmp_path / "cache")
    assert cold.returncode == 0, cold.stderr
    assert cold.stderr.count(COMPILE_NOTICE) == 1, cold.stderr
    assert COMPILE_NOTICE not in cold.stdout            # stdout is data only
    assert cold.stdout.strip() == str(int((np.arange(2 * 96 * 96 * 3) % 256).sum()))  # the kernel ran
    assert any((tmp_path / "cache").rglob("*.nbi"))     # the kernels were cached

    warm = run_python(tmp_path / "cache")
    assert warm.returncode == 0, warm.stderr
    assert COMPILE_NOTICE not in warm.stderr
    assert warm.stdout == cold.stdout


def test_quiet_logging_hides_the_notice(tmp_path: Path) -> None:
    quiet = run_python(tmp_path / "cache", level="WARNING")
    assert quiet.returncode == 0, quiet.stderr
    assert "compiling" not in quiet.stderr
    assert any((tmp_path / "cache").rglob("*.nbi"))     # it did compile, silently


@pytest.mark.slow
def test_first_pack_announces_the_compile_and_the_second_does_not(kaggle) -> None:
    root, ids, _, _ = kaggle
    env = {**os.environ, "NUMBA_CACHE_DIR": str(root / "numba-cache")}
    env.pop("PCAMTOOL_NUMBA", None)
    cmd = [sys.executable, "-m", "pcamtool", "pack", str(root / "train")]
    first = subprocess.run(cmd + ["-o", str(root / "a.h5")], env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count(COMPILE_NOTICE) == 1
    # The notice is a line of its own, not glued to the progress bar.
    assert any(line.strip() == COMPILE_NOTICE for line in first.stderr.replace("\r", "\n").splitlines())

    second = subprocess.run(cmd + ["-o", str(root / "b.h5")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert COMPILE_NOTICE not in second.stderr
    assert f"{len(ids):,} images" in second.stderr
