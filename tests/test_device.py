"""Device resolution and the precision stand-ins."""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import pcamtool.device as device_mod
from pcamtool.device import Precision, resolve_device
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


@pytest.fixture
def fresh_precision():
    """The precision decision is cached per device: clear it around a test that fakes the hardware."""
    device_mod._precision.cache_clear()
    yield
    device_mod._precision.cache_clear()


@pytest.mark.parametrize("feature", [None, "AVX-512 BF16", "AMX"])
def test_cpu_precision_follows_native_bf16(monkeypatch, fresh_precision, feature):
    """fp32 on a CPU without native bf16; bf16 autocast with it, unless PCAMTOOL_AMP=0; the reason recorded."""
    monkeypatch.setattr(device_mod, "cpu_bf16_feature", lambda: feature)
    p = Precision.for_device("cpu")
    assert p.channels_last and Precision.for_device(torch.device("cpu")).channels_last  # measured faster on CPUs too
    assert p.memory_format == torch.channels_last and not p.grad_scaler().is_enabled()
    with Precision.for_device("cpu").autocast():
        got = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    if feature:
        assert p.name == "bf16" and p.autocast_dtype == torch.bfloat16 and got == torch.bfloat16
        assert p.reason == f"bf16: CPU has {feature}; channels-last"
    else:
        assert p.name == "fp32" and p.autocast_dtype is None and got == torch.float32
        assert isinstance(Precision.for_device(torch.device("cpu")).autocast(), nullcontext)
        assert p.reason.startswith("fp32: cpu has no native bf16")
    device_mod._precision.cache_clear()
    monkeypatch.setenv("PCAMTOOL_AMP", "0")
    off = Precision.for_device("cpu")
    assert off.autocast_dtype is None and off.reason == "fp32: PCAMTOOL_AMP=0; channels-last"


def test_native_bf16_probe_matches_cpu_flags():
    """The probe agrees with what the kernel reports (Linux), so the decision is the hardware's."""
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with (not Linux)")
    flags = set(cpuinfo.read_text().split())
    assert (device_mod.cpu_bf16_feature() is not None) == bool({"avx512_bf16", "amx_tile"} & flags)


