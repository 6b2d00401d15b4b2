"""Device resolution and the precision stand-ins."""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import pcamtool.device as device_mod
from pcamtool.device import Precision, autocast_context, resolve_device, use_channels_last
from pcamtool.errors import PcamError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == want and resolve_device("auto").type == want


def test_unknown_device_names_the_choices():
    with pytest.raises(PcamError, match=r"unknown device 'tpu' \(choose from auto, cpu, cuda, cuda:N\)"):
        resolve_device("tpu")
    with pytest.raises(PcamError, match="unknown device"):
        resolve_device("cuda:x")


@no_cuda
def test_cuda_without_a_gpu_is_a_clear_error():
    for name in ("cuda", "cuda:0"):
        with pytest.raises(PcamError, match=rf"--device {name}: .*(CPU-only|no CUDA GPU).*use --device cpu"):
            resolve_device(name)


@pytest.mark.parametrize("native", [False, True])
def test_cpu_precision_follows_native_bf16(monkeypatch, native):
    """fp32 on a CPU without native bf16; bf16 autocast with it, unless PCAMTOOL_AMP=0."""
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: native)
    device_mod._precision.cache_clear()
    try:
        p = Precision.for_device("cpu")
        assert not p.channels_last and use_channels_last(torch.device("cpu")) is False
        with autocast_context("cpu"):
            got = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        if native:
            assert p.name == "bf16" and p.autocast_dtype == torch.bfloat16 and got == torch.bfloat16
        else:
            assert p.name == "fp32" and p.autocast_dtype is None and got == torch.float32
            assert isinstance(autocast_context(torch.device("cpu")), nullcontext)
        device_mod._precision.cache_clear()
        monkeypatch.setenv("PCAMTOOL_AMP", "0")
        assert Precision.for_device("cpu").autocast_dtype is None
    finally:
        device_mod._precision.cache_clear()


def test_native_bf16_probe_matches_cpu_flags():
    """The probe agrees with what the kernel reports (Linux), so the decision is the hardware's."""
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with (not Linux)")
    flags = set(cpuinfo.read_text().split())
    assert device_mod.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_tile"} & flags)


def test_cuda_precision_decision(monkeypatch):
    """bf16 + channels-last where the GPU has bf16; fp32 without it or with PCAMTOOL_AMP=0."""
    device_mod._precision.cache_clear()
    try:
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        p = Precision.for_device(torch.device("cuda", 0))
        assert p.autocast_dtype == torch.bfloat16 and p.channels_last and p.name == "bf16"
        monkeypatch.setenv("PCAMTOOL_AMP", "0")
        assert Precision.for_device(torch.device("cuda", 0)).autocast_dtype is None
        monkeypatch.delenv("PCAMTOOL_AMP")
        device_mod._precision.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
        p = Precision.for_device(torch.device("cuda", 0))
        assert p.autocast_dtype is None and p.channels_last and p.name == "fp32"
    finally:
        device_mod._precision.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_autocast_on_cuda():
    dev = resolve_device("cuda")
    with autocast_context(dev):
        y = torch.ones(4, 4, device=dev) @ torch.ones(4, 4, device=dev)
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert y.dtype == want and use_channels_last(dev)
