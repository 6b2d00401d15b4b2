"""Installing pcamtool: the version, the wheel, the wheelhouse, and never replacing the user's torch.

The slow test builds what ``make wheelhouse`` builds, then installs it with
``pip install --no-index --find-links`` into a fresh venv that already holds a
torch (``PCAMTOOL_TEST_TORCH``, default 2.13.0: the CPU wheel this project's
machines carry), as an internet-off Kaggle notebook would.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import pcamtool
from pcamtool.cli import cli

ROOT = Path(__file__).resolve().parents[1]
USER_TORCH = os.environ.get("PCAMTOOL_TEST_TORCH", "2.13.0")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


check_report = _load("check_report", ROOT / ".ci" / "check_report.py")
wheelhouse = _load("wheelhouse", ROOT / ".ci" / "wheelhouse.py")


def test_version_is_the_installed_distributions():
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0
    assert r.output == f"pcamtool, version {pcamtool.__version__}\n"
    assert importlib.metadata.version("pcamtool") == pcamtool.__version__


def _report(*names: str) -> dict:
    return {"install": [{"metadata": {"name": n, "version": "1.0"}} for n in names]}


def test_dry_run_report_check_refuses_the_torch_family(tmp_path):
    clean = _report("numpy", "onnxruntime-gpu", "torchmetrics", "nvidiaish")
    assert check_report.forbidden(clean) == []
    bad = _report("numpy", "torch", "torchvision", "triton", "nvidia-cublas", "nvidia_cudnn_cu13", "pcamtool")
    assert check_report.forbidden(bad) == ["torch==1.0", "torchvision==1.0", "triton==1.0", "nvidia-cublas==1.0",
                                           "nvidia-cudnn-cu13==1.0"]
    (tmp_path / "ok.json").write_text(json.dumps(clean))
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert check_report.main(str(tmp_path / "ok.json")) == 0
    assert check_report.main(str(tmp_path / "bad.json")) == 1


def test_the_core_dependencies_are_ranges_without_torchvision_or_timm():
    reqs = importlib.metadata.requires("pcamtool") or []
    core = [r for r in reqs if "extra ==" not in r.replace("'", '"')]
    names = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in core}
    assert {"torch", "numpy", "onnxruntime-gpu", "h5py"} <= names
    assert not names & {"timm", "torchvision", "onnxruntime"}
    assert not [r for r in core if "==" in r], core  # nothing in the core is pinned
    extras = importlib.metadata.metadata("pcamtool").get_all("Provides-Extra")
    assert {"timm", "slides", "tensorboard", "test", "mutate"} <= set(extras)
    timm_reqs = [r for r in reqs if 'extra == "timm"' in r.replace("'", '"')]
    assert {r.split(">")[0].strip() for r in timm_reqs} == {"timm", "torchvision"}


def test_the_lock_fixes_every_version_of_our_venv():
    lines = [ln for ln in (ROOT / "requirements.lock").read_text().splitlines() if ln and not ln.startswith("#")]
    assert all("==" in ln for ln in lines), [ln for ln in lines if "==" not in ln]
    locked = {ln.split("==")[0].lower().replace("_", "-"): ln.split("==")[1] for ln in lines}
    assert locked["torch"] == "2.14.1" and locked["torchvision"] == "0.29.1" and "timm" in locked
    assert "pcamtool" not in locked


def test_a_cuda12_wheelhouse_swaps_the_locks_onnxruntime_for_a_cuda12_build(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==2.1.0\nonnxruntime-gpu==1.31.1\nonnxruntime_gpu==1.31.1\nonnx==1.17.0\n")
    lines = Path(wheelhouse.cuda_constraints(str(lock), "12", tmp_path / "c12.txt")).read_text().splitlines()
    assert lines == ["numpy==2.1.0", "onnx==1.17.0", "onnxruntime-gpu>=1.21,<1.27"]
    lines = Path(wheelhouse.cuda_constraints(None, "13", tmp_path / "c13.txt")).read_text().splitlines()
    assert lines == ["onnxruntime-gpu>=1.27"]


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=900, **kw)
    assert r.returncode == 0, f"{cmd}: {r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="session")
def house(tmp_path_factory) -> Path:
    """What ``make wheelhouse`` writes: pcamtool's wheel and every non-torch dependency, versions from the lock."""
    out = tmp_path_factory.mktemp("wheelhouse") / "wheels"
    _run([sys.executable, ROOT / ".ci" / "wheelhouse.py", "--out", out, "-c", ROOT / "requirements.lock"])
    return out


@pytest.mark.slow
def test_wheelhouse_installs_offline_beside_the_users_torch(house, tmp_path):
    wheels = sorted(p.name for p in house.glob("*.whl"))
    assert any(w.startswith(f"pcamtool-{pcamtool.__version__}-") for w in wheels), wheels
    assert wheelhouse.torch_family(house) == [] and not [w for w in wheels if w.startswith(("timm-", "torch"))]
    assert not list(house.parent.glob(".wheels.partial"))  # written aside, renamed at the end
    for dep in ("numpy", "h5py", "numba", "onnxruntime_gpu", "scikit_learn", "click"):
        assert any(w.lower().startswith(dep + "-") for w in wheels), dep
    # a venv that already holds the user's torch, as a notebook does
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    py, bin_ = venv / "bin" / "python", venv / "bin"
    _run([py, "-m", "pip", "install", "-q", f"torch=={USER_TORCH}"])
    _run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", house, "pcamtool"], cwd=tmp_path)
    r = _run([py, "-c", "import torch, importlib.util as u; print(torch.__version__, u.find_spec('timm') is None)"],
             cwd=tmp_path)
    version, no_timm = r.stdout.split()
    assert version.split("+")[0] == USER_TORCH and no_timm == "True"  # the user's torch is still there
    # the wheel's console script, from outside the source tree
    assert _run([bin_ / "pcamtool", "--version"], cwd=tmp_path).stdout == f"pcamtool, version {pcamtool.__version__}\n"
    r = _run([bin_ / "pcamtool", "doctor", "--json"], cwd=tmp_path)
    report = json.loads(r.stdout)
    assert report["torch"]["version"].split("+")[0] == USER_TORCH and report["problems"] == []
    assert report["onnxruntime"]["providers"]["cpu"] == "loads"
    # a tiny pack with the installed package
    _run([py, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); from helpers import write_kaggle; "
                    f"from pathlib import Path; write_kaggle(Path('.'), n=12)"], cwd=tmp_path)
    _run([bin_ / "pcamtool", "-q", "pack", "train"], cwd=tmp_path)
    r = _run([bin_ / "pcamtool", "-q", "info", "train.h5"], cwd=tmp_path)
    assert [ln.split() for ln in r.stdout.splitlines() if ln.startswith("images")] == [["images", "12"]]
    where = _run([py, "-c", "import pcamtool; print(pcamtool.__file__)"], cwd=tmp_path).stdout.strip()
    assert where.startswith(str(venv)), where  # the installed wheel ran, not the checkout
    # timm is an extra: one line naming it, exit 1
    r = subprocess.run([bin_ / "pcamtool", "-q", "train", "train.h5", "--arch", "timm:resnet18", "--epochs", "1"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "Error: timm:resnet18 needs timm and torchvision (timm is not installed): pip install 'pcamtool[timm]'"]
