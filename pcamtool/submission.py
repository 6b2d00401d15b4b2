"""Kaggle submissions: row order, sharded inference, and merging the shards.

Kaggle scores ``id,label`` rows in any order, but a file that follows
``sample_submission.csv`` row for row is easy to diff and check, so rows
follow the sample when one is given and are sorted by id otherwise.

Inference over the 57,458 test tifs can be split over machines with
``--shard i/n`` (0-based: ``0/4`` ... ``3/4``); each shard writes its own CSV
and :func:`merge_shards` joins them, checking that every id appears once.

Example::

    from pcamtool.submission import merge_shards
    ids, probs = merge_shards(["sub.0.csv", "sub.1.csv"], "submission.csv",
                              sample_csv="data/sample_submission.csv")
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Collection, Optional, Sequence

import numpy as np

from .io.csvio import read_id_table, write_rows
from .errors import LabelsError, PcamError, few
from .io.fsutil import check_writable
from .io.sources import shard_slice  # noqa: F401  (the one definition; a lower floor, re-exported for callers)

_SHARD = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
_SHARD_NAME = re.compile(r"(?<!\d)(\d+)[-_]?of[-_]?(\d+)(?!\d)")   # sub.0of4.csv, sub_2-of-4.csv
log = logging.getLogger("pcamtool")


def order_like_sample(ids: Sequence[str], probs: Sequence[float] | np.ndarray,
                      sample_csv: Optional[str | os.PathLike] = None,
                      allow_missing: Collection[str] = ()
                      ) -> tuple[list[str], np.ndarray]:
    """Put predictions in submission order.

    Parameters
    ----------
    ids, probs
        One probability per id, in any order; ids must be unique.
    sample_csv
        Kaggle's ``sample_submission.csv`` (header ``id,label``): rows follow
        its order, and its ids and ``ids`` must be the same set. None: rows
        sorted by id.

    Returns
    -------
    (ids, probs)
        A new list and a new float64 array, in submission order.

    Raises
    ------
    PcamError
        Lengths differ, a duplicate id, an unreadable sample, ids of the
        sample without a prediction (the message names the sample file, the
        count and the first few ids) or predicted ids absent from the sample.
    allow_missing
        Sample ids that may lack a prediction (images skipped with
        ``--skip-bad``): their rows are left out.
    """
    p = np.asarray(probs, np.float64)
    if p.ndim != 1 or len(p) != len(ids):
        raise PcamError(f"{len(ids)} ids but {p.size} probabilities")
    index: dict[str, int] = {}
    for j, k in enumerate(ids):
        if k in index:
            raise PcamError(f"id {k} has two predictions (rows {index[k]} and {j})")
        index[k] = j
    if sample_csv is None:
        order = sorted(index)
    else:
        sample = read_id_table(sample_csv, as_float=True, kind="sample submission")
        skipped = set(allow_missing)
        missing = [k for k in sample if k not in index and k not in skipped]
        if missing:
            raise PcamError(f"{sample_csv}: {len(missing)} of its {len(sample)} id(s) have no "
                            f"prediction: {few(missing)}")
        extra = [k for k in ids if k not in sample]
        if extra:
            raise PcamError(f"{len(extra)} predicted id(s) are not in {sample_csv}: {few(extra)}")
        order = [k for k in sample if k in index]
    return order, p[[index[k] for k in order]]


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``--shard i/n`` into ``(i, n)``: shard ``i`` of ``n``, counted from 0.

    ``"0/4"`` is the first of four shards and ``"3/4"`` the last.

    Raises
    ------
    PcamError
        Not of the form ``i/n``, ``n < 1``, or ``i`` outside ``0 .. n-1``.
    """
    m = _SHARD.fullmatch(str(text))
    if m is None:
        raise PcamError(f"--shard {text!r}: expected i/n, e.g. 0/4 for the first of 4 shards "
                        f"(shards count from 0)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise PcamError(f"--shard {text!r}: the number of shards must be at least 1")
    if i >= n:
        raise PcamError(f"--shard {text!r}: shards count from 0, so i must be 0 to {n - 1}")
    return i, n


def check_shard_names(paths: Sequence[str | os.PathLike]) -> bool:
    """Check that shard files named ``<i>of<n>`` cover shards ``0..n-1``; False if the names do not say.

    Shard CSVs hold only ``id,label`` rows, and shards are contiguous slices
    of the sorted ids, so without a sample only their names can show that a
    shard is missing.

    Raises
    ------
    PcamError
        The names disagree on ``n``, or some shard ``i`` of ``0..n-1`` has no file.
    """
    found = [_SHARD_NAME.findall(Path(p).name) for p in paths]
    if not all(found):
        return False
    pairs = {(int(m[-1][0]), int(m[-1][1])) for m in found}
    counts = {n for _, n in pairs}
    if len(counts) != 1:
        raise PcamError(f"shard file names disagree on the number of shards ({', '.join(map(str, sorted(counts)))})")
    n = counts.pop()
    missing = sorted(set(range(n)) - {i for i, _ in pairs})
    if missing:
        raise PcamError(f"shard(s) {few([f'{i}of{n}' for i in missing])} missing: "
                        f"{len(paths)} file(s) given for {n} shards")
    return True


def merge_shards(paths: Sequence[str | os.PathLike], out: Optional[str | os.PathLike] = None,
                 sample_csv: Optional[str | os.PathLike] = None, force: bool = False
                 ) -> tuple[list[str], np.ndarray]:
    """Join shard CSVs (``id,label``) into one submission.

    Parameters
    ----------
    paths
        The shard files, in any order.
    out
        Where to write the merged CSV (atomically); None: only return it.
    sample_csv
        Kaggle's ``sample_submission.csv``: every id in it must be in exactly
        one shard, no shard may hold another id, and rows follow its order.
        None: rows sorted by id.
    force
        Replace an existing ``out``.

    Returns
    -------
    (ids, probs)
        In submission order.

    Raises
    ------
    PcamError
        No shards, a shard given twice, a malformed shard (LabelsError naming
        the line), an id in two shards (naming it and both files), sample ids
        missing from every shard, a shard missing by the files' ``<i>of<n>``
        names (checked when there is no sample; without such names a warning
        says nothing could be checked), or ``out`` exists without ``force``
        (ExistsError, raised before any shard is read).
    """
    if not paths:
        raise PcamError("no shard files to merge")
    # Checked now, said only once the merge has succeeded: a warning before an error was noise.
    unchecked = sample_csv is None and not check_shard_names(paths)
    if out is not None:
        check_writable(out, force)  # fail before reading thousands of rows
    seen_files: set[Path] = set()
    owner: dict[str, str] = {}
    ids: list[str] = []
    values: list[float] = []
    for path in paths:
        key = Path(path).resolve()
        if key in seen_files:
            raise PcamError(f"{path}: shard file given twice")
        seen_files.add(key)
        table = read_id_table(path, as_float=True, kind="shard", probabilities=True)
        for k, v in table.items():
            if k in owner:
                raise PcamError(f"id {k} is in two shards: {owner[k]} and {path}")
            owner[k] = str(path)
            ids.append(k)
            values.append(v)
    try:
        ids, probs = order_like_sample(ids, values, sample_csv)
    except LabelsError:
        raise  # the sample file itself is bad: its message says so
    except PcamError as exc:
        raise PcamError(f"{exc} (merging {len(paths)} shard file(s))") from None
    if out is not None:
        write_rows(out, ids, probs, force=force)
    if unchecked:
        log.warning("merged %d shard file(s) without --sample: a missing shard cannot be noticed "
                    "(give --sample, or name the shards like sub.0of%d.csv)", len(paths), len(paths))
    return ids, probs
