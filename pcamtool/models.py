"""The model zoo: ``create_model(name, **kwargs)`` is the one way to build a backbone.

Every backbone takes normalized float NCHW images ``(B, 3, 96, 96)`` and
returns one logit per image ``(B,)``; preprocessing lives in
:class:`pcamtool.contract.Classifier`. :func:`resolve_model_args` turns a
name and the user's keyword arguments into every argument of the factory,
defaults filled in; checkpoints store that, so a model rebuilds exactly even
after a default changes.

Models
------
``plain4`` (default)
    A plain 4-block CNN; with the default recipe on the real sample it
    measured 0.949-0.950 validation AUC with auto epochs (40), above
    pcamnet and a little under the notebook CNN (0.956) at 2.6x less compute.
``pcamnet``
    Compact residual CNN for 96x96 patches with centre-aware pooling: 3.6x
    faster per image on a CPU than plain4 but below it on real tissue
    (0.919 validation AUC with 24 epochs against plain4's 0.942;
    benchmarks/RESULTS.md).
``simple``
    The three-block CNN of the popular Kaggle notebooks, for parity with what
    users run today.
``timm:<name>``
    Any ``timm.list_models()`` network (timm imported only then), ImageNet
    weights from timm's download (``pretrained=True``) or a local file
    (``pretrained=PATH``), input upscaled to ``img_size`` inside the graph;
    see :mod:`pcamtool.zoo_timm`.

Example::

    args = resolve_model_args("pcamnet", {"width": 32})  # every argument, JSON-ready
    net = create_model("pcamnet", **args)
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .errors import ModelError
from . import zoo_timm  # imports timm only when a timm network is resolved or built
from .constants import TIMM_PREFIX  # names handed to pcamtool.zoo_timm
from .jsonutil import jsonable

DEFAULT_MODEL = "plain4"  # best AUC per compute on real tissue (benchmarks/RESULTS.md)


# ----------------------------------------------------------------- building blocks


def _conv_bn(cin: int, cout: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convolutions); a strided 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, stride)
        self.conv2 = _conv_bn(cout, cout, relu=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class CentrePool(nn.Module):
    """Global average pooling concatenated with average pooling over the centre.

    The label is decided by the central 32x32 of the 96x96 patch, the middle
    third of each axis; on a feature map of side ``s`` that is the cells
    ``[s/3, 2s/3)``. Global pooling alone would weigh a tumour cell at the
    edge (label 0) like one in the centre (label 1); the centre pool gives the
    head the signal that decides the label, the global pool the context. Both
    are invariant to the dihedral group, so TTA stays meaningful.
    """

    def forward(self, x: Tensor) -> Tensor:
        s_h, s_w = x.shape[-2], x.shape[-1]
        h0, h1 = s_h // 3, s_h - s_h // 3
        w0, w1 = s_w // 3, s_w - s_w // 3
        centre = x[..., h0:h1, w0:w1].mean((-2, -1))
        return torch.cat([x.mean((-2, -1)), centre], dim=1)


# ------------------------------------------------------------------------ models


class PcamResNet(nn.Module):
    """Compact residual CNN for 96x96 PCam patches (``pcamnet``).

    Shape, and why it suits the task:

    * A stride-2 3x3 stem: the 96x96 patches are at 10x (~1 um/pixel), so a
      nucleus is 5-10 pixels wide and survives one halving. Convolutions at
      full and half resolution are what makes the notebook CNN cost 352M
      multiply-adds per image; the default here costs 57M (0.68M
      parameters), which is what lets it train at ~200 images/s on two CPU
      cores (``simple``: ~13).
    * ``len(depths)`` residual stages, each halving the resolution
      (48 -> 24 -> 12 -> 6 with the default three) and doubling the width
      (24 -> 48 -> 96 -> 192 channels by default): the
      receptive field of a final cell then covers the whole central 32x32
      plus the surrounding tissue, which the pathologist's label also uses
      as context.
    * Centre-aware pooling (:class:`CentrePool`) at the 6x6 map: the centre
      2x2 cells are exactly the central 32x32 pixels that decide the label.
    * Batch norm and plain 3x3 convolutions only: the fastest kernels both in
      oneDNN on a CPU and in cuDNN with bf16 and channels-last on a GPU.

    Parameters
    ----------
    width
        Channels after the stem; stage ``i`` (from 0) has ``width * 2**(i + 1)``.
    depths
        Residual blocks per stage (the first block of each stage downsamples).
    dropout
        Dropout before the final linear layer.
    centre_pool
        Concatenate the centre pool to the global pool (else global only).
    full_res_stem
        Channels of an extra 3x3 convolution at full resolution before the
        strided stem (0: none). It sees chromatin texture before the first
        halving, at ~10M extra multiply-adds.
    """

    def __init__(self, width: int = 24, depths: Sequence[int] = (1, 1, 1), dropout: float = 0.1,
                 centre_pool: bool = True, full_res_stem: int = 0) -> None:
        super().__init__()
        if full_res_stem:
            self.stem = nn.Sequential(_conv_bn(3, full_res_stem), _conv_bn(full_res_stem, width, stride=2))
        else:
            self.stem = _conv_bn(3, width, stride=2)
        stages: list[nn.Module] = []
        cin = width
        for i, depth in enumerate(depths):
            cout = width * 2 ** (i + 1)
            blocks = [BasicBlock(cin, cout, 2)] + [BasicBlock(cout, cout) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool: nn.Module = CentrePool() if centre_pool else _GlobalPool()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin * (2 if centre_pool else 1), 1)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.dropout(self.pool(x))).squeeze(1)


class _GlobalPool(nn.Module):
    """Plain global average pooling (``centre_pool=False``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((-2, -1))


class SimpleCNN(nn.Module):
    """The Kaggle-notebook CNN (``simple``): three conv-conv-maxpool blocks, then dense layers.

    32 -> 64 -> 128 channels at 96, 48 and 24 pixels, each convolution
    followed by batch norm and ReLU (the notebooks' Keras ``Conv2D(...,
    activation='relu')`` plus ``BatchNormalization``), flattening the 12x12x128
    map into a 256-unit dense layer with dropout. Kept for parity: at 352M
    multiply-adds per image, all of it at 96, 48 and 24 pixels, it trains
    ~15x slower than ``pcamnet`` on a CPU.

    Parameters
    ----------
    width
        Channels of the first block (doubled per block).
    hidden
        Units of the dense layer.
    dropout
        Dropout after each block (``conv_dropout``) and before the output.
    """

    def __init__(self, width: int = 32, hidden: int = 256, dropout: float = 0.5,
                 conv_dropout: float = 0.1) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        cin = 3
        for i in range(3):
            cout = width * 2 ** i
            blocks += [_conv_bn(cin, cout), _conv_bn(cout, cout), nn.MaxPool2d(2), nn.Dropout(conv_dropout)]
            cin = cout
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin * 12 * 12, hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(hidden, 1))
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).squeeze(1)


