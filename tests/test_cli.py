"""Every command has help text; the entry points work."""
from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from pcamtool.cli import cli


def test_every_command_has_help():
    names = sorted(cli.commands)
    for expected in ("pack", "info", "synth", "train", "export", "infer", "merge", "evaluate", "eda", "demo"):
        assert expected in names, expected
    for name, cmd in cli.commands.items():
        assert cmd.help and cmd.help.strip(), f"{name} has no help"
        r = CliRunner().invoke(cli, [name, "--help"])
        assert r.exit_code == 0 and "Usage:" in r.output, name
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                assert p.help, f"{name} {p.opts} has no help"


def test_python_m_and_version():
    r = subprocess.run([sys.executable, "-m", "pcamtool", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "pack" in r.stdout
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and "pcamtool" in r.output


def test_help_imports_no_heavy_module():
    """``pcamtool --help`` must answer without numba, h5py, torch or onnxruntime."""
    code = ("import sys\n"
            "from pcamtool.cli import main\n"
            "sys.argv = ['pcamtool', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('numba', 'h5py', 'torch', 'onnxruntime', 'sklearn', 'matplotlib') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout.splitlines()[-1]
    for name in ("pack", "train", "infer"):
        assert name in r.stdout
