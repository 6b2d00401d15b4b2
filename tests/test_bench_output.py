"""`make bench` output: the machine first, then one line per benchmark with its figures."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_prints_the_cpu_features_first_and_a_line_per_benchmark(tmp_path: Path) -> None:
    # -q as `make bench` passes it; a missing real sample makes bench_stain use its fallback patches.
    env = {**os.environ, "PCAMTOOL_REAL_DIR": str(tmp_path / "no-sample")}
    res = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_stain.py", "-q",
                          "-p", "no:cacheprovider", "-k", "numba"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    cpu = next(i for i, line in enumerate(lines) if line.startswith("CPU: "))
    assert cpu == 0, lines[:3]                              # the very first line
    assert lines[1].startswith("training precision on this CPU: ")
    first_bench = next(i for i, line in enumerate(lines) if "bench_stain.py::" in line)
    assert cpu < first_bench
    assert re.search(r"features: AVX2 (yes|no), AVX-512 (yes|no), VNNI (yes|no), BF16 (yes|no), AMX (yes|no)", lines[cpu])
    for method in ("reinhard", "macenko"):
        line = next(line for line in lines if f"test_stain_numba[{method}]" in line)
        assert re.search(r"PASSED in [0-9.]+ s: best round [0-9.,]+ ms; img_per_s [0-9.,]+", line), line
    assert not any(re.fullmatch(r"\.+\s*(\[\s*\d+%\])?", line.strip()) for line in lines)  # no rows of dots
