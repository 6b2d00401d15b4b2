"""Names and numbers shared by the library and the command line, with no heavy imports.

The CLI builds its choices from these (so ``pcamtool --help`` stays free of
numba, h5py, torch and onnxruntime), and the library checks its inputs
against the same tuples: a new provider or stain method is added here once.

Example::

    from pcamtool.constants import TTA_CHOICES, DEFAULT_TTA
"""
from __future__ import annotations

PATCH_SIZE = 96                               # PCam patches are 96 x 96 RGB
PATCH_SHAPE = (PATCH_SIZE, PATCH_SIZE, 3)     # one image as stored, decoded and fed to the ONNX graph

TTA_CHOICES = (1, 2, 4, 8)                    # dihedral subgroups infer may average (pcamtool.tta)
DEFAULT_TTA = 8                               # what export records as the model's tta_default

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")   # infer/export --provider
STAIN_METHODS = ("none", "reinhard", "macenko")   # pack --stain
CACHES = ("auto", "gpu", "ram", "mmap")           # train --cache
AVERAGES = ("mean", "rank")                       # infer --average (ensembles)

TIMM_PREFIX = "timm:"                         # --arch timm:NAME selects a timm network
