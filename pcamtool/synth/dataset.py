"""Writing a synthetic Kaggle-layout data set: ``pcamtool synth``.

Example::

    pcamtool synth data/synth --train 20000 --test 5000 --seed 0

writes ``train/<id>.tif``, ``train_labels.csv``, ``test/<id>.tif``,
``sample_submission.csv`` and the answer key ``test_labels.csv``, with tifs
byte-for-byte in the layout of Kaggle's (:mod:`.kaggle_tiff`).

How a patch is made
-------------------
Patches come from simulated *slides* (:mod:`.plan`): each slide draws its
stain vectors, stain strengths, defocus, noise and tumour phenotype once,
around the means of its staining *centre*; many patches share a slide. A
patch draws a tissue scene (lymphoid tissue, fibrous stroma, fat, glass at
tissue edges, ~1 % blank glass), optionally a tumour nest, and a list of
cells (lymphocytes, fibroblasts, histiocytes, tumour cells);
:mod:`.render` paints it through Beer-Lambert optical density.

The label follows the PatchCamelyon rule: 1 when the footprint of a tumour
cell reaches the central 32x32 square. Negatives may hold tumour off-centre,
so a model has to look at the centre. Train labels carry ~0.5 % flips
(annotation noise, ``LABEL_NOISE``); the test answer key is clean. The test
split comes from another staining centre than the train split, as Kaggle's
leaderboard did.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ExistsError, PcamError, few
from ..io.csvio import format_rows
from ..io.fsutil import atomic_path
from ..progress import progress_bar
from .kaggle_tiff import encode_tiff, patch_id
from .plan import seed64
from .split import iter_split

LABEL_NOISE = 0.005  # train only: enough to be realistic, little enough not to cap AUC (1.5% capped it near 0.97)
SPLITS = ("train", "test")
CSV_NAMES = ("train_labels.csv", "test_labels.csv", "sample_submission.csv")
# What synth writes into train/ and test/: <40 hex digits>.tif. ``force``
# replaces those folders only when they hold nothing else.
OWN_TIF = re.compile(r"[0-9a-f]{40}\.tif")
# Hidden names of our temporary folders: .train.<pid>.partial, .test.<pid>.old, ...
_TEMP_DIR = re.compile(r"\.(train|test)(\.\d+)?\.(partial|old)")


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate` wrote."""

    out: Path
    train_dir: Path
    test_dir: Path
    train_labels: Path
    test_labels: Path
    sample_submission: Path
    n_train: int
    n_test: int
    train_positive_fraction: float   # of the written (noisy) train labels
    test_positive_fraction: float    # of the answer key
    train_label_flips: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.n_train} train ({self.train_positive_fraction:.1%} positive, "
                f"{self.train_label_flips} noisy labels) + {self.n_test} test "
                f"({self.test_positive_fraction:.1%} positive) patches in {self.out} "
                f"({self.seconds:.1f} s)")


def _write_split(folder: Path, n: int, seed: int, split: str, bar,
                 workers: Optional[int]) -> tuple[list[str], np.ndarray]:
    ids: list[str] = []
    labels = np.zeros(n, np.int8)
    for part in iter_split(n, seed, split, workers=workers):
        for k, i in enumerate(part.index):
            pid = patch_id(seed, split, int(i))
            ids.append(pid)
            # One write per file: creating files is what this loop waits on.
            with open(folder / f"{pid}.tif", "wb") as fh:
                fh.write(encode_tiff(part.images[k]))
        labels[part.index] = part.labels
        bar.update(len(part.index))
    return ids, labels


def _is_leftover(name: str) -> bool:
    """A temporary name of ours (a killed run's), which never makes ``out`` count as used."""
    return bool(_TEMP_DIR.fullmatch(name)) or any(name.startswith(f".{c}") for c in CSV_NAMES)


