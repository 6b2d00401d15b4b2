"""What this machine is and what pcamtool will do on it: ``pcamtool doctor [--json]``.

Torch and CUDA, each GPU with the precision it would train in and why, the
CPU's features and bf16 support, each onnxruntime provider with "loads" or
why not, numba (kernels compiled or not, threading layer), h5py/HDF5, threads and free memory. Every
probe is guarded: a library that fails to import is reported, not raised.

Example::

    pcamtool doctor --json | jq .onnxruntime.providers
"""
from __future__ import annotations

import platform
from typing import Any, Callable

from . import __version__
from .system import available_ram, cpu_threads

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def _guard(probe: Callable[[], Any]) -> Any:
    """``probe()``, or ``{"error": ...}`` naming what went wrong."""
    try:
        return probe()
    except Exception as exc:  # the report must come out whatever is broken
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}


def cpu_info() -> dict[str, Any]:
    """CPU model and the instruction-set flags that matter to torch and onnxruntime (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"model": model, "threads": cpu_threads(),
            "flags": {f: f in flags for f in CPU_FLAGS}}


def torch_info() -> dict[str, Any]:
    """torch, its CUDA build, each GPU and the precision each would train in (from :mod:`pcamtool.device`)."""
    import torch

    from . import device as dev

    cpu = dev.Precision.for_device("cpu")
    info: dict[str, Any] = {
        "version": torch.__version__, "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "arch_list": torch.cuda.get_arch_list() if torch.cuda.is_available() else [],
        "cpu_precision": {"precision": cpu.name, "why": getattr(cpu, "reason", "")},
        "gpus": [],
    }
    if not torch.cuda.is_available():
        info["why_no_gpu"] = ("this torch is a CPU-only build" if torch.version.cuda is None
                              else "no CUDA GPU is visible (driver missing, or CUDA_VISIBLE_DEVICES hides it)")
    unsupported = getattr(dev, "cuda_unsupported", lambda index: None)
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(i)
        prec = dev.Precision.for_device(torch.device("cuda", i))
        problem = unsupported(i)
        info["gpus"].append({
            "index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2 ** 30, 1),
            "trains": problem is None,
            "precision": prec.name if problem is None else None,
            "why": problem or getattr(prec, "reason", ""),
        })
    return info


def onnxruntime_info() -> dict[str, Any]:
    """onnxruntime's version and, per provider, "loads" or why it does not."""
    import onnxruntime as ort

    from .onnx_io import provider_problems

    problems = provider_problems()
    return {"version": ort.__version__, "has_preload_dlls": hasattr(ort, "preload_dlls"),
            "providers": {p: "loads" if why is None else why for p, why in problems.items()}}


def numba_info() -> dict[str, Any]:
    """numba's version, whether kernels are compiled (``PCAMTOOL_NUMBA``), and its threading layer setting.

    pcamtool's kernels are not ``parallel=True``: they release the GIL and run
    on pcamtool's own decoding threads, so numba's threading layer (reported
    as configured, without compiling anything) does not pace them.
    """
    import numba

    from .kernels.jit import ENABLED

    return {"version": numba.__version__, "jit": ENABLED,
            "threading_layer": numba.config.THREADING_LAYER, "threads": numba.config.NUMBA_NUM_THREADS}


def h5py_info() -> dict[str, Any]:
    import h5py

    return {"version": h5py.version.version, "hdf5": h5py.version.hdf5_version}


def diagnose() -> dict[str, Any]:
    """The whole report as plain JSON-able data (what ``doctor --json`` prints)."""
    return {
        "pcamtool": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _guard(cpu_info),
        "ram_available_gib": round(available_ram() / 2 ** 30, 1),
        "torch": _guard(torch_info),
        "onnxruntime": _guard(onnxruntime_info),
        "numba": _guard(numba_info),
        "h5py": _guard(h5py_info),
    }


def _section(name: str, part: Any, lines: list[str]) -> bool:
    """Append a section's error line; True if the section is usable."""
    if isinstance(part, dict) and "error" in part:
        lines.append(f"{name:<12} unavailable: {part['error']}")
        return False
    return True


def format_report(r: dict[str, Any]) -> str:
    """The report for people: one fact per line, what pcamtool will do on each device."""
    lines = [f"pcamtool     {r['pcamtool']} (Python {r['python']}, {r['platform']})"]
    cpu = r["cpu"]
    if _section("cpu", cpu, lines):
        flags = " ".join(f for f, on in cpu["flags"].items() if on) or "none of " + ", ".join(CPU_FLAGS)
        lines.append(f"cpu          {cpu['model']}, {cpu['threads']} usable threads; flags: {flags}")
    lines.append(f"memory       {r['ram_available_gib']} GiB available")
    t = r["torch"]
    if _section("torch", t, lines):
        lines.append(f"torch        {t['version']} (CUDA build {t['cuda_build'] or 'none'}, cuDNN {t['cudnn'] or 'none'})")
        lines.append(f"  cpu        trains in {t['cpu_precision']['precision']} ({t['cpu_precision']['why']})")
        for g in t["gpus"]:
            what = (f"trains in {g['precision']} ({g['why']})" if g["trains"] else f"cannot train: {g['why']}")
            lines.append(f"  cuda:{g['index']}     {g['name']}, capability {g['capability']}, "
                         f"{g['memory_gib']} GiB: {what}")
        if not t["gpus"]:
            lines.append(f"  gpu        none: {t.get('why_no_gpu', 'no GPU visible')}")
    o = r["onnxruntime"]
    if _section("onnxruntime", o, lines):
        lines.append(f"onnxruntime  {o['version']}")
        for p, state in o["providers"].items():
            lines.append(f"  {p:<10} {state}")
    n = r["numba"]
    if _section("numba", n, lines):
        lines.append(f"numba        {n['version']}, kernels {'compiled' if n['jit'] else 'plain Python (PCAMTOOL_NUMBA=0)'}"
                     f" on pcamtool's threads (threading layer setting: {n['threading_layer']})")
    h = r["h5py"]
    if _section("h5py", h, lines):
        lines.append(f"h5py         {h['version']} (HDF5 {h['hdf5']})")
    return "\n".join(lines)
