"""Train/validation splits: stratified, K-fold, or grouped by slide.

Random splits of PCam leak slides (neighbouring patches of one slide land on
both sides), so a CSV mapping ids to groups, or the slide ids a store packed
from PCam's files carries (:func:`resolve_groups`), switches to grouped splitting.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import numpy as np

from ..errors import PcamError

log = logging.getLogger("pcamtool")


def read_groups(path: str | os.PathLike, ids: np.ndarray) -> np.ndarray:
    """Group label of every id from an ``id,group`` CSV (every id must be present)."""
    import csv

    if os.path.isdir(path):
        raise PcamError(f"{path}: is a folder, expected an id,group CSV file")
    groups: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip().lower() for h in next(reader, [])]
            if "id" not in header or "group" not in header:
                raise PcamError(f"{path}: header is {','.join(header)[:60]!r}, expected 'id,group'")
            ci, cg = header.index("id"), header.index("group")
            for row in reader:
                if not row:
                    continue
                if len(row) <= max(ci, cg):
                    raise PcamError(f"{path}: line {reader.line_num} has {len(row)} field(s), "
                                    f"expected {len(header)} (id,group)")
                groups[row[ci].strip()] = row[cg].strip()
    except (UnicodeDecodeError, csv.Error) as exc:  # a binary file given by mistake
        raise PcamError(f"{path}: not an id,group CSV text file ({exc.__class__.__name__}: "
                        f"{str(exc)[:80]})") from None
    except FileNotFoundError:
        raise PcamError(f"{path}: groups file not found") from None
    except OSError as exc:
        raise PcamError(f"{path}: cannot read the groups file ({exc.strerror})") from None
    missing = [i for i in ids if i not in groups]
    if missing:
        raise PcamError(f"{path}: no group for {len(missing)} id(s), e.g. {missing[0]}")
    return np.array([groups[i] for i in ids])


def resolve_groups(store: Any, groups_path: Optional[str | os.PathLike]) -> Optional[np.ndarray]:
    """The group of every row of ``store``: from an ``id,group`` CSV, else what the store itself carries (or None).

    An ``id,group`` file (``--groups``) wins; else the slide ids a store
    packed from PCam's files carries (:attr:`pcamtool.io.store.Store.groups`);
    else None (a stratified random split). The choice is logged: a random
    split of PCam puts patches of one slide on both sides, and validation
    then flatters the model.
    """
    if groups_path:
        groups = read_groups(groups_path, store.ids)
        log.info("splitting by the %d groups of %s", len(np.unique(groups)), groups_path)
        return groups
    groups = getattr(store, "groups", None)
    if groups is not None:
        log.info("splitting by slide: %d slides recorded in %s (a random split would put patches of one "
                 "slide on both sides and leak; --groups FILE overrides)", len(np.unique(groups)),
                 getattr(store, "path", "the store"))
    return groups


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
    counts = np.bincount(y.clip(0), minlength=2)
    if counts.min() < 2:
        raise PcamError("need at least 2 images of each class to split off validation data")
    rarer = "positive" if counts[1] < counts[0] else "negative"
    if folds is not None:
        if not 2 <= folds:
            raise PcamError(f"--folds must be at least 2, got {folds}")
        if not 0 <= fold < folds:
            raise PcamError(f"--fold {fold} is not one of the {folds} folds (0 to {folds - 1})")
        # Every fold validates on images of both classes (an AUC needs both):
        # the rarer class's count is the real limit, not the row count.
        if folds > counts.min():
            raise PcamError(f"--folds {folds}: the store has {int(counts.min()):,} {rarer} images, and every "
                            f"fold needs at least one of each class (use --folds {int(counts.min())} or fewer)")
        k = folds
    else:
        if not 0.0 < val_frac < 1.0:
            raise PcamError(f"--val-frac must be between 0 and 1, got {val_frac}")
        k = max(2, round(1 / val_frac))
        n_val = int(np.ceil(val_frac * len(y)))
        if groups is None and not (2 <= n_val <= len(y) - 2):
            raise PcamError(f"--val-frac {val_frac}: {n_val} of {len(y)} images would validate; both sides "
                            f"need at least one image of each class (2 or more)")
    if groups is not None:
        n_groups = len(np.unique(groups))
        how = f"--folds {folds}" if folds is not None else f"--val-frac {val_frac} (1/{k})"
        if n_groups < k:
            raise PcamError(f"--groups: {n_groups} groups cannot make {k} folds for {how}; every fold needs "
                            f"at least one group (use fewer folds, a larger --val-frac, or finer groups)")
        per_class = [len(np.unique(np.asarray(groups)[y.clip(0) == c])) for c in (0, 1)]
        with_class = min(per_class)
        if with_class < k:
            which = "positive" if per_class[1] < per_class[0] else "negative"
            raise PcamError(f"--groups: only {with_class} groups hold {which} images, so {k} folds for {how} "
                            f"cannot each validate on both classes (use at most {with_class} folds, or finer groups)")
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = list(splitter.split(idx, y, groups))
    elif folds is not None:
        splits = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(idx, y))
    else:
        sss = StratifiedShuffleSplit(n_splits=1, test_size=val_frac, random_state=seed)
        return next(sss.split(idx, y))
    return splits[fold if folds is not None else 0]
