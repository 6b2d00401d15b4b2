"""Where in a patch a model looks: Grad-CAM (PyTorch runs) and occlusion sensitivity (any ONNX model).

Both give one map per image, ``(N, 96, 96)`` float32, aligned with the
patch, higher where the region pushes the model towards the class it
predicted (tumour for ``p >= 0.5``, normal below; ``sign`` overrides it).

* :func:`grad_cam` (Selvaraju et al. 2017) weights the feature maps of the
  network's last convolutional block (:func:`last_conv_block`) by the mean
  gradient of the logit and keeps the positive part; one forward and one
  backward per batch, the map is as coarse as that block (12x12 for
  ``plain4``) and bilinearly upsampled. Scaled to [0, 1] per image.
* :func:`occlusion` (Zeiler & Fergus 2014) greys out a ``window`` square at
  every ``stride`` step (with the patch's own mean colour, so no foreign
  colour is introduced) and records how much the model's log-odds drop
  (``space="logit"``; a confident model's probability barely moves when
  one square is hidden, 0.995 -> 0.99, while its log-odds drop by 0.7) or
  its probability (``space="prob"``); a pixel's value is the mean drop over
  the windows covering it. Model-agnostic: it needs only a function from uint8
  images to probabilities, e.g. :func:`onnx_runner`, which opens the models
  as ``pcamtool infer`` does (a ``pcamtool cv`` folder stands for its folds,
  averaged) and runs the occluded copies in batches.

Example::

    from pcamtool.saliency import grad_cam, occlusion, onnx_runner
    cams = grad_cam(net, images)                              # net: a run's Classifier
    maps = occlusion(onnx_runner(["runs/a/model.onnx"]), images)
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import numpy as np

from .errors import PcamError

if TYPE_CHECKING:
    import torch
    from torch import nn

SIZE = 96
WINDOW = 16       # occluded square: half a central 32x32, about one or two nuclei at PCam's 10x
STRIDE = 8
Runner = Callable[[np.ndarray], np.ndarray]   # uint8 (B, 96, 96, 3) -> probabilities (B,)


def _check_images(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (SIZE, SIZE, 3):
        raise PcamError(f"expected uint8 images (N, {SIZE}, {SIZE}, 3), got {x.dtype} {x.shape}")
    return x


def _signs(probs: np.ndarray, sign: Optional[np.ndarray]) -> np.ndarray:
    """+1 to explain tumour, -1 to explain normal; default: the class each image is predicted as."""
    if sign is None:
        return np.where(np.asarray(probs) >= 0.5, 1.0, -1.0)
    s = np.asarray(sign, np.float64).ravel()
    if len(s) != len(probs) or not np.isin(s, (-1.0, 1.0)).all():
        raise PcamError(f"sign must hold +1 or -1 for each of the {len(probs)} images")
    return s


# ------------------------------------------------------------------ Grad-CAM

def _output_dims(net: "nn.Module", x: "torch.Tensor") -> dict[int, int]:
    """``id(module) -> ndim`` of every submodule's tensor output on one forward of ``x``."""
    import torch

    dims: dict[int, int] = {}

    def hook(mod, _inp, out):
        if isinstance(out, torch.Tensor):
            dims[id(mod)] = out.dim()

    handles = [m.register_forward_hook(hook) for m in net.modules()]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return dims


