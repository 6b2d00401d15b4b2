"""Every ``id,value`` CSV pcamtool reads or writes: labels, submissions, answer keys, outlier lists.

Readers are strict (a malformed row names its line); writers are atomic and
quote with the csv module where a field needs it, so any id (a comma, a quote,
a newline, non-ASCII) reads back as written. Surrounding spaces of ids and
values are not kept: readers strip them.
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import LabelsError, PcamError
from .fsutil import atomic_path, utf8_ok


def read_id_table(path: str | os.PathLike, value: str = "label", kind: str = "labels",
                  as_float: bool = False, probabilities: bool = False) -> dict[str, float]:
    """Read an ``id,<value>`` CSV into a dict, in file order.

    Parameters
    ----------
    as_float
        Values are probabilities (submissions) instead of 0/1 labels.
    probabilities
        With ``as_float``: every value must lie in [0, 1] (pcamtool's own
        predictions; scores to rank, as ``evaluate`` takes, need not).

    Raises
    ------
    LabelsError
        Missing file, wrong header, a bad row, or a duplicate id; the message
        names the file and the line.
    """
    path = Path(path)
    try:
        # newline="": a quoted id may hold "\r" or "\n"; the csv module splits rows itself.
        with open(path, encoding="utf-8-sig", newline="") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise LabelsError(f"{path}: {kind} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(f"{path}: cannot read {kind} file ({exc})") from None
    if not as_float:
        table = _plain_labels(text, value)
        if table is not None:
            return table  # type: ignore[return-value]
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None)
    if header is None:
        raise LabelsError(f"{path}: empty {kind} file (expected header 'id,{value}')")
    header = [h.strip().lower() for h in header]
    if "id" not in header or value not in header:
        raise LabelsError(f"{path}: header is {','.join(header)!r}, expected 'id,{value}'")
    ci, cv = header.index("id"), header.index(value)
    table: dict[str, float] = {}
    for row in rows:
        line = rows.line_num  # the file's line, also after a quoted field spanning lines
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise LabelsError(f"{path}: line {line}: expected {len(header)} fields, got {len(row)}")
        key, raw = row[ci].strip(), row[cv].strip()
        if not key:
            raise LabelsError(f"{path}: line {line}: empty id")
        try:
            val = float(raw)
        except ValueError:
            raise LabelsError(f"{path}: line {line}: {value} {raw!r} is not a number") from None
        if as_float:
            if not math.isfinite(val):
                raise LabelsError(f"{path}: line {line}: {value} {raw!r} is not finite")
            if probabilities and not 0.0 <= val <= 1.0:
                raise LabelsError(f"{path}: line {line}: {value} {raw!r} is not a probability (0 to 1)")
        elif val not in (0.0, 1.0):
            raise LabelsError(f"{path}: line {line}: {value} {raw!r} is not 0 or 1")
        if key in table:
            raise LabelsError(f"{path}: line {line}: duplicate id {key}")
        table[key] = val if as_float else int(val)
    return table


def _plain_labels(text: str, value: str) -> dict[str, int] | None:
    """The table of a plain ``id,<value>`` file of 0/1 labels, or None for any other text.

    Kaggle's train_labels.csv (220,025 rows) takes ~1 us a row through the
    csv module and the checks below; this takes ~0.2 us, which matters beside
    a pack at ~10 us a file. Anything unusual (quotes, spaces, other headers,
    values, duplicates, ragged rows) returns None, and the strict reader
    parses it and names the offending line: both agree on every file this accepts.
    """
    if '"' in text or " " in text or "\t" in text or "\r" in text:
        return None
    head, _, body = text.partition("\n")
    if head.lower() != f"id,{value}":
        return None
    pairs = [line.split(",") for line in body.split("\n") if line]
    try:
        table = dict(pairs)  # ValueError unless every row has exactly two fields
    except ValueError:
        return None
    if len(table) != len(pairs) or "" in table or not set(table.values()) <= {"0", "1"}:
        return None
    return {k: int(v == "1") for k, v in table.items()}


def read_labels(path: str | os.PathLike) -> dict[str, int]:
    """Read a Kaggle ``id,label`` CSV of 0/1 labels."""
    return read_id_table(path)  # type: ignore[return-value]


def format_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """CSV text with ``\\n`` line ends; fields holding a comma, quote or line break are quoted.

    Raises
    ------
    PcamError
        A field that cannot be UTF-8 (an id taken from a file name of
        undecodable bytes): named here, not as a ``UnicodeEncodeError`` later.
    """
    table = [tuple(map(str, header))] + [tuple(map(str, row)) for row in rows]
    text = "".join(",".join(row) + "\n" for row in table)
    try:
        text.encode("utf-8")  # ~1 ms for a 57,458-row submission
    except UnicodeEncodeError:
        bad = next(f for row in table for f in row if not utf8_ok(f))
        raise PcamError(f"{bad!r} is not valid UTF-8 text and cannot go into a CSV "
                        "(a file name of undecodable bytes? rename the file)") from None
    # Nothing to quote (every Kaggle file) when the plain join has no quote or
    # "\r", and only the separators it put there itself: 5x faster than the csv module.
    if '"' not in text and "\r" not in text and text.count("\n") == len(table) and \
            text.count(",") == sum(len(row) - 1 for row in table):
        return text
    buf = io.StringIO(newline="")
    plain = csv.writer(buf, lineterminator="\n")
    # The csv module quotes fields holding the line terminator ("\n") but not a
    # lone "\r", which its reader then takes for a line end: quote those rows whole.
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in table:
        (quoted if any("\r" in f for f in row) else plain).writerow(row)
    return buf.getvalue()


def format_rows(ids: Sequence[str], values: Iterable[float], value: str = "label") -> str:
    """The CSV text of an ``id,<value>`` table (values with up to 9 significant digits)."""
    return format_table(("id", value), ((i, f"{v:.9g}") for i, v in zip(ids, values)))


def write_table(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[object]],
                force: bool = True) -> Path:
    """Write a CSV atomically (see :func:`format_table`); ``force=False`` refuses an existing file."""
    return _write_text(path, format_table(header, rows), force)


def write_rows(path: str | os.PathLike, ids: Sequence[str], values: Iterable[float],
               value: str = "label", force: bool = True) -> Path:
    """Write an ``id,<value>`` CSV atomically (never a half-written file under ``path``)."""
    return _write_text(path, format_rows(ids, values, value), force)


def _write_text(path: str | os.PathLike, text: str, force: bool) -> Path:
    # The text is made before the output is locked: a failure there leaves no trace.
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
    return Path(path)