def _remove_leftovers(root: Path) -> None:
    """Delete the temporary folders of killed runs.

    Called while this run holds the CSVs' output locks, so no other synth
    run can be writing into ``root``: every temporary folder there is dead.
    """
    for entry in root.iterdir():
        if _TEMP_DIR.fullmatch(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace ``folder`` unless all it holds is tifs named like synth's."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise PcamError(f"{folder}: exists and is not a folder synth wrote; move it away or choose another folder")
    foreign = sorted(e.name for e in os.scandir(folder) if not (OWN_TIF.fullmatch(e.name) and e.is_file()))
    if foreign:
        raise PcamError(f"{folder}: holds {len(foreign)} file(s) synth did not write ({few(foreign)}); "
                        "--force replaces only synth's own <40-hex id>.tif files: move them away first")


def _replace_folder(tmp: Path, final: Path) -> None:
    """Move the finished folder ``tmp`` onto ``final``, deleting the old one (checked replaceable)."""
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def generate(out: str | os.PathLike, n_train: int = 2000, n_test: int = 500, seed: int = 0,
             force: bool = False, progress: bool = True, workers: Optional[int] = None) -> SynthSummary:
    """Write a synthetic Kaggle-layout data set into ``out``.

    Parameters
    ----------
    out
        Output folder; created if missing.
    n_train, n_test
        Number of train and test patches (either may be 0).
    seed
        Same seed, same bytes.
    force
        Write into an existing non-empty ``out``, replacing its ``train/``,
        ``test/`` and the three CSVs (nothing else there is touched). The
        folders are replaced only if they hold nothing but tifs named like
        synth's (``<40 hex digits>.tif``).
    progress
        Show a progress bar on stderr.
    workers
        Painting threads (default: CPU count, at most 4); the bytes do not
        depend on it.

    Returns
    -------
    SynthSummary

    Raises
    ------
    ExistsError
        ``out`` exists, is not empty, and ``force`` is false.
    PcamError
        Negative counts; with ``force``, a ``train/`` or ``test/`` holding
        files synth would not have written.

    Notes
    -----
    Images go to hidden ``.train.<pid>.partial`` / ``.test.<pid>.partial``
    folders and the CSVs to temporary files; everything is renamed onto its
    final name only at the end, CSVs last, so a killed run leaves no half
    data set behind (and the next run deletes its leftovers). A second run
    into the same ``out`` while one writes is refused (``BusyError``).
    """
    t0 = time.perf_counter()
    if n_train < 0 or n_test < 0:
        raise PcamError(f"patch counts must be >= 0 (got train={n_train}, test={n_test})")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise PcamError(f"{root}: exists and is not a folder")
    if root.exists() and not force and any(not _is_leftover(p.name) for p in root.iterdir()):
        raise ExistsError(root)
    for s in SPLITS:
        _check_replaceable(root / s)
    root.mkdir(parents=True, exist_ok=True)

    with ExitStack() as stack:
        # Entered first, so renamed last: the CSVs are what marks a data set complete. Their
        # output locks also refuse a second synth run into the same folder while this one writes.
        csv_tmp = {name: stack.enter_context(atomic_path(root / name, force=True)) for name in CSV_NAMES}
        _remove_leftovers(root)
        tmp_dirs = {s: root / f".{s}.{os.getpid()}.partial" for s in SPLITS}
        try:
            for d in tmp_dirs.values():
                d.mkdir()
            with progress_bar(total=n_train + n_test, desc="synth", unit="img", enabled=progress) as bar:
                train_ids, train_y = _write_split(tmp_dirs["train"], n_train, seed, "train", bar, workers)
                test_ids, test_y = _write_split(tmp_dirs["test"], n_test, seed, "test", bar, workers)
        except BaseException:
            for d in tmp_dirs.values():
                shutil.rmtree(d, ignore_errors=True)
            raise

        # Annotation noise on the train labels only: the answer key stays the truth.
        flips = np.random.default_rng([seed64(seed), 5]).random(n_train) < LABEL_NOISE
        train_noisy = np.where(flips, 1 - train_y, train_y)
        texts = {
            "train_labels.csv": format_rows(train_ids, train_noisy.tolist()),
            "test_labels.csv": format_rows(test_ids, test_y.tolist()),
            "sample_submission.csv": format_rows(test_ids, [0] * len(test_ids)),
        }
        for name, text in texts.items():
            csv_tmp[name].write_text(text, encoding="utf-8")
        for s, d in tmp_dirs.items():
            _replace_folder(d, root / s)

    return SynthSummary(
        out=root, train_dir=root / "train", test_dir=root / "test",
        train_labels=root / "train_labels.csv", test_labels=root / "test_labels.csv",
        sample_submission=root / "sample_submission.csv", n_train=n_train, n_test=n_test,
        train_positive_fraction=float(train_noisy.mean()) if n_train else 0.0,
        test_positive_fraction=float(test_y.mean()) if n_test else 0.0,
        train_label_flips=int(flips.sum()), seconds=time.perf_counter() - t0,
    )