class PlainCNN(nn.Module):
    """A plain VGG-style CNN (``plain4``): conv-BN-ReLU then 2x2 max-pooling per block, global pool.

    32 -> 64 -> 128 -> 256 channels at 96, 48, 24 and 12 pixels (134M
    multiply-adds), no residuals, centre-aware pooling optional. The default:
    on the 2,499-patch real sample it reached validation AUC 0.936-0.942
    with 24 epochs of the default recipe (``pcamnet``: 0.919) and 0.949-0.950
    with the 40 that auto epochs now give it; its
    full-resolution first block sees chromatin texture before any
    downsampling, and max-pooling makes it tolerant to where in a cell a
    feature falls. Trained for 10 epochs with brightness-only jitter it is
    the brief's reference baseline (0.924 on the same split).

    Parameters
    ----------
    width
        Channels of the first block (doubled per block).
    blocks
        Number of conv + pool blocks.
    dropout
        Dropout before the final linear layer.
    centre_pool
        Concatenate the centre pool to the global pool (:class:`CentrePool`).
    """

    def __init__(self, width: int = 32, blocks: int = 4, dropout: float = 0.3,
                 centre_pool: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i in range(blocks):
            cout = width * 2 ** i
            layers += [_conv_bn(cin, cout), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool: nn.Module = CentrePool() if centre_pool else _GlobalPool()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin * (2 if centre_pool else 1), 1)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.pool(self.features(x)))).squeeze(1)


