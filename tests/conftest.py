"""Shared fixtures: tiny Kaggle-layout data made in tmp_path, and the real sample when present.

The real sample is ``../shared/pcam-real`` beside the repository, or the folder
named by ``PCAMTOOL_REAL_DIR`` (it must hold ``train/`` and ``train_labels.csv``).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import REAL, REAL_DIR_VARIABLE, write_kaggle


def pytest_sessionstart(session: pytest.Session) -> None:
    # A folder named on purpose that is not there is a mistake to stop on,
    # not a reason to skip the real-sample tests quietly.
    if os.environ.get(REAL_DIR_VARIABLE) and not (REAL / "train").is_dir():
        raise pytest.UsageError(f"{REAL_DIR_VARIABLE}={REAL}: no train/ folder there "
                                f"(point it at the folder holding train/ and train_labels.csv)")


@pytest.fixture
def kaggle(tmp_path: Path):
    """A small labelled Kaggle-layout train folder: (root, ids, images, labels)."""
    ids, images, y = write_kaggle(tmp_path)
    return tmp_path, ids, images, y


@pytest.fixture
def real_dir() -> Path:
    if not (REAL / "train").is_dir():
        pytest.skip(f"real sample {REAL} not present (set {REAL_DIR_VARIABLE} to its folder)")
    return REAL


@pytest.fixture
def no_curves(monkeypatch):
    """Training tests that do not look at curves.png skip its quarter second of matplotlib per epoch."""
    import pcamtool.train.loop as loop

    monkeypatch.setattr(loop, "plot_curves", lambda *a, **k: None)


@pytest.fixture
def small_disk(tmp_path):
    """A real full disk to write onto: a 1 MiB tmpfs (root only; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
