"""timm architectures in the zoo: ``timm:<name>`` built as a one-logit backbone with the zoo's contract.

:func:`pcamtool.models.create_model` sends every name starting with
``timm:`` here, so ``create_model("timm:resnet34", pretrained=PATH)`` is a
backbone like the built-ins: normalized float NCHW ``(B, 3, 96, 96)`` in,
logits ``(B,)`` out. timm is imported only when such a name is used, so plain
pcamtool (and ``pcamtool --help``) never loads it.

Arguments (what :func:`resolve` records, so a checkpoint rebuilds the network):

``timm_name``
    Any ``timm.list_models()`` name, optionally with a weight tag
    (``resnet34.a1_in1k``).
``img_size``
    Side the network sees (default 96, the patch). Larger sizes upscale
    bilinearly inside :meth:`TimmBackbone.forward`, so the exported graph
    still takes the 96x96 uint8 patch. Networks with a fixed input size
    (ViTs) are also built for it.
``pretrained``
    ``None`` (random init), ``True`` (timm's own download: needs internet or
    timm's cache) or the path of a local ``.pth``/``.safetensors``/``.bin``
    file (timm's ``pretrained_cfg_overlay=dict(file=PATH)``). Recorded for
    provenance; rebuilding a trained model passes ``pretrained=None``
    (:func:`pcamtool.models.without_pretrained`) because the checkpoint's
    weights replace whatever was loaded.
``timm_kwargs``
    Every other keyword, passed to ``timm.create_model`` (``drop_rate=0.2``).
``timm_version``
    The timm that resolved them (a different one at rebuild time is logged).

The head always has one class (``num_classes=1``); with pretrained weights
timm drops the file's ImageNet classifier and the head starts fresh.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .constants import PATCH_SIZE  # the side of a PCam patch: what the backbone receives
from .constants import TIMM_PREFIX as PREFIX  # the one definition of "timm:"
from .errors import MissingExtraError, ModelError
from .jsonutil import jsonable

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


class TimmMissingError(MissingExtraError, ModelError):
    """timm or torchvision is not installed (a ModelError, as callers of create_model expect)."""

_RECORDED = ("timm_name", "img_size", "pretrained", "timm_kwargs", "timm_version")

log = logging.getLogger("pcamtool")


EXTRA_HINT = "pip install 'pcamtool[timm]'"  # the extra that brings timm and torchvision


def _timm(label: str = "timm:NAME") -> Any:
    """The timm module, or one line naming the extra to install."""
    try:
        import timm
    except ImportError as exc:  # timm, or the torchvision it imports, is missing
        missing = getattr(exc, "name", None) or "timm"
        raise TimmMissingError(f"{label} needs timm and torchvision ({missing} is not installed): "
                         f"{EXTRA_HINT}") from None
    except (RuntimeError, OSError, AttributeError) as exc:  # a torchvision built for another torch fails at import
        raise ModelError(f"timm does not import beside this torch {torch.__version__} (install the torchvision "
                         f"built for it, e.g. {EXTRA_HINT}): {_first_line(exc)}") from None
    return timm


class TimmBackbone(nn.Module):
    """A timm network with one output, upscaling its input to ``img_size`` when that differs from 96.

    Parameters
    ----------
    net
        A timm model built with ``num_classes=1``.
    img_size
        Side of the square image the network sees.
    """

    def __init__(self, net: nn.Module, img_size: int = PATCH_SIZE) -> None:
        super().__init__()
        self.net = net
        self.img_size = int(img_size)
        # Decided once: the input is always the 96x96 patch, so the traced ONNX
        # graph holds either a fixed Resize or none (no shape-dependent branch).
        self.upscale = self.img_size != PATCH_SIZE

    def head(self) -> nn.Module:
        """The classifier layer (timm's ``get_classifier()``): what fine-tuning trains first."""
        return self.net.get_classifier()

    def forward(self, x: Tensor) -> Tensor:
        if self.upscale:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return self.net(x).squeeze(1)


def _check_name(timm_name: str) -> None:
    timm = _timm(PREFIX + str(timm_name))
    if isinstance(timm_name, str) and timm_name and timm.is_model(timm_name):
        return
    close = difflib.get_close_matches(str(timm_name), timm.list_models(), n=4, cutoff=0.6)
    hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else \
        " (see timm.list_models() for the names)"
    raise ModelError(f"unknown timm model {PREFIX}{timm_name}{hint}")


def _check_pretrained(label: str, pretrained: Any) -> Optional[bool | str]:
    """``pretrained`` as recorded: None, True, or an absolute path to an existing weights file."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        return True
    if not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained):
        raise ModelError(f"{label}: pretrained must be true or the path of a weights file, got {pretrained!r}")
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ModelError(f"{path}: pretrained weights file not found")
    if not path.name.lower().endswith(WEIGHT_SUFFIXES):
        raise ModelError(f"{path}: not a weights file (expected {', '.join(WEIGHT_SUFFIXES)})")
    return str(path.resolve())


def resolve(timm_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every argument of ``timm:<timm_name>`` (see the module docstring), checked without building it.

    ``kwargs`` may be what the user gave (``pretrained``, ``img_size`` and
    timm keywords) or an earlier result of this function (rebuilding).

    Raises
    ------
    ModelError
        Unknown name (close names suggested), a missing weights file,
        ``pretrained=True`` for a network timm has no weights for, a bad
        ``img_size``, or timm missing.
    """
    timm = _timm(PREFIX + str(timm_name))
    kw = dict(kwargs)
    if kw.get("timm_name", timm_name) != timm_name:
        raise ModelError(f"{PREFIX}{timm_name}: recorded timm_name is {kw['timm_name']!r}")
    kw.pop("timm_name", None)
    kw.pop("timm_version", None)  # recorded for information; the running timm builds it
    _check_name(timm_name)
    label = PREFIX + timm_name
    img_size = kw.pop("img_size", PATCH_SIZE)
    if not isinstance(img_size, int) or isinstance(img_size, bool) or not 32 <= img_size <= 1024:
        raise ModelError(f"{label}: img_size must be a whole number of pixels from 32 to 1024, got {img_size!r}")
    pretrained = _check_pretrained(label, kw.pop("pretrained", None))
    extra = kw.pop("timm_kwargs", {}) or {}
    if not isinstance(extra, dict):
        raise ModelError(f"{label}: timm_kwargs must be a mapping, got {extra!r}")
    timm_kwargs = {**extra, **kw}
    if "num_classes" in timm_kwargs and timm_kwargs["num_classes"] != 1:
        raise ModelError(f"{label}: the zoo's head has one output (num_classes=1), got {timm_kwargs['num_classes']}")
    timm_kwargs.pop("num_classes", None)
    if pretrained is True and not _has_weights(timm_name):
        raise ModelError(f"{label}: timm {timm.__version__} has no pretrained weights for it "
                         f"(pass a weights file, or train from random init)")
    return {"timm_name": timm_name, "img_size": img_size, "pretrained": pretrained,
            "timm_kwargs": jsonable(timm_kwargs), "timm_version": timm.__version__}


def _pretrained_cfg(timm_name: str) -> Any:
    _timm(PREFIX + timm_name)
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(timm_name)


def _has_weights(timm_name: str) -> bool:
    cfg = _pretrained_cfg(timm_name)
    return cfg is not None and bool(cfg.has_weights)


def normalization(resolved: dict[str, Any]) -> Optional[tuple[list[float], list[float]]]:
    """The pretrained network's input mean and std (pixels/255), or None when it starts from random init.

    A weights file is assumed to hold the weights of the name's default tag
    (ImageNet statistics for almost every timm network).
    """
    if resolved.get("pretrained") is None:
        return None
    cfg = _pretrained_cfg(resolved["timm_name"])
    if cfg is None or cfg.mean is None or cfg.std is None:
        return None
    return [float(v) for v in cfg.mean], [float(v) for v in cfg.std]


def create(timm_name: str, /, **kwargs: Any) -> TimmBackbone:
    """Build ``timm:<timm_name>`` (arguments as :func:`resolve` takes them), pretrained weights loaded.

    Raises
    ------
    ModelError
        As :func:`resolve`; timm cannot build it with these keywords; the
        weights file belongs to another architecture (the first mismatched
        key named); the download failed (no internet: pass a file instead).
    """
    timm = _timm(PREFIX + str(timm_name))
    full = resolve(timm_name, kwargs)
    if kwargs.get("timm_version") not in (None, timm.__version__):
        log.warning("%s%s was recorded with timm %s, building it with timm %s", PREFIX, timm_name,
                    kwargs["timm_version"], timm.__version__)
    label = PREFIX + timm_name
    tkw = dict(full["timm_kwargs"])
    cfg = _pretrained_cfg(timm_name)
    if cfg is not None and cfg.fixed_input_size:  # a ViT's position embedding is sized for its input
        tkw.setdefault("img_size", full["img_size"])
    pretrained = full["pretrained"]
    if pretrained is not None and not isinstance(pretrained, bool):
        _check_weights_file(pretrained)
        tkw["pretrained_cfg_overlay"] = dict(file=pretrained)
    offline = pretrained is True and not _online()
    with _LoadReport() as report, _hub_offline(offline):
        try:
            net = timm.create_model(timm_name, pretrained=pretrained is not None, num_classes=1, **tkw)
        except (TypeError, ValueError, KeyError, RuntimeError, OSError, ImportError, AttributeError,
                EOFError) as exc:
            raise _build_error(label, pretrained, exc) from None
        except AssertionError as exc:  # timm asserts shapes while building (a hybrid ViT's grid, for one)
            raise ModelError(f"{label} cannot be built for {full['img_size']}x{full['img_size']} inputs "
                             f"(--img-size {full['img_size']}): {_first_line(exc)}{_native_hint(cfg, full)}") from None
    if pretrained is not None:
        report.check(label, pretrained, net)
    backbone = TimmBackbone(net, full["img_size"])
    _check_input_size(backbone, label, cfg)
    return backbone


def _check_weights_file(path: str) -> None:
    """Refuse a weights file that is empty, unreadable, or not a mapping of names to tensors.

    timm would fail deep inside its loader (an ``EOFError`` that click reports
    as "Aborted!", a safetensors header error, ``'Tensor' object has no
    attribute 'items'``); reading the file first gives one line naming it.
    """
    p = Path(path)
    if p.stat().st_size == 0:
        raise ModelError(f"{p}: empty weights file (0 bytes)")
    if p.suffix.lower() == ".safetensors":
        try:
            from safetensors import safe_open
        except ImportError:
            return  # timm reports the missing package itself
        try:
            with safe_open(str(p), framework="pt") as f:
                if not list(f.keys()):
                    raise ModelError(f"{p}: the safetensors file holds no tensors")
        except ModelError:
            raise
        except Exception as exc:  # safetensors' own error type lives in a compiled module
            raise ModelError(f"{p}: not a readable safetensors file: {_first_line(exc)}") from None
        return
    # as timm's own loader: weights only, plus the argparse.Namespace its training checkpoints carry
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
            try:  # memory-mapped: a large file is not read twice into memory (zip-format files only)
                obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors: all mean "not a weights file we can read"
        raise ModelError(f"{p}: not a readable PyTorch weights file: {_first_line(exc)}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "state_dict_ema"):  # the wrappers timm's loader unwraps
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        what = "one tensor" if isinstance(obj, Tensor) else f"a {type(obj).__name__}"
        raise ModelError(f"{p}: holds {what}, not a state dict (a mapping of layer names to tensors)")


def _check_input_size(backbone: TimmBackbone, label: str, cfg: Any) -> None:
    """One forward pass of a blank patch: a size the network cannot take fails here, not mid-training.

    Hybrid ViTs, Swin and others need the side to fit their patch or window
    grid; timm reports that with a bare ``AssertionError`` at the first batch.
    """
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, 3, PATCH_SIZE, PATCH_SIZE))
    except Exception as exc:  # any failure here is the shape: the network itself was built
        raise ModelError(f"{label} cannot take {backbone.img_size}x{backbone.img_size} inputs "
                         f"(--img-size {backbone.img_size}): {_first_line(exc)}"
                         f"{_native_hint(cfg, {'img_size': backbone.img_size})}") from None
    finally:
        backbone.train(was_training)


