"""Train/validation splits: stratified, K-fold, or grouped by slide.

Random splits of PCam leak slides (neighbouring patches of one slide land on
both sides), so a CSV mapping ids to groups switches to grouped splitting.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ..errors import PcamError


def read_groups(path: str | os.PathLike, ids: np.ndarray) -> np.ndarray:
    """Group label of every id from an ``id,group`` CSV (every id must be present)."""
    import csv

    groups: dict[str, str] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        if "id" not in header or "group" not in header:
            raise PcamError(f"{path}: header is {','.join(header)!r}, expected 'id,group'")
        ci, cg = header.index("id"), header.index("group")
        for row in reader:
            if row:
                groups[row[ci].strip()] = row[cg].strip()
    missing = [i for i in ids if i not in groups]
    if missing:
        raise PcamError(f"{path}: no group for {len(missing)} id(s), e.g. {missing[0]}")
    return np.array([groups[i] for i in ids])


def make_split(labels: np.ndarray, val_frac: float = 0.2, seed: int = 0,
               folds: Optional[int] = None, fold: int = 0,
               groups: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)``, stratified by label (and disjoint by group if given).

    ``folds=K`` takes fold ``fold`` of a stratified K-fold; otherwise a
    stratified ``val_frac`` hold-out.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, StratifiedShuffleSplit

    y = np.asarray(labels)
    idx = np.arange(len(y))
    if np.bincount(y.clip(0), minlength=2).min() < 2:
        raise PcamError("need at least 2 images of each class to split off validation data")
    if folds is not None:
        if not 2 <= folds <= len(y) or not 0 <= fold < folds:
            raise PcamError(f"--folds {folds} --fold {fold}: need 2 <= folds and 0 <= fold < folds")
        k = folds
    else:
        if not 0.0 < val_frac < 1.0:
            raise PcamError(f"--val-frac must be between 0 and 1, got {val_frac}")
        k = max(2, round(1 / val_frac))
    if groups is not None:
        n_groups = len(np.unique(groups))
        if n_groups < k:
            how = f"--folds {folds}" if folds is not None else f"--val-frac {val_frac} (1/{k})"
            raise PcamError(f"--groups: {n_groups} groups cannot make {k} folds for {how}; every fold needs "
                            f"at least one group (use fewer folds, a larger --val-frac, or finer groups)")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = list(splitter.split(idx, y, groups))
    elif folds is not None:
        splits = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(idx, y))
    else:
        sss = StratifiedShuffleSplit(n_splits=1, test_size=val_frac, random_state=seed)
        return next(sss.split(idx, y))
    return splits[fold if folds is not None else 0]
