"""Small Kaggle-layout data made in a test's own folder (shared by tests, not fixtures)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import tifffile

# The real Kaggle sample (train/ + train_labels.csv): PCAMTOOL_REAL_DIR, else
# ../shared/pcam-real beside the repository. Tests that need it skip without it.
REAL_DIR_VARIABLE = "PCAMTOOL_REAL_DIR"
REAL = Path(os.environ.get(REAL_DIR_VARIABLE)
            or Path(__file__).resolve().parents[1].parent / "shared" / "pcam-real").expanduser()


def make_id(i: int, salt: str = "t") -> str:
    return hashlib.sha1(f"{salt}{i}".encode()).hexdigest()


def random_patches(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)


def write_kaggle(root: Path, n: int = 40, seed: int = 0, split: str = "train",
                 labels: bool = True) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Write ``root/<split>/<id>.tif`` (+ ``<split>_labels.csv``) like Kaggle's files."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images = random_patches(n, seed)
    ids = [make_id(i, f"{split}{seed}") for i in range(n)]
    y = (np.arange(n) % 5 < 2).astype(np.int8)
    for i, img in zip(ids, images):
        tifffile.imwrite(folder / f"{i}.tif", img, photometric="rgb")
    if labels:
        rows = "\n".join(f"{i},{int(v)}" for i, v in zip(ids, y))
        (root / f"{split}_labels.csv").write_text(f"id,label\n{rows}\n")
    return ids, images, y


def default_sigint() -> None:
    """``preexec_fn`` for a child that is to be Ctrl-C'd: SIGINT back to its default.

    A test run started in the background of a non-interactive shell (as CI
    may be) inherits SIGINT *ignored*, and Python then installs no
    KeyboardInterrupt handler, so the child would never see the signal.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_store(path: Path, labels, ids=None, stain: dict | None = None) -> Path:
    """A store of ``len(labels)`` random patches written directly (no pack); a label of -1 is unlabelled."""
    from pcamtool.io.store import StoreWriter

    n = len(labels)
    attrs = {"mean": np.zeros(3), "std": np.ones(3), "count": n}
    if stain is not None:
        attrs["stain"] = json.dumps(stain)
    with StoreWriter(path, n) as w:
        w.write(random_patches(n))
        w.finish(list(ids) if ids is not None else [f"r{i}" for i in range(n)], np.asarray(labels, np.int8), attrs)
    return path