def last_conv_block(net: "nn.Module", example: Optional["torch.Tensor"] = None) -> "nn.Module":
    """The module whose output Grad-CAM reads: the last convolutional block of ``net``'s backbone.

    Walks down from the backbone through the last child holding a
    convolution, and stops at the first module with a spatial (4-d) output
    that is a block of its own: a residual block (``pcamnet``, timm ResNets),
    or a plain container of single layers such as ``plain4``'s
    conv-BN-ReLU (post-activation, as in the paper). ``example`` is a uint8
    batch for one forward that finds the output shapes (default: one grey patch).

    Raises
    ------
    PcamError
        The network has no convolution with a spatial output.
    """
    import torch
    from torch import nn

    root = getattr(net, "backbone", net)
    if example is None:
        example = torch.full((1, SIZE, SIZE, 3), 128, dtype=torch.uint8,
                             device=next(net.parameters()).device)
    dims = _output_dims(net, example)
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

    def has_conv(m: nn.Module) -> bool:
        return any(isinstance(c, nn.Conv2d) for c in m.modules())

    module = root
    while True:
        kids = [c for c in module.children() if has_conv(c) and dims.get(id(c)) in (4, None)]
        spatial = dims.get(id(module)) == 4 and module is not root
        if spatial and (not isinstance(module, containers) or all(isinstance(k, nn.Conv2d) for k in kids)):
            return module
        if not kids:
            raise PcamError(f"{type(root).__name__}: found no convolutional block with a spatial output for Grad-CAM")
        module = kids[-1]


