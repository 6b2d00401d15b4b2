"""A folder of wheels for an internet-off install beside an existing torch: ``make wheelhouse``.

pcamtool's wheel plus every wheel its core dependencies need, without torch
(the notebook's own CUDA build stays) and without anything torch drags in
(torchvision, triton, nvidia-*). Attach the folder to a Kaggle notebook as a
data set and install with::

    pip install --no-index --find-links /kaggle/input/pcamtool-wheels pcamtool

Example::

    python .ci/wheelhouse.py --out wheelhouse -c requirements.lock
    python .ci/wheelhouse.py --out wh312 --python-version 3.12   # for Colab's Python

The folder is written beside its final name and renamed at the end, so a
failed run never leaves a half-filled wheelhouse under that name.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a wheelhouse must never hold: the user's torch is kept, whatever it is.
TORCH_FAMILY = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch[-_]triton.*|nvidia[-_].*)$", re.I)
# manylinux tags Kaggle's and Colab's x86_64 images accept (glibc >= 2.28).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "linux_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_requirements(wheel: Path) -> list[str]:
    """The core ``Requires-Dist`` lines of a built wheel (no extras), torch left out."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    reqs = []
    for line in msg.get_all("Requires-Dist") or []:
        if re.search(r"\bextra\s*==", line):
            continue
        name = re.match(r"\s*([A-Za-z0-9_.-]+)", line).group(1)
        if not TORCH_FAMILY.match(canonical(name)):
            reqs.append(line)
    return reqs


def torch_family(folder: Path) -> list[str]:
    """Wheel files in ``folder`` that belong to torch's family (must be none)."""
    return sorted(p.name for p in folder.glob("*.whl") if TORCH_FAMILY.match(canonical(p.name.split("-")[0])))


# onnxruntime-gpu's CUDA major per release on PyPI, read from the libraries its
# CUDA provider links (libcublasLt.so.12 / .13): 1.19-1.26 CUDA 12, 1.27 on CUDA 13.
ORT_FOR_CUDA = {"12": "onnxruntime-gpu>=1.21,<1.27", "13": "onnxruntime-gpu>=1.27"}


def cuda_constraints(constraints: str | None, cuda: str, path: Path) -> str:
    """A constraints file like ``constraints`` whose onnxruntime-gpu is built for CUDA ``cuda``."""
    lines = Path(constraints).read_text().splitlines() if constraints else []
    kept = [ln for ln in lines if canonical(re.split(r"[=<>!~ ;\[]", ln.strip(), maxsplit=1)[0]) != "onnxruntime-gpu"]
    path.write_text("\n".join([*kept, ORT_FOR_CUDA[cuda]]) + "\n")
    return str(path)


def build(out: Path, constraints: str | None, python_version: str | None, cuda: str | None = None) -> list[Path]:
    """Write the wheelhouse to ``out`` (replacing an earlier one) and return its wheels."""
    out = out.resolve()
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if cuda:
        constraints = cuda_constraints(constraints, cuda, tmp.with_name(f".{out.name}.constraints-cuda{cuda}.txt"))
    pip = [sys.executable, "-m", "pip"]
    # --no-build-isolation: the building Python's setuptools is used, so no index is needed to build
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(ROOT)], check=True)
    (own,) = tmp.glob("pcamtool-*.whl")
    reqs = wheel_requirements(own)
    (tmp / "requirements.txt").write_text("\n".join(reqs) + "\n")
    cmd = [*pip, "download", "-q", "--only-binary=:all:", "-d", str(tmp), "-r", str(tmp / "requirements.txt")]
    if constraints:
        cmd += ["-c", constraints]
    if python_version:
        cmd += ["--python-version", python_version, "--implementation", "cp"]
        for plat in PLATFORMS:
            cmd += ["--platform", plat]
    subprocess.run(cmd, check=True)
    bad = torch_family(tmp)
    if bad:
        raise SystemExit(f"wheelhouse: refusing a folder with torch-family wheels: {', '.join(bad)}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if cuda:
        Path(constraints).unlink()
    return sorted(out.glob("*.whl"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "wheelhouse", help="folder to write (replaced)")
    ap.add_argument("-c", "--constraints", default=None, help="pin versions from this file (requirements.lock)")
    ap.add_argument("--python-version", default=None,
                    help="wheels for another CPython (e.g. 3.12 for Colab); default: this Python")
    ap.add_argument("--cuda", choices=sorted(ORT_FOR_CUDA), default=None,
                    help="onnxruntime-gpu built for this CUDA major (12 for a notebook whose torch is a cu12x build)")
    args = ap.parse_args()
    wheels = build(args.out, args.constraints, args.python_version, args.cuda)
    size = sum(w.stat().st_size for w in wheels) / 2 ** 20
    print(f"wheelhouse: {len(wheels)} wheels, {size:.0f} MiB in {args.out} (no torch)", file=sys.stderr)


if __name__ == "__main__":
    main()
