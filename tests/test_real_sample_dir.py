"""PCAMTOOL_REAL_DIR: the real-sample tests read the folder it names."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import write_kaggle

TESTS = Path(__file__).resolve().parent
# A real-sample test that any Kaggle-layout folder of tifffile-written patches passes.
REAL_TEST = "tests/test_tiff.py::test_real_files_pixel_exact"


def run_pytest(real_dir: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PCAMTOOL_REAL_DIR": real_dir}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", REAL_TEST],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300)


def test_real_sample_tests_read_the_folder_named_by_the_variable(tmp_path: Path) -> None:
    write_kaggle(tmp_path, n=12)
    res = run_pytest(str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout and "skipped" not in res.stdout


def test_a_variable_naming_no_sample_stops_the_run_in_one_line(tmp_path: Path) -> None:
    res = run_pytest(str(tmp_path / "nowhere"))
    assert res.returncode == 4, res.stdout + res.stderr   # pytest's usage error: nothing ran
    assert f"PCAMTOOL_REAL_DIR={tmp_path / 'nowhere'}: no train/ folder there" in res.stderr
    assert "passed" not in res.stdout