def grad_cam(net: "nn.Module", images: np.ndarray, sign: Optional[np.ndarray] = None,
             layer: Optional["nn.Module"] = None, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps of uint8 images for a :class:`~pcamtool.contract.Classifier` (logits out).

    Parameters
    ----------
    net
        Takes uint8 NHWC images, gives one logit per image; put in eval mode here.
    sign
        Per image, +1 to explain tumour, -1 normal; default: its predicted class.
    layer
        The module whose activations to weigh; default :func:`last_conv_block`.

    Returns
    -------
    (maps, probs)
        ``(N, 96, 96)`` float32 in [0, 1] (each scaled by its own maximum;
        all zero where nothing supports the class) and the probabilities of
        tumour the network gave, float64 ``(N,)``.
    """
    import torch
    import torch.nn.functional as F

    x_all = _check_images(images)
    net.eval()
    device = next(net.parameters()).device
    target = layer if layer is not None else last_conv_block(net)
    maps = np.zeros((len(x_all), SIZE, SIZE), np.float32)
    probs = np.zeros(len(x_all), np.float64)
    saved: dict[str, torch.Tensor] = {}

    def keep(_mod, _inp, out):
        out.retain_grad()
        saved["act"] = out

    handle = target.register_forward_hook(keep)
    try:
        for a in range(0, len(x_all), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(x_all[a:a + batch_size])).to(device)
            with torch.enable_grad():
                logits = net(x).float()
                p = torch.sigmoid(logits).detach().cpu().numpy().astype(np.float64)
                s = torch.as_tensor(_signs(p, None if sign is None else np.asarray(sign)[a:a + len(x)]),
                                    dtype=torch.float32, device=device)
                net.zero_grad(set_to_none=True)
                # images are independent in eval mode: one backward of the sum gives each its own gradient
                (logits * s).sum().backward()
            act = saved["act"]
            weights = act.grad.float().mean((2, 3), keepdim=True)
            cam = F.relu((weights * act.detach().float()).sum(1, keepdim=True))
            cam = F.interpolate(cam, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
            peak = cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
            maps[a:a + len(x)] = (cam / peak).cpu().numpy()
            probs[a:a + len(x)] = p
    finally:
        handle.remove()
        net.zero_grad(set_to_none=True)
    return maps, probs


# ----------------------------------------------------------------- occlusion

def _positions(window: int, stride: int) -> list[int]:
    """Window origins along one axis, the last flush with the edge so every pixel is covered."""
    if not 1 <= window <= SIZE or not 1 <= stride <= window:
        raise PcamError(f"occlusion window must be 1..{SIZE} and stride 1..window (no pixel left uncovered), "
                        f"got window {window} and stride {stride}")
    pos = list(range(0, SIZE - window + 1, stride))
    if pos[-1] != SIZE - window:
        pos.append(SIZE - window)
    return pos


def _occluded(images: np.ndarray, boxes: list[tuple[int, int]], window: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(image, box, copy)`` for every image and window: the copy greyed out in its own mean colour."""
    fill = images.reshape(len(images), -1, 3).mean(1).round().astype(np.uint8)
    for i in range(len(images)):
        for b, (y, x) in enumerate(boxes):
            c = images[i].copy()
            c[y:y + window, x:x + window] = fill[i]
            yield i, b, c


def occlusion(run: Runner, images: np.ndarray, sign: Optional[np.ndarray] = None, window: int = WINDOW,
              stride: int = STRIDE, batch_size: int = 256,
              base: Optional[np.ndarray] = None, space: str = "logit") -> tuple[np.ndarray, np.ndarray]:
    """Occlusion sensitivity of any model given as ``run(uint8 images) -> probabilities``.

    Parameters
    ----------
    run
        Probabilities of tumour for a uint8 ``(B, 96, 96, 3)`` batch, e.g. :func:`onnx_runner`.
    sign
        Per image, +1 to explain tumour (map = drop of the probability when
        a region is hidden), -1 normal (its rise); default: the predicted class.
    window, stride
        The occluded square's side and step in pixels.
    batch_size
        Occluded copies per ``run`` call.
    base
        The unoccluded probabilities, if already known (saves one pass).
    space
        ``logit``: drops of the log-odds ``log(p / (1 - p))`` (p clipped to
        [1e-6, 1 - 1e-6]); ``prob``: drops of the probability.

    Returns
    -------
    (maps, probs)
        ``(N, 96, 96)`` float32 in ``space``'s units (positive: the region
        supports the explained class) and the unoccluded probabilities ``(N,)``.
    """
    if space not in ("logit", "prob"):
        raise PcamError(f"occlusion space must be 'logit' or 'prob', got {space!r}")
    to_space = _logit if space == "logit" else (lambda v: np.asarray(v, np.float64))
    x = _check_images(images)
    pos = _positions(window, stride)
    boxes = [(y, xx) for y in pos for xx in pos]
    probs = np.asarray(run(x) if base is None else base, np.float64)
    s = _signs(probs, sign)
    ref = to_space(probs)
    drops = np.zeros((len(x), len(boxes)), np.float64)
    pending: list[tuple[int, int, np.ndarray]] = []

    def flush() -> None:
        out = to_space(run(np.stack([c for _, _, c in pending])))
        for (i, b, _), q in zip(pending, out):
            drops[i, b] = s[i] * (ref[i] - q)
        pending.clear()

    for item in _occluded(x, boxes, window):
        pending.append(item)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    total = np.zeros((len(x), SIZE, SIZE), np.float64)
    cover = np.zeros((SIZE, SIZE), np.float64)
    for b, (y, xx) in enumerate(boxes):
        total[:, y:y + window, xx:xx + window] += drops[:, b, None, None]
        cover[y:y + window, xx:xx + window] += 1
    return (total / cover).astype(np.float32), probs


def onnx_runner(models: Sequence[str | os.PathLike], provider: str = "auto", batch_size: int = 256,
                transform: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Runner:
    """Probabilities from ONNX models or ``pcamtool cv`` folders, opened as ``infer`` opens them.

    One TTA transform (occlusion moves a window, a flipped copy would
    average it away); several models are averaged. ``transform`` is applied
    to each batch first (the stain normalization ``infer`` would apply).
    """
    from .infer import expand_models
    from .onnx_io import open_session

    sessions = [open_session(p, provider, batch_size=batch_size, tta=1) for p in expand_models(models)]

    def run(images: np.ndarray) -> np.ndarray:
        x = transform(images) if transform is not None else images
        return np.mean([s.run(x) for s in sessions], axis=0)

    return run


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(q) - np.log1p(-q)


def display_scale(maps: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """Each map's positive part scaled to [0, 1] by its own maximum (what a gallery tile shows).

    A map whose maximum is below ``floor`` is divided by ``floor`` instead,
    so a patch where hiding nothing matters stays dark rather than having
    its noise stretched to full scale.
    """
    m = np.clip(np.asarray(maps, np.float32), 0, None)
    peak = np.maximum(m.reshape(len(m), -1).max(1), floor).reshape(-1, 1, 1)
    return np.where(peak > 0, m / np.where(peak > 0, peak, 1), 0).astype(np.float32)