def _native_hint(cfg: Any, full: dict[str, Any]) -> str:
    native = cfg.input_size[-1] if cfg is not None and getattr(cfg, "input_size", None) else None
    return f"; try --img-size {native}, its native size" if native and native != full["img_size"] else ""


def _online(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers, directly or through the environment's proxy.

    Offline, huggingface_hub retries each file for ~50 s and logs every retry;
    asking once here lets :func:`_hub_offline` make it look in its cache only.
    """
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = "https://huggingface.co"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        # a proxy accepts the connection even when it cannot reach the hub: ask through it
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            return True
        except urllib.error.HTTPError as exc:  # an HTTP answer: the hub (or its front) is reachable...
            return exc.code < 500  # ...unless the proxy itself answers 502/503/504 for a host it cannot reach
        except (OSError, ValueError):  # refused, timed out, a bad proxy URL
            return False
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Let huggingface_hub look in its cache only: offline, it would retry each file for ~30 s first."""
    try:
        from huggingface_hub import constants
    except ImportError:
        offline = False
    if not offline:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _build_error(label: str, pretrained: Any, exc: BaseException) -> ModelError:
    text = str(exc)
    size = re.search(r"size mismatch for ([\w.]+)", text)
    if size and pretrained not in (None, True):
        return ModelError(f"{pretrained}: weights of another architecture than {label} "
                          f"(first mismatched key: {size.group(1)})")
    if isinstance(pretrained, str) and isinstance(exc, KeyError):  # a checkpoint filter missed the key it remaps
        return ModelError(f"{pretrained}: weights of another architecture than {label} (no key {exc.args[0]!r})")
    if isinstance(pretrained, str) and isinstance(exc, (OSError, RuntimeError)) and "size mismatch" not in text:
        return ModelError(f"{pretrained}: not a readable weights file for {label}: {_first_line(exc)}")
    if pretrained is True and _network_error(exc):
        return ModelError(f"{label}: cannot download the pretrained weights (no internet here?): "
                          f"{_first_line(exc)}; offline, pass the weights file instead (--pretrained PATH)")
    return ModelError(f"cannot build {label}: {_first_line(exc)}")


def _network_error(exc: BaseException) -> bool:
    mod = type(exc).__module__ or ""
    return isinstance(exc, OSError) or mod.split(".")[0] in ("requests", "urllib3", "huggingface_hub", "urllib",
                                                             "http", "socket")


class _LoadReport(logging.Handler):
    """Collects the missing and unexpected keys timm reports while it loads pretrained weights.

    timm loads with ``strict=False`` whenever the head is replaced (our one
    class against ImageNet's 1000), so a file of another architecture would
    load silently, leaving most of the network at random init. timm reports
    the keys it could not match in its log (``timm.models._builder``); this
    handler catches them so :meth:`check` can refuse the file.
    """

    _PATTERN = re.compile(r"(Missing|Unexpected) keys \((.*)\) (?:discovered|found)")

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self._logger = logging.getLogger("timm")

    def __enter__(self) -> "_LoadReport":
        self._saved = (self._logger.level, self._logger.propagate)
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False  # timm's INFO lines would otherwise reach the user's log
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]

    def emit(self, record: logging.LogRecord) -> None:
        m = self._PATTERN.search(record.getMessage())
        if m:
            keys = [k.strip() for k in m.group(2).split(",") if k.strip()]
            (self.missing if m.group(1) == "Missing" else self.unexpected).extend(keys)

    def check(self, label: str, pretrained: Any, net: nn.Module) -> None:
        """Refuse weights that left any layer but the new head unloaded, or brought layers it does not have."""
        head = {n for n, _ in _named_head_tensors(net)}
        missing = [k for k in self.missing if k not in head]
        source = pretrained if isinstance(pretrained, str) else f"the pretrained weights of {label}"
        if missing:
            raise ModelError(f"{source}: weights of another architecture than {label} "
                             f"(first mismatched key: {missing[0]}, not in the file; {len(missing)} missing)")
        if self.unexpected:
            raise ModelError(f"{source}: weights of another architecture than {label} (first mismatched key: "
                             f"{self.unexpected[0]}, not in the model; {len(self.unexpected)} unexpected)")


def _named_head_tensors(net: nn.Module) -> list[tuple[str, Tensor]]:
    head = net.get_classifier()
    ids = {id(t) for t in list(head.parameters()) + list(head.buffers())}
    return [(n, t) for n, t in net.state_dict(keep_vars=True).items() if id(t) in ids]
