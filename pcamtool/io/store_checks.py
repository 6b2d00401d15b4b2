"""The checks a store passes on every open: attributes, ids, labels, counts, chunks inside the file.

All of them together cost ~10 ms on the full Kaggle train set (220,025
rows), so :func:`pcamtool.io.store.open_store` runs them always and a damaged
or foreign store fails there in one line, never later in a kernel.
``pcamtool info --check`` adds what needs the pixels (:mod:`pcamtool.info`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import PcamError, StoreError, few


def _finite(value: Any, shape: tuple[int, ...]) -> Optional[np.ndarray]:
    """``value`` as a float64 array of ``shape`` with only finite numbers, else None."""
    try:
        arr = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == shape and bool(np.isfinite(arr).all()) else None


def _stat_attr(path: Path, attrs: dict[str, Any], name: str) -> None:
    value = attrs.get(name)
    arr = _finite(value, (3,))
    if arr is None or (name == "std" and (arr < 0).any()):
        what = "missing" if value is None else repr(_plain(value))
        raise StoreError(f"{path}: attribute {name!r} is {what}, expected 3 finite numbers (repack the store)")


def _check_stain(path: Path, raw: Any) -> None:
    from ..stain import StainReference   # the one owner of the parameter layout (no kernels imported)

    try:
        StainReference.from_json(raw)
    except PcamError as exc:
        raise StoreError(f"{path}: attribute 'stain' is not a stain description ({exc})") from None


def check_contents(path: Path, attrs: dict[str, Any], ids: np.ndarray, labels: np.ndarray, n: int,
                   chunk_ends: Optional[np.ndarray], file_size: int) -> None:
    """Raise :class:`StoreError` naming the first problem a store's arrays and attributes show.

    Parameters
    ----------
    ids, labels
        As read from the file (``labels`` before any cast).
    n
        Rows of ``images``.
    chunk_ends
        Byte offset + stored size of every chunk written (None: not chunked).
    """
    if len(ids) != n or len(labels) != n:
        raise StoreError(f"{path}: {n} images but {len(ids)} ids and {len(labels)} labels")
    if labels.dtype.kind not in "iu":
        raise StoreError(f"{path}: labels are {labels.dtype}, expected integers 0, 1 or -1")
    wrong = np.flatnonzero(~np.isin(labels, (-1, 0, 1)))
    if len(wrong):
        i = int(wrong[0])
        raise StoreError(f"{path}: {len(wrong)} label(s) not 0, 1 or -1 (row {i}, id {ids[i]}: {labels[i]})")
    if n > 1 and not (ids[1:] > ids[:-1]).all():  # strictly increasing: sorted and unique at once
        uniq, counts = np.unique(ids, return_counts=True)
        dup = uniq[counts > 1]
        if len(dup):
            raise StoreError(f"{path}: {len(dup)} id(s) appear more than once ({few(list(dup))})")
    for name, expected in (("count", n), ("n_positive", int((labels == 1).sum())),
                           ("n_unlabelled", int((labels < 0).sum()))):
        if name in attrs and as_int(attrs[name]) != expected:
            raise StoreError(f"{path}: attribute {name!r} is {_plain(attrs[name])!r} but the labels give {expected}")
    _stat_attr(path, attrs, "mean")
    _stat_attr(path, attrs, "std")
    _check_stain(path, attrs.get("stain"))
    for name, kind in (("skipped", list), ("options", dict)):
        raw = attrs.get(name)
        try:
            ok = raw is None or raw == "" or isinstance(json.loads(raw), kind)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise StoreError(f"{path}: attribute {name!r} is not a JSON {kind.__name__} ({str(raw)[:60]!r})")
    if chunk_ends is not None and len(chunk_ends) and int(chunk_ends.max()) > file_size:
        raise StoreError(f"{path}: truncated ({file_size:,} bytes, its chunks run to {int(chunk_ends.max()):,})")


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as Python values, for messages (``19``, not ``np.int64(19)``)."""
    return value.tolist() if hasattr(value, "tolist") else value


def as_int(value: Any) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
