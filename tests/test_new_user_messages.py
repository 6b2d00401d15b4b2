"""What a new user reads: export says what it wrote once; infer says which test set it read."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pcamtool import pack
from pcamtool.cli import cli
from pcamtool.train.loop import fit

from helpers import write_kaggle
from test_train import learnable_store, tiny


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("newuser")
    store = learnable_store(root, n=48)
    return fit(tiny(store, root / "run", epochs=1, arch="pcamnet"), progress=False).run_dir


def stderr_lines(result) -> list[str]:
    return [ln for ln in result.stderr.replace("\r", "\n").splitlines() if ln.strip()]


def test_export_reports_what_it_wrote_in_one_line(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(cli, ["export", str(run_dir), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file() and r.stdout == ""
    lines = stderr_lines(r)
    mentions = [ln for ln in lines if str(out) in ln]
    assert len(mentions) == 1, lines                       # one line names the output, not two
    assert mentions[0].startswith("exported ") and "max |onnx - torch|" in mentions[0]
    assert not any(ln.startswith("wrote ") for ln in lines)


def test_infer_without_src_says_which_test_set_it_read(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "data"
    ids, _, _ = write_kaggle(data, n=6, seed=3, split="test", labels=False)
    pack(data / "test", progress=False)                    # data/test.h5 beside data/test/
    model = run_dir / "model.onnx"
    from pcamtool.export import export_onnx
    export_onnx(run_dir, model)
    monkeypatch.chdir(tmp_path)

    both = CliRunner().invoke(cli, ["infer", "--model", str(model), "--tta", "1"])
    assert both.exit_code == 0, both.output
    assert "no SRC given: reading data/test (data/test.h5 is there too: name it to read that instead)" \
        in both.stderr
    assert sorted(ln.split(",")[0] for ln in both.stdout.split()[1:]) == sorted(ids)

    shutil.rmtree(data / "test")
    store_only = CliRunner().invoke(cli, ["infer", "--model", str(model), "--tta", "1"])
    assert store_only.exit_code == 0, store_only.output
    assert "no SRC given: reading data/test.h5" in store_only.stderr
    assert "is there too" not in store_only.stderr
    assert store_only.stdout == both.stdout                # the same rows from the store

    given = CliRunner().invoke(cli, ["infer", "data/test.h5", "--model", str(model), "--tta", "1"])
    assert given.exit_code == 0 and "no SRC given" not in given.stderr


def test_infer_help_says_what_src_defaults_to() -> None:
    r = CliRunner().invoke(cli, ["infer", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "default: data/test if it exists, else data/test.h5" in text
