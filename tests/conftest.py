"""Shared fixtures: tiny Kaggle-layout data made in tmp_path, and the real sample when present."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REAL, write_kaggle


@pytest.fixture
def kaggle(tmp_path: Path):
    """A small labelled Kaggle-layout train folder: (root, ids, images, labels)."""
    ids, images, y = write_kaggle(tmp_path)
    return tmp_path, ids, images, y


@pytest.fixture
def real_dir() -> Path:
    if not (REAL / "train").is_dir():
        pytest.skip("real sample ../shared/pcam-real not present")
    return REAL


@pytest.fixture
def no_curves(monkeypatch):
    """Training tests that do not look at curves.png skip its quarter second of matplotlib per epoch."""
    import pcamtool.train.loop as loop

    monkeypatch.setattr(loop, "plot_curves", lambda *a, **k: None)
