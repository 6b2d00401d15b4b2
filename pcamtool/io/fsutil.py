"""Writing files so that nothing half-written ever sits under the final name."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from ..errors import ExistsError


def partial_name(path: str | os.PathLike) -> Path:
    """The temporary name beside ``path`` that a write goes to before the rename.

    A fixed name (not a random one) means a killed run leaves at most one
    leftover, which the next run simply replaces.
    """
    p = Path(path)
    return p.with_name(f".{p.name}.partial")


def check_writable(path: str | os.PathLike, force: bool) -> None:
    """Refuse to replace an existing ``path`` unless ``force``."""
    if os.path.exists(path) and not force:
        raise ExistsError(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto ``path`` only on success."""
    check_writable(path, force)
    final = Path(path)
    if final.parent and not final.parent.exists():
        final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(final)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
