"""Stain normalization: ``pcamtool pack --stain reinhard|macenko``.

Patches from different centres are stained differently; normalizing every
patch toward one reference (fitted on the training set) removes much of that
shift. The reference travels with the data: the store records it, the
checkpoint and the ONNX file carry it, and ``infer`` applies exactly the
same normalization to test images.

* **Reinhard**: match the mean and std of the tissue pixels in Reinhard's
  l-alpha-beta space (RGB -> LMS -> log10 -> decorrelated axes).
* **Macenko**: estimate the hematoxylin and eosin stain vectors from optical
  density (plane of the two main eigenvectors, robust 1%/99% angles), find
  each pixel's concentrations, scale their 99th percentile to the
  reference's, and recompose with the reference stain matrix.

The numba kernels live in :mod:`pcamtool.kernels.stain`; ``tests/oracles.py``
implements the same formulas independently in plain numpy, for the tests and
as the benchmark baseline.

Example::

    ref = fit_reference(train_images, "macenko")
    normalized = normalize(test_images, ref)
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .constants import STAIN_METHODS
from .errors import PcamError

METHODS = STAIN_METHODS
POOL_STRIDE = 7  # pixels of each reference patch pooled (every 7th: plenty, and fast)
# The one layout of each method's reference: parameter name -> shape. The store,
# the checkpoint and the ONNX metadata all carry it through StainReference.
PARAMS: dict[str, dict[str, tuple[int, ...]]] = {
    "none": {},
    "reinhard": {"mean": (3,), "std": (3,)},                              # l-alpha-beta of tissue pixels
    "macenko": {"stain_matrix": (2, 3), "max_concentrations": (2,)},     # H&E rows, 99th percentiles
}


@dataclass(frozen=True)
class StainReference:
    """A stain normalization method and the reference it maps toward.

    The parameters are checked on construction against :data:`PARAMS`
    (every one present, of its shape, finite), so a reference read from a
    store, a checkpoint or an ONNX file is whole or refused in one line.
    ``to_dict`` / ``from_dict`` and ``to_json`` / ``from_json`` are the
    formats it travels in; equal references compare equal.

    Raises
    ------
    PcamError
        An unknown method or a missing, misshapen or non-finite parameter.
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PcamError(f"unknown stain method {self.method!r} (choose from {', '.join(METHODS)})")
        clean: dict[str, Any] = {}
        for key, shape in PARAMS[self.method].items():
            try:
                arr = np.asarray(self.params[key], np.float64)
            except KeyError:
                raise PcamError(f"stain reference for {self.method} lacks {key!r}") from None
            except (TypeError, ValueError):
                arr = np.empty(0)
            if arr.shape != shape or not np.isfinite(arr).all():
                raise PcamError(f"stain reference for {self.method}: {key} must be {math.prod(shape)} finite "
                                f"numbers of shape {shape}, got {str(self.params[key])[:60]}")
            # A spread or a concentration scale of 0 or less maps every patch to one flat colour (or
            # inverts it): no fitted reference has one, so it can only be a damaged file.
            if key in ("std", "max_concentrations") and not (arr > 0).all():
                raise PcamError(f"stain reference for {self.method}: {key} must be positive, got {arr.tolist()}")
            if key == "stain_matrix" and not (np.linalg.norm(arr, axis=1) > 0).all():
                raise PcamError(f"stain reference for {self.method}: a stain_matrix row is all zeros")
            clean[key] = arr.tolist()
        object.__setattr__(self, "params", clean)   # plain lists: JSON-able, and equality is by value

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "StainReference":
        """The reference of a ``to_dict`` mapping; None or ``{}`` is no normalization."""
        if d is None:
            return cls("none")
        if not isinstance(d, dict):
            raise PcamError(f"not a stain description: {str(d)[:60]!r}")
        d = dict(d)
        method = d.pop("method", "none")
        return cls(method, {k: v for k, v in d.items() if k in PARAMS.get(method, d)})

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, raw: Optional[str]) -> "StainReference":
        """The reference of a ``to_json`` string; None or ``""`` is no normalization."""
        if raw is None or raw == "":
            return cls("none")
        try:
            d = json.loads(raw)
        except (TypeError, ValueError):
            raise PcamError(f"not a stain description (not JSON: {str(raw)[:60]!r})") from None
        return cls.from_dict(d)

    def describe(self) -> str:
        """Short words for messages: ``'macenko'`` and, for a reference, a fingerprint of its numbers."""
        if not self.enabled:
            return "'none'"
        numbers = [round(float(v), 3) for key in PARAMS[self.method] for v in np.ravel(self.params[key])]
        return f"'{self.method}' (reference {', '.join(map(str, numbers[:3]))}, ...)"


