"""Device and precision, decided once.

Everything that differs between a CPU and a GPU run is settled here and handed
to the rest of the code as stand-ins, so that the training and evaluation
loops contain no ``if cuda`` branches (the nanoGPT pattern): autocast becomes
``nullcontext()`` where it is off, the loss scaler ``GradScaler(enabled=False)``
where it is not needed, channels-last a plain memory format.

Precision by GPU generation (compute capability):

* >= 8.0 (A100, L4, H100, ...): bf16 autocast, no loss scaler.
* 7.x (V100, T4): fp16 autocast with ``torch.amp.GradScaler``. These GPUs
  have no bf16 tensor cores, and ``torch.cuda.is_bf16_supported()`` answers
  True there only because it can *emulate* bf16 (slowly; ``--compile`` fails
  in ptxas), so it is not asked.
* < 7.0, or an architecture this torch build was not compiled for (a P100
  under a torch without sm_60): not supported. ``--device cuda`` is an
  error; ``--device auto`` warns and trains on the CPU.

CUDA runs use channels-last, which with autocast puts the convolutions on the
tensor cores. The CPU trains in bf16 autocast where it computes bf16 natively
(AVX-512 BF16 or AMX, which oneDNN's convolutions use), else fp32, and
channels-last too: with torch 2.14 on the 2-core AMD EPYC reference machine
a channels-last training step ran 1.41x (plain4) and 1.25x (pcamnet) the
contiguous one in fp32, and 1.67x / 1.21x in bf16, measured side by side
(benchmarks/RESULTS.md; torch 2.13 had measured the opposite for pcamnet).
A ``plain4`` step also ran 1.6-2.1x faster in bf16 than in fp32 there.

``PCAMTOOL_MICRO_BATCH=N`` runs each CPU batch as slices of N images whose
gradients add up before the one optimizer step. A 32-image slice keeps the
full-resolution activations (32 channels at 96x96, 38 MB in fp32) near the
caches, where the whole 128-image batch (151 MB per tensor) streams every
elementwise pass (batch norm, ReLU, pooling and their backward) through
DRAM: on the reference machine (torch 2.14.1, channels-last) the plain4
fp32 step ran 1.56x the whole batch's (2.1x the contiguous step), bf16
1.40x, pcamnet fp32 1.17x. It is the same batch-128 step with the same
learning rate, except that batch norm normalizes each slice by its own
statistics ("ghost batch norm"), and that cost accuracy: plain4's 40
default epochs on the real sample scored validation AUC 0.945 / 0.942
against 0.950 / 0.948 with whole batches (two seeds each; the same with
the running statistics' momentum scaled per slice). So it is off unless
asked for (``CPU_MICRO_BATCH`` = 0), and recorded in the run's precision
reason when on. GPUs always take whole batches.

``PCAMTOOL_AMP=0`` in the environment switches autocast off everywhere (for
debugging numerics); ``PCAMTOOL_CHANNELS_LAST=0`` keeps the CPU contiguous;
``PCAMTOOL_MICRO_BATCH=N`` sets the CPU's micro-batch (0, the default: the
whole batch). None changes anything else.

Example::

    device = resolve_device("auto")
    precision = Precision.for_device(device)
    ctx = precision.autocast()          # build once, enter every step
    with ctx:
        logits = net(x)
"""
from __future__ import annotations

import logging
import os
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import torch

from .envflags import env_flag
from .errors import PcamError

