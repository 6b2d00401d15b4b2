"""pcamtool: PatchCamelyon / Kaggle Histopathologic Cancer Detection toolkit.

The Python API mirrors the CLI::

    import pcamtool
    pcamtool.pack("data/train")                 # -> data/train.h5
    store = pcamtool.open_store("data/train.h5")
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import PcamError  # noqa: E402
from .pack import pack, PackResult  # noqa: E402
from .io.store import open_store, Store  # noqa: E402
from .io.tiff import read_patch  # noqa: E402

__all__ = ["__version__", "PcamError", "pack", "PackResult", "open_store", "Store", "read_patch"]
