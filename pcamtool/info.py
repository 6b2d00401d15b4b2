"""``pcamtool info STORE``: what a store holds, for people and (``--json``) programs."""
from __future__ import annotations

import json
import os
from typing import Any

import h5py
import numpy as np

from .io.store import open_store


def store_info(path: str | os.PathLike, outliers: bool = True) -> dict[str, Any]:
    """Counts, class balance, channel statistics, layout, size and provenance of a store."""
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
    }
    if outliers:
        info.update(_outlier_counts(store))
    return info


def _outlier_counts(store) -> dict[str, Any]:
    try:
        from .eda import find_outliers
    except ImportError:  # eda's plotting stack is optional at runtime
        return {}
    white = black = 0
    for _, images in store.chunks():
        w, b = find_outliers(images)
        white += int(np.count_nonzero(w))
        black += int(np.count_nonzero(b))
    return {"outliers_white": white, "outliers_black": black}


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
        f"layout       chunks {tuple(info['chunks'])}, compression {info['compression']}, "
        f"{'memory-mappable' if info['memory_mappable'] else 'read through h5py'}",
        f"size         {mb(info['size_bytes'])}",
        f"stain        {info['stain'].get('method', 'none')}",
    ]
    if "outliers_white" in info:
        lines.append(f"outliers     {info['outliers_white']} near-white (glass), {info['outliers_black']} near-black")
    skipped = info["skipped"]
    lines.append(f"skipped      {len(skipped)} file(s)")
    lines += [f"  {p}: {why}" for p, why in skipped[:20]]
    if len(skipped) > 20:
        lines.append(f"  ... and {len(skipped) - 20} more")
    return "\n".join(lines)
