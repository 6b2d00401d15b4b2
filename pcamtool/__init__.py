"""pcamtool: PatchCamelyon / Kaggle Histopathologic Cancer Detection toolkit.

The Python API mirrors the CLI::

    import pcamtool
    pcamtool.pack("data/train")                 # -> data/train.h5
    store = pcamtool.open_store("data/train.h5")

The names below load their modules on first use, so ``import pcamtool``
(and ``pcamtool --help``) costs no numba, h5py, torch or onnxruntime import.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PcamError": "errors", "pack": "io.pack", "PackResult": "io.pack", "open_store": "io.store",
    "Store": "io.store", "read_patch": "io.tiff",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pcamtool' has no attribute {name!r}")