def _init(model: nn.Module) -> None:
    """He init for convolutions; the last BN of each residual branch at 0 (block starts as identity)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.conv2[1].weight)


# ----------------------------------------------------------------------- registry


_REGISTRY: dict[str, Callable[..., nn.Module]] = {"pcamnet": PcamResNet, "simple": SimpleCNN, "plain4": PlainCNN}


def is_timm(name: str) -> bool:
    """Whether ``name`` is a timm network (``timm:<name>``)."""
    return isinstance(name, str) and name.startswith(TIMM_PREFIX)


def model_normalization(name: str, resolved: dict[str, Any]) -> Optional[tuple[list[float], list[float]]]:
    """Input mean and std (pixels/255, per RGB channel) the model's pretrained weights expect, or None.

    ``resolved`` is :func:`resolve_model_args`'s result. None for the
    built-ins and for a timm network from random init: those use the training
    store's statistics. A network with pretrained weights must see its
    inputs normalized as in pretraining (ImageNet's statistics, for most).
    """
    if not is_timm(name):
        return None
    return zoo_timm.normalization(resolved)


HUB = "hub"  # --pretrained without a path: timm's own download


def transfer_kwargs(name: str, kwargs: dict[str, Any], pretrained: Optional[str] = None,
                    img_size: Optional[int] = None) -> dict[str, Any]:
    """``kwargs`` plus the ``--pretrained`` and ``--img-size`` options, which only timm networks take.

    Parameters
    ----------
    pretrained
        None (random init), :data:`HUB` (timm's download) or a weights file.
    img_size
        The side the network sees; None or 96 leaves the default.

    Raises
    ------
    ModelError
        Either option given for a built-in model.
    """
    out = dict(kwargs)
    given = {"--pretrained": pretrained is not None, "--img-size": img_size not in (None, 96)}
    if not is_timm(name):
        bad = [k for k, v in given.items() if v]
        if bad:
            verb = "need" if len(bad) > 1 else "needs"
            raise ModelError(f"{' and '.join(bad)} {verb} a timm network (--arch timm:NAME), not {name!r}")
        return out
    if pretrained is not None:
        out["pretrained"] = True if pretrained == HUB else pretrained
    if img_size is not None:
        out["img_size"] = img_size
    return out


def without_pretrained(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` to rebuild a trained model: any ``pretrained`` source set to None.

    A checkpoint records where the starting weights came from, but its own
    weights replace them: rebuilding (export, infer, resume) must neither
    download nor need the original file.
    """
    return {**kwargs, "pretrained": None} if "pretrained" in kwargs else dict(kwargs)


def resolve_model_args(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument of model ``name``'s factory, the given ``kwargs`` validated, defaults filled in.

    What checkpoints record: ``create_model(name, **resolve_model_args(name,
    kw))`` builds the same network whatever the defaults are at that time.
    Sequences come back as lists, so the result equals its JSON round trip.

    Raises
    ------
    ModelError
        Unknown name (the message lists the known ones), an argument the
        model does not take (the message lists the ones it takes), or a value
        it cannot use.
    """
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ModelError(f"model {name!r}: arguments must be a mapping of names to values, got {kwargs!r}")
    if is_timm(name):
        return zoo_timm.resolve(name[len(TIMM_PREFIX):], kwargs)
    builder = _REGISTRY.get(name)
    if builder is None:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    sig = inspect.signature(builder)
    unknown = sorted(set(kwargs) - set(sig.parameters))
    if unknown:
        raise ModelError(f"model {name!r} takes no argument(s) {', '.join(unknown)} "
                         f"(it takes: {', '.join(sig.parameters)})")
    bound = sig.bind(**kwargs)
    bound.apply_defaults()
    full = {k: jsonable(v) for k, v in bound.arguments.items()}
    _validate(name, full)
    return full


def create_model(name: str = DEFAULT_MODEL, **kwargs: Any) -> nn.Module:
    """Build backbone ``name`` with ``kwargs`` (validated by :func:`resolve_model_args`).

    ``timm:<name>`` builds a timm network (:func:`pcamtool.zoo_timm.create`):
    ``pretrained=True`` downloads timm's weights, ``pretrained=PATH`` loads a
    local file, ``img_size`` upscales inside the module. To rebuild a trained
    model pass :func:`without_pretrained` of its recorded arguments.

    Returns
    -------
    nn.Module
        Takes normalized float ``(B, 3, 96, 96)``, returns logits ``(B,)``.

    Raises
    ------
    ModelError
        As :func:`resolve_model_args`, or the network cannot be built with
        these arguments.
    """
    if is_timm(name):
        return zoo_timm.create(name[len(TIMM_PREFIX):], **kwargs)
    full = resolve_model_args(name, kwargs)
    try:
        return _REGISTRY[name](**full)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot build model {name!r} with {full}: {exc}") from None


def _validate(name: str, kw: dict[str, Any]) -> None:
    def fail(msg: str) -> None:
        raise ModelError(f"model {name!r}: {msg}")

    if "full_res_stem" in kw and (not isinstance(kw["full_res_stem"], int) or isinstance(kw["full_res_stem"], bool)
                                  or kw["full_res_stem"] < 0):
        fail(f"full_res_stem must be a non-negative integer (channels), got {kw['full_res_stem']!r}")
    if "blocks" in kw and (not isinstance(kw["blocks"], int) or isinstance(kw["blocks"], bool)
                           or not 1 <= kw["blocks"] <= 6):
        fail(f"blocks must be an integer from 1 to 6, got {kw['blocks']!r}")
    if "centre_pool" in kw and not isinstance(kw["centre_pool"], bool):
        fail(f"centre_pool must be true or false, got {kw['centre_pool']!r}")
    for key in ("width", "hidden"):
        if key in kw and (not isinstance(kw[key], int) or isinstance(kw[key], bool) or kw[key] < 1):
            fail(f"{key} must be a positive integer, got {kw[key]!r}")
    for key in ("dropout", "conv_dropout"):
        if key in kw and (not isinstance(kw[key], (int, float)) or not 0 <= kw[key] < 1 or math.isnan(kw[key])):
            fail(f"{key} must be in [0, 1), got {kw[key]!r}")
    if "depths" in kw:
        d = kw["depths"]
        if not isinstance(d, list) or not 1 <= len(d) <= 4 \
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in d):
            fail(f"depths must be 1 to 4 positive integers (blocks per stage), got {d!r}")
