"""The synthetic Kaggle-layout generator (the quickstart's data)."""
from .dataset import SynthSummary, generate
from .kaggle_tiff import patch_id
from .split import Rendered, iter_split

__all__ = ["Rendered", "SynthSummary", "generate", "iter_split", "patch_id"]
