"""What this machine is and what pcamtool will do on it: ``pcamtool doctor [--json]``.

Torch and CUDA, each GPU with the precision it would train in and why, the
CPU's features and bf16 support, each onnxruntime provider with "loads" or
why not, numba (kernels compiled or not, threading layer), h5py/HDF5, threads and free memory. Every
probe is guarded: a library that fails to import is reported, not raised.

Then the environment failures notebook users actually hit, one line each
with its fix (:func:`environment_problems`): a torch built for a newer CUDA
than the NVIDIA driver runs, an onnxruntime-gpu built for another CUDA major
than torch, plain ``onnxruntime`` beside ``onnxruntime-gpu``.

Example::

    pcamtool doctor --json | jq .onnxruntime.providers
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import platform
import re
import shutil
import subprocess
from typing import Any, Callable, Optional

from . import __version__
from .system import available_ram, cpu_threads

# CUDA versions PyTorch publishes wheels for (download.pytorch.org/whl/cuXYZ), oldest first
TORCH_CUDA_BUILDS = ("11.8", "12.1", "12.4", "12.6", "12.8", "12.9", "13.0")
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


def driver_cuda_version() -> Optional[str]:
    """The newest CUDA the installed NVIDIA driver runs (``"12.4"``), or None without a driver.

    Asked from the driver itself (``cuDriverGetVersion`` in libcuda), else
    from ``nvidia-smi``'s header; torch cannot tell, since a torch built for
    a newer CUDA simply finds no GPU.
    """
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if cuda.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
            return f"{version.value // 1000}.{version.value % 1000 // 10}"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        m = re.search(r"CUDA Version:\s*(\d+\.\d+)", out)
        return m.group(1) if m else None
    return None


def installed_distributions() -> set[str]:
    """Names of the installed Python distributions, normalized (``onnxruntime-gpu``)."""
    return {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower()
            for d in importlib.metadata.distributions() if d.metadata["Name"]}


def onnxruntime_cuda_build() -> Optional[str]:
    """The CUDA version onnxruntime-gpu was built for (``"12.2"``), or None (CPU-only or unknown)."""
    from onnxruntime.capi import build_and_package_info as info

    return getattr(info, "cuda_version", None) or None


def _major(version: Optional[str]) -> Optional[int]:
    m = re.match(r"(\d+)", version or "")
    return int(m.group(1)) if m else None


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def environment_problems(torch_cuda: Optional[str], driver_cuda: Optional[str], ort_cuda: Optional[str],
                         distributions: set[str]) -> list[str]:
    """One line per environment failure, each with its fix.

    Parameters
    ----------
    torch_cuda
        ``torch.version.cuda`` (None: a CPU-only torch).
    driver_cuda
        :func:`driver_cuda_version` (None: no NVIDIA driver).
    ort_cuda
        :func:`onnxruntime_cuda_build` (None: unknown or CPU-only).
    distributions
        :func:`installed_distributions`.
    """
    out = []
    if torch_cuda and driver_cuda and _version(torch_cuda) > _version(driver_cuda):
        if _major(torch_cuda) != _major(driver_cuda):
            fit = [c for c in TORCH_CUDA_BUILDS if _version(c) <= _version(driver_cuda)]
            how = (f"pip install torch --index-url https://download.pytorch.org/whl/cu{fit[-1].replace('.', '')}"
                   f" (with the torchvision of the same index), or update the driver" if fit
                   else "update the NVIDIA driver")
            out.append(f"torch is built for CUDA {torch_cuda} but the NVIDIA driver runs CUDA {driver_cuda} at "
                       f"most, so torch sees no GPU: {how}")
        else:  # same major: CUDA's minor-version compatibility runs it, but JIT-compiled (PTX) kernels fail
            out.append(f"torch is built for CUDA {torch_cuda}, newer than the driver's {driver_cuda}: it runs by "
                       f"CUDA minor-version compatibility, but kernels compiled at load time can fail; "
                       f"update the NVIDIA driver if CUDA errors appear")
    if torch_cuda and ort_cuda and _major(torch_cuda) != _major(ort_cuda):
        out.append(f"onnxruntime-gpu is built for CUDA {ort_cuda} and torch for CUDA {torch_cuda}: their CUDA "
                   f"libraries collide in one process (infer's CUDA provider fails to load): install the "
                   f"onnxruntime-gpu built for CUDA {_major(torch_cuda)} (see onnxruntime.ai's install matrix)")
    if "onnxruntime" in distributions and "onnxruntime-gpu" in distributions:
        out.append("both onnxruntime and onnxruntime-gpu are installed; they share one import folder, so the "
                   "last installed wins and the CUDA provider may vanish: pip uninstall -y onnxruntime "
                   "onnxruntime-gpu && pip install onnxruntime-gpu")
    return out


def _problems(torch_part: Any) -> list[str]:
    torch_cuda = torch_part.get("cuda_build") if isinstance(torch_part, dict) else None
    driver = _guard(driver_cuda_version)
    ort = _guard(onnxruntime_cuda_build)
    dists = _guard(installed_distributions)
    return environment_problems(torch_cuda, driver if isinstance(driver, str) else None,
                                ort if isinstance(ort, str) else None, dists if isinstance(dists, set) else set())


def diagnose() -> dict[str, Any]:
    """The whole report as plain JSON-able data (what ``doctor --json`` prints)."""
    report = {
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
    report["driver_cuda"] = _guard(driver_cuda_version)
    report["problems"] = _problems(report["torch"])
    return report


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
    driver = r.get("driver_cuda")
    if isinstance(driver, str) or driver is None:
        lines.append(f"nvidia       {'driver runs CUDA ' + driver + ' at most' if driver else 'no NVIDIA driver found'}")
    for problem in r.get("problems", []):
        lines.append(f"PROBLEM      {problem}")
    return "\n".join(lines)
