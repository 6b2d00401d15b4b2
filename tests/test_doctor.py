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