def fake_gpu(monkeypatch, cap, archs=("sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "compute_90")):
    """Make torch believe one GPU of compute capability ``cap`` is visible, under a torch built for ``archs``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
    # emulated bf16 answers True on any GPU: the decision must not ask it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.mark.parametrize("cap, name, reason", [
    ((9, 0), "bf16", "bf16: compute capability 9.0 >= 8.0"),
    ((8, 0), "bf16", "bf16: compute capability 8.0 >= 8.0"),
    ((8, 9), "bf16", "bf16: compute capability 8.9 >= 8.0"),
    ((7, 5), "fp16", "fp16 + GradScaler: compute capability 7.5 < 8.0 has no bf16 tensor cores"),
    ((7, 0), "fp16", "fp16 + GradScaler: compute capability 7.0 < 8.0 has no bf16 tensor cores"),
])
def test_cuda_precision_by_generation(monkeypatch, fresh_precision, cap, name, reason):
    """bf16 from compute capability 8.0, fp16 with a GradScaler on 7.x; channels-last on every GPU."""
    fake_gpu(monkeypatch, cap)
    dev = resolve_device("cuda")
    assert dev == torch.device("cuda") and resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    p = Precision.for_device(dev)
    assert (p.name, p.reason, p.channels_last, p.micro_batch) == (name, reason, True, 0)  # GPUs take whole batches
    assert p.memory_format == torch.channels_last
    assert p.needs_scaler == (name == "fp16")
    device_mod._precision.cache_clear()
    monkeypatch.setenv("PCAMTOOL_AMP", "0")
    off = Precision.for_device(dev)
    assert off.name == "fp32" and off.reason == "fp32: PCAMTOOL_AMP=0" and not off.needs_scaler


@pytest.mark.parametrize("cap, archs, why", [
    ((6, 0), ("sm_60", "sm_70"), r"Fake GPU \(compute capability 6.0\) is older than pcamtool supports "
                                  r"\(7.0 and newer: V100, T4, A100, H100\)"),
    ((7, 5), ("sm_80", "sm_90"), r"Fake GPU \(compute capability 7.5\): this torch build has no kernels "
                                 r"for it \(built for sm_80, sm_90\)"),
])
def test_unsupported_gpu_errors_for_cuda_and_falls_back_for_auto(monkeypatch, caplog, fresh_precision,
                                                                  cap, archs, why):
    fake_gpu(monkeypatch, cap, archs)
    for name in ("cuda", "cuda:0"):
        with pytest.raises(PcamError, match=rf"^--device {name}: {why}; use --device cpu$"):
            resolve_device(name)
    with caplog.at_level("WARNING", logger="pcamtool"):
        assert resolve_device("auto") == torch.device("cpu")
    assert any("training on the CPU instead" in r.getMessage() for r in caplog.records)


def test_arch_list_matching():
    """Cubins run on the same major with an equal or newer minor; PTX on anything newer."""
    ok = device_mod.arch_supported
    assert ok((8, 6), ["sm_80"]) and ok((8, 0), ["sm_80"]) and not ok((8, 0), ["sm_86"])
    assert not ok((9, 0), ["sm_80", "sm_86"]) and ok((9, 0), ["sm_80", "compute_80"])
    assert ok((10, 0), ["sm_100a"]) and ok((12, 0), ["compute_90"]) and not ok((7, 5), ["compute_80"])
    assert not ok((7, 5), [])


def test_fp16_precision_enables_the_scaler():
    p = Precision("cpu", torch.float16, False, "fp16: test")
    assert p.name == "fp16" and p.needs_scaler and p.grad_scaler().is_enabled()
    assert not Precision("cpu", torch.bfloat16, False).grad_scaler().is_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_on_cuda_follows_the_generation():
    dev = resolve_device("cuda")
    with Precision.for_device(dev).autocast():
        y = torch.ones(4, 4, device=dev) @ torch.ones(4, 4, device=dev)
    want = torch.bfloat16 if torch.cuda.get_device_capability(dev) >= (8, 0) else torch.float16
    assert y.dtype == want and Precision.for_device(dev).channels_last


def test_cpu_channels_last_can_be_forced_off(monkeypatch, fresh_precision):
    """PCAMTOOL_CHANNELS_LAST=0 keeps the CPU contiguous, and the reason says so."""
    monkeypatch.setenv("PCAMTOOL_CHANNELS_LAST", "0")
    p = Precision.for_device("cpu")
    assert not p.channels_last and p.memory_format == torch.contiguous_format
    assert p.reason.endswith("; contiguous (PCAMTOOL_CHANNELS_LAST=0)") and p.micro_batch == 0


@pytest.mark.parametrize("value, want", [("", 0), ("0", 0), ("32", 32), (" 64 ", 64)])
def test_cpu_micro_batch_is_opt_in_and_recorded(monkeypatch, fresh_precision, value, want):
    """Whole batches by default (micro-batches cost AUC on real tissue); PCAMTOOL_MICRO_BATCH=N asks for them."""
    monkeypatch.setenv("PCAMTOOL_MICRO_BATCH", value)
    p = Precision.for_device("cpu")
    assert p.micro_batch == want
    assert p.reason.endswith(f"; micro-batches of {want} (PCAMTOOL_MICRO_BATCH)" if want else "; channels-last")


@pytest.mark.parametrize("value", ["-1", "x", "1.5"])
def test_bad_micro_batch_setting_is_one_clear_error(monkeypatch, fresh_precision, value):
    monkeypatch.setenv("PCAMTOOL_MICRO_BATCH", value)
    with pytest.raises(PcamError, match=r"PCAMTOOL_MICRO_BATCH must be a whole number >= 0"):
        Precision.for_device("cpu")