def _pooled_pixels(images: np.ndarray) -> np.ndarray:
    """Every POOL_STRIDE-th pixel, (M, 3) uint8: the kernels measure them as they measure a patch."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise PcamError(f"a stain reference needs uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    flat = np.ascontiguousarray(images).reshape(-1, 3)
    return np.ascontiguousarray(flat[::POOL_STRIDE])


def fit_reference(images: np.ndarray, method: str) -> StainReference:
    """Fit the reference of ``method`` on the pooled pixels of ``images`` (N, 96, 96, 3) uint8.

    Raises
    ------
    PcamError
        Unknown method, images not uint8 (N, H, W, 3), or they hold (almost) no tissue.
    """
    from .kernels import stain as K

    if method not in METHODS:
        raise PcamError(f"unknown stain method {method!r} (choose from {', '.join(METHODS)})")
    if method == "none":
        return StainReference("none")
    if len(images) == 0:
        raise PcamError("no images to fit a stain reference on")
    pixels = _pooled_pixels(images)
    if method == "reinhard":
        mean, std, ok = K.lab_stats(pixels)
        if not ok:
            raise PcamError("stain reference images contain no tissue (all near-white glass)")
        return StainReference("reinhard", {"mean": [float(v) for v in mean], "std": [float(v) for v in std]})
    he, max_c, ok = K.macenko_estimate(pixels)
    if not ok:
        raise PcamError("stain reference images contain no tissue (no stained pixels to estimate H&E from)")
    return StainReference("macenko", {"stain_matrix": he.T.tolist(), "max_concentrations": [float(v) for v in max_c]})


def _kernel_args(ref: StainReference) -> tuple:
    """The kernel of ``ref``'s method and its arguments (the parameters were checked by StainReference)."""
    from .kernels import stain as K

    if ref.method == "reinhard":
        mean, std = (np.asarray(ref.params[k], np.float64) for k in ("mean", "std"))
        return K.reinhard_batch, (mean, std)
    he = np.ascontiguousarray(np.asarray(ref.params["stain_matrix"], np.float64).T)
    return K.macenko_batch, (he, np.asarray(ref.params["max_concentrations"], np.float64))


def normalize(images: np.ndarray, reference: StainReference, out: Optional[np.ndarray] = None,
              workers: int = 1) -> np.ndarray:
    """Normalize a uint8 batch (N, H, W, 3) toward ``reference``; blank patches pass unchanged.

    ``workers`` threads split the batch (the kernels release the GIL).
    """
    if reference.method == "none":
        return images if out is None else np.copyto(out, images) or out
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise PcamError(f"stain normalization needs uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    kernel, args = _kernel_args(reference)
    images = np.ascontiguousarray(images)
    if out is None:
        out = np.empty_like(images)
    changed = np.zeros(len(images), np.bool_)
    n = len(images)
    if workers <= 1 or n < 2 * workers:
        kernel(images, *args, out, changed)
        return out
    bounds = np.linspace(0, n, workers + 1).astype(int)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda ab: kernel(images[ab[0]:ab[1]], *args, out[ab[0]:ab[1]], changed[ab[0]:ab[1]]),
                      zip(bounds[:-1], bounds[1:])))
    return out
