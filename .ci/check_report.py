"""Fail when a ``pip install --dry-run --report FILE`` would install torch or anything of its family.

pcamtool must install beside the torch a notebook already has; a pin or a
dependency that pulls another torch (with torchvision, triton and the
nvidia-* CUDA libraries) replaces it with a build the driver may not run.

Example::

    pip install --dry-run --report r.json . && python .ci/check_report.py r.json
"""
from __future__ import annotations

import json
import re
import sys

FORBIDDEN = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton.*|nvidia-.*)$")


def forbidden(report: dict) -> list[str]:
    """``name==version`` of each torch-family package the report would install."""
    out = []
    for item in report.get("install", []):
        meta = item.get("metadata", {})
        name = re.sub(r"[-_.]+", "-", meta.get("name", "")).lower()
        if FORBIDDEN.match(name):
            out.append(f"{name}=={meta.get('version')}")
    return out


def main(path: str) -> int:
    with open(path) as f:
        report = json.load(f)
    names = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report.get("install", [])]
    bad = forbidden(report)
    if bad:
        print(f"{path}: installing pcamtool would replace the user's torch: {', '.join(bad)}", file=sys.stderr)
        return 1
    print(f"{path}: {len(names)} packages, none torch-related: {' '.join(sorted(names))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: check_report.py REPORT.json")
    sys.exit(main(sys.argv[1]))
