"""The synthetic Kaggle-layout generator (the quickstart's data)."""
from .dataset import SynthSummary, generate, iter_split, patch_id

__all__ = ["SynthSummary", "generate", "iter_split", "patch_id"]
