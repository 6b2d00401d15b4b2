"""uint8 patches -> normalized floats: the one definition shared by train, export and infer.

The store, the tif reader and the ONNX graph's input all carry images as
uint8 NHWC ``(B, 96, 96, 3)``. Converting them in exactly one place keeps
training, the exported graph and inference numerically the same:

* :func:`to_float01` turns uint8 NHWC into float32 NCHW in ``[0, 1]``;
  augmentation (:mod:`pcamtool.augment`) works on these.
* :class:`Normalize` subtracts the store's per-channel mean and divides by its
  std (both measured on pixels/255 at pack time).
* :class:`Classifier` wraps a backbone from :func:`pcamtool.models.create_model`
  with both, so the exported ONNX graph takes uint8 images directly;
  :class:`ProbabilityModel` adds the sigmoid head that export puts in the graph.

Example::

    net = Classifier(create_model("pcamnet"), store.mean, store.std)
    logits = net(torch.from_numpy(store.gather([0, 1])))      # uint8 in, (2,) out
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .constants import PATCH_SHAPE
from .errors import PcamError

_HWC = ", ".join(map(str, PATCH_SHAPE))


def to_float01(x: Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """uint8 NHWC ``(B, H, W, 3)`` -> float32 NCHW ``(B, 3, H, W)`` in ``[0, 1]``.

    The input may be in any memory layout (a plain NHWC batch, or a
    ``channels_last`` view); the output is in ``memory_format``, contiguous
    NCHW by default; training converts the augmented batch to the memory
    format :mod:`pcamtool.device` chose (channels-last on CPUs and GPUs).

    Raises
    ------
    PcamError
        ``x`` is not a 4-d uint8 tensor with 3 channels last.
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise PcamError(f"expected uint8 images (B, {_HWC}), got {x.dtype} with shape {tuple(x.shape)}")
    if not torch.jit.is_tracing() and x.shape[-1] != 3:
        raise PcamError(f"expected 3 channels last (B, {_HWC}), got shape {tuple(x.shape)}")
    # Division (not multiplication by 1/255) is correctly rounded, and ONNX's
    # Div gives the same bits: the parity check of the export relies on it.
    return x.permute(0, 3, 1, 2).to(torch.float32, memory_format=memory_format).div_(255.0)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` on NCHW floats.

    ``mean`` and ``std`` are buffers, so they travel with the state dict and
    the exported graph, and follow ``.to(dtype)`` for fp16 export.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float] | Tensor | np.ndarray, std: Sequence[float] | Tensor | np.ndarray) -> None:
        super().__init__()
        mean_t = torch.as_tensor(np.asarray(mean, dtype=np.float32))
        std_t = torch.as_tensor(np.asarray(std, dtype=np.float32))
        if mean_t.shape != (3,) or std_t.shape != (3,):
            raise PcamError(f"mean and std need 3 values (one per channel), got {tuple(mean_t.shape)} and {tuple(std_t.shape)}")
        if not bool(torch.all(std_t > 0)) or not bool(torch.all(torch.isfinite(mean_t))):
            raise PcamError(f"std must be positive and mean finite, got mean {mean_t.tolist()}, std {std_t.tolist()}")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: Tensor) -> Tensor:
        # cast to the input's dtype: an fp16 graph must not promote back to fp32
        mean = self.mean.to(x.dtype).view(1, 3, 1, 1)
        std = self.std.to(x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


class Classifier(nn.Module):
    """A backbone with its preprocessing: uint8 NHWC images in, logits ``(B,)`` out.

    Parameters
    ----------
    backbone
        A model from :func:`pcamtool.models.create_model` (normalized float
        NCHW in, logits ``(B,)`` out).
    mean, std
        Per-channel statistics of pixels/255 of the training store.
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float] | Tensor | np.ndarray,
                 std: Sequence[float] | Tensor | np.ndarray) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        """Logits of uint8 NHWC images ``(B, 96, 96, 3)`` (evaluation, export, inference)."""
        return self.backbone(self.normalize(to_float01(x)))

    def forward01(self, x01: Tensor) -> Tensor:
        """Logits of float NCHW images in ``[0, 1]`` (training, after augmentation)."""
        return self.backbone(self.normalize(x01))


class ProbabilityModel(torch.nn.Module):
    """uint8 NHWC images -> probability of tumour, in ``dtype`` inside.

    ``net`` itself is left as it is: for another ``dtype`` the head computes
    with a converted copy (``Module.to`` converts in place, and the caller's
    fp32 network is still the reference an fp16 export is checked against).
    """

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        first = next(iter(net.parameters()), None)
        same = first is None or first.dtype == dtype
        self.net = net if same else copy.deepcopy(net).to(dtype)
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net.forward01(to_float01(images).to(self.dtype)).float())
