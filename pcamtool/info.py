"""``pcamtool info STORE [--check]``: what a store holds, for people and (``--json``) programs.

``--check`` verifies what opening a store does not (that costs reading every
pixel): ids sorted, the count attributes present, and the recorded channel
statistics equal to the pixels' (exact integer sums, the pack's own kernel);
every chunk is read, so a damaged compressed chunk is found too.
"""
from __future__ import annotations

import json
import os
from typing import Any

import h5py
import numpy as np

from .errors import StoreError
from .io.store import Store, channel_stats, open_store

# Recorded statistics are exact (integer sums, one division): any difference
# beyond rounding means the pixels are not the ones they were computed from.
STATS_TOLERANCE = 1e-9


def store_info(path: str | os.PathLike, outliers: bool = True, check: bool = False,
               progress: bool = False) -> dict[str, Any]:
    """Counts, class balance, channel statistics, layout, size and provenance of a store.

    Parameters
    ----------
    check
        Also verify the store fully (see the module docstring); the result
        then has ``"check": "passed"``.

    Raises
    ------
    StoreError
        The store cannot be opened, or (with ``check``) the first problem found.
    """
    store = open_store(path)
    labels = store.labels
    with h5py.File(store.path, "r") as f:
        ds = f["images"]
        chunks = list(ds.chunks) if ds.chunks else None
        compression = ds.compression or "none"
    n = len(store)
    pos = int((labels == 1).sum())
    neg = int((labels == 0).sum())
    info: dict[str, Any] = {
        "path": str(store.path),
        "format": store.attrs.get("format"),
        "format_version": int(store.attrs.get("format_version", -1)),
        "pcamtool_version": store.attrs.get("pcamtool_version"),
        "created": store.attrs.get("created"),
        "source": store.attrs.get("source"),
        "labels_source": store.attrs.get("labels_source") or None,
        "count": n,
        "positive": pos,
        "negative": neg,
        "unlabelled": n - pos - neg,
        "positive_fraction": pos / (pos + neg) if pos + neg else None,
        "mean": [float(v) for v in store.mean],
        "std": [float(v) for v in store.std],
        "chunks": chunks,
        "compression": compression,
        "memory_mappable": store.mappable,
        "size_bytes": os.path.getsize(store.path),
        "stain": store.stain(),
        "skipped": json.loads(store.attrs.get("skipped") or "[]"),
        # format version 2: where the patches came from (None for stores that do not say)
        "slides": int(len(np.unique(store.meta.slide))) if store.meta is not None else None,
        "tumor_patch": int(store.meta.tumor_patch.sum()) if store.meta is not None else None,
        "coord_range": ([int(store.meta.coord_y.min()), int(store.meta.coord_y.max()),
                         int(store.meta.coord_x.min()), int(store.meta.coord_x.max())]
                        if store.meta is not None else None),
    }
    if outliers or check:
        info.update(_scan(store, outliers, check, progress))
    return info


def _check_cheap_extras(store: Store) -> None:
    """What ``--check`` adds to the checks of every open without reading pixels."""
    missing = [k for k in ("count", "n_positive", "n_unlabelled", "mean", "std") if k not in store.attrs]
    if missing:
        raise StoreError(f"{store.path}: attribute(s) {', '.join(missing)} missing")
    ids = store.ids
    if len(ids) > 1:
        down = np.flatnonzero(ids[1:] <= ids[:-1])  # open_store found no duplicates: these are out of order
        if len(down):
            i = int(down[0])
            raise StoreError(f"{store.path}: ids not sorted (row {i + 1}, {ids[i + 1]}, after {ids[i]})")


