"""pcamtool doctor: the machine report, for people and as JSON."""
from __future__ import annotations

import json

from click.testing import CliRunner

from pcamtool import doctor, onnx_io
from pcamtool.cli import cli


def test_doctor_json_has_every_section_and_says_why_cuda_does_not_load():
    r = CliRunner().invoke(cli, ["-q", "doctor", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    for key in ("pcamtool", "python", "cpu", "ram_available_gib", "torch", "onnxruntime", "numba", "h5py"):
        assert key in report, key
    assert set(report["cpu"]["flags"]) == set(doctor.CPU_FLAGS) and report["cpu"]["threads"] >= 1
    torch_part = report["torch"]
    assert torch_part["cpu_precision"]["precision"] in ("bf16", "fp32") and torch_part["cpu_precision"]["why"]
    providers = report["onnxruntime"]["providers"]
    assert providers["cpu"] == "loads"
    problems = onnx_io.provider_problems()
    for name in ("cuda", "tensorrt"):  # "loads", or the reason onnx_io gives: never empty
        assert providers[name] == ("loads" if problems[name] is None else problems[name]) and providers[name]
    if not torch_part["cuda_available"]:
        assert torch_part["gpus"] == [] and torch_part["why_no_gpu"]
    assert report["h5py"]["hdf5"] and report["numba"]["version"]


def test_doctor_text_for_people():
    r = CliRunner().invoke(cli, ["-q", "doctor"])
    assert r.exit_code == 0, r.output
    text = r.stdout
    for word in ("torch", "onnxruntime", "numba", "h5py", "trains in", "flags:"):
        assert word in text, word
    assert "cpu        loads" in text


def test_a_broken_library_is_reported_not_raised(monkeypatch):
    def broken():
        raise ImportError("libhdf5.so.310: cannot open shared object file")

    monkeypatch.setattr(doctor, "h5py_info", broken)
    report = doctor.diagnose()
    assert report["h5py"] == {"error": "ImportError: libhdf5.so.310: cannot open shared object file"}
    assert "h5py         unavailable: ImportError: libhdf5.so.310" in doctor.format_report(report)


def test_gpu_lines_show_precision_or_why_not():
    report = doctor.diagnose()
    report["torch"]["gpus"] = [
        {"index": 0, "name": "Tesla T4", "capability": "7.5", "memory_gib": 14.6, "trains": True,
         "precision": "fp16", "why": "fp16 + GradScaler: compute capability 7.5 < 8.0"},
        {"index": 1, "name": "Tesla P100", "capability": "6.0", "memory_gib": 16.0, "trains": False,
         "precision": None, "why": "older than pcamtool supports"}]
    text = doctor.format_report(report)
    assert "cuda:0     Tesla T4, capability 7.5, 14.6 GiB: trains in fp16 (fp16 + GradScaler" in text
    assert "cuda:1     Tesla P100, capability 6.0, 16.0 GiB: cannot train: older" in text


# ------------------------------------ environment failures users hit: one line each, with the fix


def test_torch_built_for_a_newer_cuda_than_the_driver():
    (line,) = doctor.environment_problems("13.0", "12.4", None, set())
    assert line.startswith("torch is built for CUDA 13.0 but the NVIDIA driver runs CUDA 12.4 at most")
    assert "--index-url https://download.pytorch.org/whl/cu124" in line
    (line,) = doctor.environment_problems("12.8", "12.2", None, set())  # same major: runs, with a caveat
    assert "minor-version compatibility" in line and "update the NVIDIA driver" in line
    (line,) = doctor.environment_problems("12.1", "11.4", None, set())  # no PyTorch build old enough
    assert line.endswith("so torch sees no GPU: update the NVIDIA driver")
    assert doctor.environment_problems("12.4", "12.4", None, set()) == []
    assert doctor.environment_problems("12.4", "13.0", None, set()) == []   # a newer driver runs older CUDA
    assert doctor.environment_problems(None, "12.4", None, set()) == []     # CPU-only torch
    assert doctor.environment_problems("13.0", None, None, set()) == []     # no driver: torch says so itself


def test_onnxruntime_gpu_for_another_cuda_major_than_torch():
    (line,) = doctor.environment_problems("12.4", None, "13.0", set())
    assert line.startswith("onnxruntime-gpu is built for CUDA 13.0 and torch for CUDA 12.4")
    assert "onnxruntime-gpu built for CUDA 12" in line
    assert doctor.environment_problems("12.4", None, "12.2", set()) == []
    assert doctor.environment_problems(None, None, "13.0", set()) == []  # CPU torch: nothing collides


def test_plain_onnxruntime_beside_onnxruntime_gpu():
    (line,) = doctor.environment_problems(None, None, None, {"onnxruntime", "onnxruntime-gpu", "numpy"})
    assert line.startswith("both onnxruntime and onnxruntime-gpu are installed")
    assert line.endswith("pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    assert doctor.environment_problems(None, None, None, {"onnxruntime-gpu"}) == []
    assert doctor.installed_distributions() >= {"onnxruntime-gpu", "torch", "numpy"}  # this venv, as it is


def test_the_report_shows_each_problem_from_the_probes(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(doctor, "driver_cuda_version", lambda: "12.4")
    monkeypatch.setattr(doctor, "onnxruntime_cuda_build", lambda: "12.2")
    monkeypatch.setattr(doctor, "installed_distributions", lambda: {"onnxruntime", "onnxruntime-gpu"})
    r = CliRunner().invoke(cli, ["-q", "doctor"])
    assert r.exit_code == 0, r.output
    problems = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBLEM")]
    assert len(problems) == 3, r.stdout
    assert "nvidia       driver runs CUDA 12.4 at most" in r.stdout
    assert "CUDA 13.0 but the NVIDIA driver runs CUDA 12.4" in problems[0]
    assert "onnxruntime-gpu is built for CUDA 12.2" in problems[1] and "both onnxruntime" in problems[2]
    report = json.loads(CliRunner().invoke(cli, ["-q", "doctor", "--json"]).stdout)
    assert report["driver_cuda"] == "12.4" and len(report["problems"]) == 3


def test_this_machine_reports_no_problem_it_does_not_have():
    report = doctor.diagnose()
    torch_cuda = report["torch"]["cuda_build"]
    if report["driver_cuda"] is None:  # no driver here: no CUDA line can be a problem
        assert not [p for p in report["problems"] if "driver" in p]
    assert report["problems"] == doctor.environment_problems(
        torch_cuda, report["driver_cuda"], doctor.onnxruntime_cuda_build(), doctor.installed_distributions())


def test_driver_cuda_version_from_libcuda_then_nvidia_smi(monkeypatch, tmp_path):
    import ctypes

    class FakeLibcuda:
        def cuDriverGetVersion(self, ref):  # the driver API writes e.g. 12040 for CUDA 12.4
            ref._obj.value = 12040
            return 0

    monkeypatch.setattr(doctor.ctypes, "CDLL", lambda name: FakeLibcuda())
    assert doctor.driver_cuda_version() == "12.4"

    def no_lib(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(doctor.ctypes, "CDLL", no_lib)
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4     |'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert doctor.driver_cuda_version() == "12.4"
    smi.unlink()
    assert doctor.driver_cuda_version() is None
    assert ctypes.CDLL is no_lib