log = logging.getLogger("pcamtool")

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
MIN_CAPABILITY = (7, 0)     # tensor cores; older GPUs are not worth training on
BF16_CAPABILITY = (8, 0)    # bf16 tensor cores (Ampere and newer)
CPU_MICRO_BATCH = 0         # images per forward/backward on a CPU; 0: whole batches (module docstring)


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``--device NAME``.

    Parameters
    ----------
    name
        ``auto`` (a supported CUDA GPU if one is visible, else the CPU),
        ``cpu``, ``cuda`` or ``cuda:N``.

    Raises
    ------
    PcamError
        An unknown name, a CUDA device asked for where there is none, or a
        GPU this torch cannot train on (see the module docstring).
    """
    name = str(name).strip().lower()
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        why = cuda_unsupported(0)
        if why is not None:
            log.warning("%s: training on the CPU instead", why)
            return torch.device("cpu")
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise PcamError(f"unknown device {name!r} (choose from {', '.join(DEVICE_CHOICES)})")
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else "no CUDA GPU is visible (driver missing, or CUDA_VISIBLE_DEVICES hides it)")
        raise PcamError(f"--device {name}: {why}; use --device cpu or auto")
    index, count = int(m.group(1) or 0), torch.cuda.device_count()
    if index >= count:
        raise PcamError(f"--device {name}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    why = cuda_unsupported(index)
    if why is not None:
        raise PcamError(f"--device {name}: {why}; use --device cpu")
    return torch.device("cuda", index) if m.group(1) is not None else torch.device("cuda")


def cuda_unsupported(index: int = 0) -> Optional[str]:
    """Why GPU ``index`` cannot train here, or None when it can."""
    cap = tuple(torch.cuda.get_device_capability(index))
    gpu = f"{torch.cuda.get_device_name(index)} (compute capability {cap[0]}.{cap[1]})"
    if cap < MIN_CAPABILITY:
        return f"{gpu} is older than pcamtool supports (7.0 and newer: V100, T4, A100, H100)"
    archs = torch.cuda.get_arch_list()
    if archs and not arch_supported(cap, archs):
        return f"{gpu}: this torch build has no kernels for it (built for {', '.join(archs)})"
    return None


def arch_supported(cap: Sequence[int], archs: Sequence[str]) -> bool:
    """Whether kernels built for ``archs`` (``sm_86``, ``compute_90``, ...) run on capability ``cap``.

    A cubin for ``sm_XY`` runs on ``X.Z`` with ``Z >= Y`` (same major);
    PTX for ``compute_XY`` is compiled on load for any newer GPU.
    """
    for arch in archs:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)[a-z]?", arch)
        if m is None:
            continue
        major, minor = int(m.group(2)), int(m.group(3))
        if m.group(1) == "sm" and major == cap[0] and minor <= cap[1]:
            return True
        if m.group(1) == "compute" and (major, minor) <= tuple(cap):
            return True
    return False


@dataclass(frozen=True)
class Precision:
    """How a device computes: autocast dtype (``None`` = fp32), loss scaling, memory format, micro-batch, and why.

    Build it with :meth:`for_device`; the decision depends only on the
    device, its compute capability (CUDA) or native bf16 (CPU), and the
    ``PCAMTOOL_*`` switches of the module docstring.
    """

    device_type: str
    autocast_dtype: Optional[torch.dtype]
    channels_last: bool
    reason: str = ""
    micro_batch: int = 0      # images per forward/backward within a step; 0: the whole batch

    @classmethod
    def for_device(cls, device: torch.device | str) -> "Precision":
        device = torch.device(device)
        index = (device.index or 0) if device.type == "cuda" else None
        return _precision(device.type, index, env_flag("PCAMTOOL_AMP"), env_flag("PCAMTOOL_CHANNELS_LAST"),
                          cpu_micro_batch())

    @property
    def name(self) -> str:
        """``bf16``, ``fp16`` or ``fp32``, for logs and run configs."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.autocast_dtype, "fp32")

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 have fp32's range."""
        return self.autocast_dtype == torch.float16

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> AbstractContextManager:
        """An autocast context (``nullcontext()`` in fp32); one may be entered again and again."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """``torch.amp.GradScaler``, enabled only for fp16 (a pass-through otherwise)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)


def cpu_micro_batch() -> int:
    """The CPU's micro-batch: ``PCAMTOOL_MICRO_BATCH`` (0 = whole batch) or :data:`CPU_MICRO_BATCH`.

    Raises
    ------
    PcamError
        ``PCAMTOOL_MICRO_BATCH`` is not a whole number >= 0.
    """
    raw = os.environ.get("PCAMTOOL_MICRO_BATCH", "").strip()
    if not raw:
        return CPU_MICRO_BATCH
    if not raw.isdigit():
        raise PcamError(f"PCAMTOOL_MICRO_BATCH must be a whole number >= 0 (0: the whole batch), got {raw!r}")
    return int(raw)


@lru_cache(maxsize=None)
def _precision(device_type: str, index: Optional[int], amp: bool, cpu_channels_last: bool = True,
               micro_batch: int = CPU_MICRO_BATCH) -> Precision:
    if device_type == "cuda":
        if not amp:
            return Precision("cuda", None, True, "fp32: PCAMTOOL_AMP=0")
        dtype, why = cuda_autocast(tuple(torch.cuda.get_device_capability(index)))
        return Precision("cuda", dtype, True, why)
    feature = cpu_bf16_feature() if device_type == "cpu" else None
    cl = cpu_channels_last and device_type == "cpu"
    micro = micro_batch if device_type == "cpu" else 0
    layout = ("; channels-last" if cl else "; contiguous (PCAMTOOL_CHANNELS_LAST=0)") + (
        f"; micro-batches of {micro} (PCAMTOOL_MICRO_BATCH)" if micro else "")
    if not amp:
        return Precision(device_type, None, cl, "fp32: PCAMTOOL_AMP=0" + layout, micro)
    if feature is None:
        return Precision(device_type, None, cl, f"fp32: {device_type} has no native bf16 (AVX-512 BF16 or AMX)"
                         + layout, micro)
    return Precision(device_type, torch.bfloat16, cl, f"bf16: CPU has {feature}" + layout, micro)


def cuda_autocast(cap: tuple[int, ...]) -> tuple[Optional[torch.dtype], str]:
    """Autocast dtype for a GPU of compute capability ``cap``, and why (the table above)."""
    cc = f"compute capability {cap[0]}.{cap[1]}"
    if cap >= BF16_CAPABILITY:
        return torch.bfloat16, f"bf16: {cc} >= 8.0"
    if cap >= MIN_CAPABILITY:
        return torch.float16, f"fp16 + GradScaler: {cc} < 8.0 has no bf16 tensor cores"
    return None, f"fp32: {cc} < 7.0 is not supported"


def cpu_bf16_feature() -> Optional[str]:
    """The CPU feature that computes bf16 in hardware (``AVX-512 BF16`` or ``AMX``), or None."""
    for probe, feature in (("_is_avx512_bf16_supported", "AVX-512 BF16"), ("_is_amx_tile_supported", "AMX")):
        fn = getattr(torch.cpu, probe, None)  # private probes: absent in some torch builds
        try:
            if fn is not None and fn():
                return feature
        except Exception:
            continue
    return None
