"""The exceptions pcamtool raises.

Every error a user can cause derives from :class:`PcamError`, which is also a
``ValueError`` so existing handlers still catch it. The CLI turns it into one
line on stderr and a non-zero exit; the library never prints tracebacks for
user mistakes.
"""
from __future__ import annotations

from typing import Sequence


def few(names: Sequence[object], n: int = 3) -> str:
    """``a, b, c and 7 more``: enough names for an error message to be acted on."""
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(str(x) for x in names[:n]) + more


class PcamError(ValueError):
    """Base class of every error caused by bad input or a bad request."""


class BadImageError(PcamError):
    """A tif could not be read, or is not a 96x96 RGB uint8 patch."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class LabelsError(PcamError):
    """A labels CSV is malformed or does not match the images."""


class ImageFolderError(PcamError):
    """A folder of tifs is missing, empty, or names two files with the same id (``a.tif``, ``a.tiff``)."""


class StoreError(PcamError):
    """A store is missing, truncated, of another format, or lacks what is asked of it."""


class ModelError(PcamError):
    """A checkpoint or ONNX model is missing, foreign, or does not fit the data."""


class MissingExtraError(PcamError):
    """An optional feature's package is absent; the message names ``pip install 'pcamtool[EXTRA]'``.

    Never prefixed with the file that asked for the feature: the file is fine,
    the environment lacks a package.
    """


class BusyError(PcamError):
    """An output is being written by another process right now."""


class ExistsError(PcamError):
    """An output already exists and ``force`` was not given."""

    def __init__(self, path: object, problem: str = "already exists") -> None:
        self.path = str(path)
        super().__init__(f"{path}: {problem} (use --force to overwrite)")


class TrainingError(PcamError):
    """Training cannot go on (NaN loss, out of memory, mismatched resume)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, caught where the work could stop cleanly; the message says what was kept.

    A ``KeyboardInterrupt`` (not a :class:`PcamError`), so whatever already
    handles Ctrl-C still does; the CLI prints the message and exits 130.
    """
