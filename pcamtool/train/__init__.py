"""Training: the loop, its parts, run folders and checkpoints, batches and splits."""
from .loop import TrainResult, fit

__all__ = ["TrainResult", "fit"]