def _scan(store: Store, outliers: bool, check: bool, progress: bool) -> dict[str, Any]:
    """One pass over the pixels: outlier counts and/or the statistics check."""
    from .kernels.stats import channel_sums
    from .progress import progress_bar

    find_outliers = None
    if outliers:
        try:
            from .eda import find_outliers
        except ImportError:  # eda's plotting stack is optional at runtime
            pass
    if check:
        _check_cheap_extras(store)
    white = black = 0
    sums, sqsums = np.zeros(3, np.uint64), np.zeros(3, np.uint64)
    with progress_bar(total=len(store), desc="check" if check else "outliers", enabled=progress) as bar:
        for _, images in store.chunks():
            if find_outliers is not None:
                w, b = find_outliers(images)
                white += int(np.count_nonzero(w))
                black += int(np.count_nonzero(b))
            if check:
                channel_sums(np.ascontiguousarray(images), np.ones(len(images), np.bool_), sums, sqsums)
            bar.update(len(images))
    out: dict[str, Any] = {}
    if find_outliers is not None:
        out.update(outliers_white=white, outliers_black=black)
    if check:
        mean, std = channel_stats(sums, sqsums, len(store))
        for name, recorded, actual in (("mean", store.mean, mean), ("std", store.std, std)):
            if np.abs(recorded - actual).max() > STATS_TOLERANCE:
                shown_rec, shown_act = _distinct(recorded, actual)
                raise StoreError(f"{store.path}: recorded {name} {shown_rec} but the pixels "
                                 f"give {shown_act} (the images changed after packing)")
        out["check"] = "passed"
    return out


def _distinct(a: np.ndarray, b: np.ndarray) -> tuple[list[float], list[float]]:
    """``a`` and ``b`` rounded to the fewest decimals (6 at least) at which they print differently."""
    for decimals in range(6, 18):
        ra, rb = np.round(a, decimals).tolist(), np.round(b, decimals).tolist()
        if ra != rb:
            return ra, rb
    return a.tolist(), b.tolist()


def format_info(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`store_info`."""
    def mb(b: int) -> str:
        return f"{b / 2**20:.1f} MiB"

    lines = [
        f"store        {info['path']}",
        f"format       {info['format']} v{info['format_version']} (pcamtool {info['pcamtool_version']}, {info['created']})",
        f"source       {info['source']}",
        f"images       {info['count']:,}",
    ]
    if info["positive"] + info["negative"]:
        frac = info["positive_fraction"]
        lines.append(f"labels       {info['positive']:,} positive / {info['negative']:,} negative "
                     f"({100 * frac:.1f}% positive), {info['unlabelled']:,} unlabelled")
    else:
        lines.append("labels       none (unlabelled)")
    lines += [
        "mean (R,G,B) " + " ".join(f"{v:.4f}" for v in info["mean"]),
        "std  (R,G,B) " + " ".join(f"{v:.4f}" for v in info["std"]),
        f"layout       {'chunks ' + str(tuple(info['chunks'])) if info['chunks'] else 'contiguous (not chunked)'}, "
        f"compression {info['compression']}, "
        f"{'memory-mappable' if info['memory_mappable'] else 'read through h5py'}",
        f"size         {mb(info['size_bytes'])}",
        f"stain        {info['stain'].get('method', 'none')}",
    ]
    if info.get("slides") is not None:
        y0, y1, x0, x1 = info["coord_range"]
        lines += [f"slides       {info['slides']:,} (slide id per patch: train and cv split by slide)",
                  f"tumor_patch  {info['tumor_patch']:,} patches with tumour anywhere (labels: in the centre 32x32)",
                  f"coordinates  y {y0:,}..{y1:,}, x {x0:,}..{x1:,}"]
    if "outliers_white" in info:
        lines.append(f"outliers     {info['outliers_white']} near-white (glass), {info['outliers_black']} near-black")
    if info.get("check") == "passed":
        lines.append("check        passed (ids sorted and unique, labels 0/1/-1, counts, chunks inside the file, "
                     "statistics equal to the pixels)")
    skipped = info["skipped"]
    lines.append(f"skipped      {len(skipped)} file(s)")
    lines += [f"  {p}: {why}" for p, why in skipped[:20]]
    if len(skipped) > 20:
        lines.append(f"  ... and {len(skipped) - 20} more")
    return "\n".join(lines)
