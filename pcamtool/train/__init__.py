"""Training: the loop, its parts, run folders and checkpoints, batches and splits.

``fit`` and ``TrainResult`` load :mod:`.loop` (and torch) on first use, so
:mod:`.checkpoint` can be read (e.g. ONNX metadata in ``infer``) without them.
"""
from typing import Any

__all__ = ["TrainResult", "fit"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
