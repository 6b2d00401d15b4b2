"""The fine-tuning recipe: the new head alone first, then everything with discriminative learning rates.

What fastai's ``fine_tune`` does and Kaggle users expect from a pretrained
network: for the first ``freeze_epochs`` epochs only the freshly initialised
one-class head learns (the pretrained features are not wrecked by the large
gradients of a random head); after that every layer learns, the pretrained
ones at ``lr * backbone_mult``. Batch norm stays in train mode throughout
(its running statistics adapt to H&E tissue from the first step), and by
default its affine parameters keep learning while the rest is frozen, as
fastai's ``train_bn=True`` does.

The optimizer holds every parameter from the start, in the groups
:func:`param_groups` makes; freezing only switches ``requires_grad``, so a
frozen parameter has no gradient and AdamW/SGD skip it (no weight decay
either), and unfreezing needs no new optimizer. A schedule that multiplies
each group's learning rate (``LambdaLR``) keeps the groups' ratio.

Example (what :func:`pcamtool.train.fit` does with a recipe)::

    recipe = default_recipe(arch, pretrained)                 # or the user's
    opt = torch.optim.AdamW(param_groups(net, lr, recipe.backbone_mult), lr=lr)
    for epoch in range(1, epochs + 1):
        set_backbone_frozen(net, frozen_in_epoch(epoch, recipe.freeze_epochs))
        ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from ..errors import PcamError

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class Recipe:
    """How a network is fine-tuned.

    Attributes
    ----------
    freeze_epochs
        Epochs at the start in which only the head (and, with ``train_bn``,
        the normalization layers) learns; 0 trains everything from the start.
    backbone_mult
        Learning rate of every layer but the head, relative to ``--lr``.
    train_bn
        Normalization layers' affine parameters learn while the rest is frozen.
    """

    freeze_epochs: int = 0
    backbone_mult: float = 1.0
    train_bn: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.freeze_epochs, int) or isinstance(self.freeze_epochs, bool) or self.freeze_epochs < 0:
            raise PcamError(f"--freeze-epochs must be a whole number >= 0, got {self.freeze_epochs!r}")
        if not isinstance(self.backbone_mult, (int, float)) or not 0 < self.backbone_mult <= 1:
            raise PcamError(f"--lr-backbone-mult must be in (0, 1], got {self.backbone_mult!r}")


# Defaults per family. NOT measured here: no pretrained weights can be had on
# this machine (no downloads), so the pretrained recipe is fastai's
# fine_tune default (1 frozen epoch; its discriminative slice spans lr/100 to
# lr, 0.1 is the usual middle for a single backbone rate). From random init
# there is nothing to protect: no freezing, one learning rate.
PRETRAINED_RECIPE = Recipe(freeze_epochs=1, backbone_mult=0.1)
SCRATCH_RECIPE = Recipe(freeze_epochs=0, backbone_mult=1.0)


def default_recipe(arch: str, pretrained: Any) -> Recipe:
    """The recipe a run gets when the user sets neither ``--freeze-epochs`` nor ``--lr-backbone-mult``.

    Parameters
    ----------
    arch
        The model name (built-ins and ``timm:`` networks).
    pretrained
        The resolved ``pretrained`` argument (None: random init).
    """
    from ..models import is_timm

    return PRETRAINED_RECIPE if is_timm(arch) and pretrained is not None else SCRATCH_RECIPE


def head_module(model: nn.Module) -> Optional[nn.Module]:
    """The classifier layer of the (first) timm backbone inside ``model``, or None for the built-ins.

    ``model`` may be the backbone itself, a :class:`~pcamtool.contract.Classifier`
    around it, or a wrapper (DDP, EMA copy) around that.
    """
    from ..zoo_timm import TimmBackbone  # no timm import: the module loads timm lazily

    for m in model.modules():
        if isinstance(m, TimmBackbone):
            return m.head()
    return None


def recipe_for(cfg: Any, resolved_kwargs: dict[str, Any]) -> Recipe:
    """The recipe of a run: ``--freeze-epochs``/``--lr-backbone-mult`` where given, else :func:`default_recipe`."""
    base = default_recipe(cfg.arch, resolved_kwargs.get("pretrained"))
    return Recipe(base.freeze_epochs if cfg.freeze_epochs is None else cfg.freeze_epochs,
                  base.backbone_mult if cfg.lr_backbone_mult is None else cfg.lr_backbone_mult, base.train_bn)


def param_groups(model: nn.Module, lr: float, backbone_mult: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the head at ``lr``, the rest at ``lr * backbone_mult``.

    Models without a separable head (the built-ins) give one group at ``lr``.
    Every parameter is in exactly one group, ``requires_grad`` or not, so
    :func:`set_backbone_frozen` can switch them later. Each group carries
    ``name`` (``"head"``/``"backbone"``/``"all"``) for logs.
    """
    head = head_module(model)
    params = list(model.parameters())
    if head is None or backbone_mult == 1.0:
        return [{"params": params, "lr": lr, "name": "all"}]
    head_ids = {id(p) for p in head.parameters()}
    return [{"params": [p for p in params if id(p) in head_ids], "lr": lr, "name": "head"},
            {"params": [p for p in params if id(p) not in head_ids], "lr": lr * backbone_mult, "name": "backbone"}]


def set_backbone_frozen(model: nn.Module, frozen: bool, train_bn: bool = True) -> int:
    """Freeze (``requires_grad=False``) every parameter but the head's, or unfreeze them all.

    Modules stay in whatever train/eval mode they are in: batch norm keeps
    updating its running statistics while frozen. With ``train_bn`` the
    normalization layers' own parameters stay trainable (fastai's default).
    A model without a separable head (the built-ins) is never frozen.

    Returns
    -------
    int
        How many parameters are trainable now.
    """
    head = head_module(model)
    keep: set[int] = set()
    if head is not None:
        keep = {id(p) for p in head.parameters()}
        if train_bn:
            keep |= {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    for p in model.parameters():
        p.requires_grad_(not frozen or head is None or id(p) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def frozen_in_epoch(epoch: int, freeze_epochs: int) -> bool:
    """Whether the backbone is frozen in ``epoch`` (1-based): the first ``freeze_epochs`` epochs."""
    return epoch <= freeze_epochs


def apply_epoch(model: nn.Module, epoch: int, recipe: Recipe) -> Optional[bool]:
    """Freeze or unfreeze for ``epoch``; returns the new state when it changed (for a log line), else None.

    Call at the start of every epoch, also the first after ``--resume``: the
    state follows from the epoch number alone, so a resumed run is frozen
    exactly when the uninterrupted run was.
    """
    if head_module(model) is None:
        return None
    frozen = frozen_in_epoch(epoch, recipe.freeze_epochs)
    was = not all(p.requires_grad for p in model.parameters())
    set_backbone_frozen(model, frozen, recipe.train_bn)
    return frozen if frozen != was else None


__all__ = ["PRETRAINED_RECIPE", "Recipe", "SCRATCH_RECIPE", "apply_epoch", "default_recipe", "frozen_in_epoch",
           "head_module", "param_groups", "set_backbone_frozen"]
