"""Training: determinism on CPU, self-describing checkpoints, resume, bad input."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pcamtool import pack
from pcamtool.config import AugmentConfig
from pcamtool.train.runs import build_model, load_checkpoint
from pcamtool.config import TrainConfig
from pcamtool.errors import PcamError
from pcamtool.train.loop import fit

from helpers import write_kaggle


def learnable_store(root: Path, n: int = 96) -> Path:
    """A store whose label is visible in the centre: bright centre = positive."""
    ids, images, y = write_kaggle(root, n=n)
    import tifffile

    for i, img, lab in zip(ids, images, y):
        img = (img // 4 + 100).astype(np.uint8)
        if lab:
            img[32:64, 32:64] = 250
        tifffile.imwrite(root / "train" / f"{i}.tif", img, photometric="rgb")
    return pack(root / "train", progress=False).path


def tiny(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(store=str(store), out=str(out), arch="simple", model_kwargs={"width": 8}, epochs=2, batch_size=16,
                lr=3e-3, device="cpu", cache="auto", threads=1, augment=AugmentConfig())
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return learnable_store(tmp_path_factory.mktemp("train"))


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_fit_writes_run_folder_and_is_deterministic(store, tmp_path):
    a = fit(tiny(store, tmp_path / "a"), progress=False)
    b = fit(tiny(store, tmp_path / "b"), progress=False)
    for name in ("config.json", "metrics.csv", "curves.png", "best.pt", "last.pt"):
        assert (a.run_dir / name).is_file(), name
    ma, mb = read_metrics(a.run_dir), read_metrics(b.run_dir)
    assert len(ma) == 2
    for ra, rb in zip(ma, mb):
        for k in ("train_loss", "val_loss", "val_auc", "val_acc", "lr"):
            assert ra[k] == rb[k], k
    cfg = json.loads((a.run_dir / "config.json").read_text())
    assert cfg["arch"] == "simple" and cfg["resolved"]["device"] == "cpu" \
        and cfg["resolved"]["precision"] in ("fp32", "bf16")
    assert (a.run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_is_self_describing(store, tmp_path):
    res = fit(tiny(store, tmp_path / "r", epochs=1), progress=False)
    ckpt = torch.load(res.run_dir / "best.pt", weights_only=True)
    assert ckpt["model"]["name"] == "simple" and len(ckpt["mean"]) == 3
    assert ckpt["store"]["count"] == 96 and ckpt["pcamtool_version"]
    net = build_model(load_checkpoint(res.run_dir / "best.pt"))
    x = torch.randint(0, 255, (3, 96, 96, 3), dtype=torch.uint8)
    assert net(x).shape == (3,)


@pytest.mark.slow
def test_learns_the_centre(store, tmp_path):
    res = fit(tiny(store, tmp_path / "l", epochs=6, lr=3e-3), progress=False)
    assert res.best_auc > 0.9


@pytest.mark.slow
def test_resume_continues_to_the_same_result(store, tmp_path):
    full = fit(tiny(store, tmp_path / "full", epochs=3, ema=0.9), progress=False)
    # a run "killed" after epoch 2: same config, resumed to 3 (EMA weights restored too)
    part_cfg = tiny(store, tmp_path / "part", epochs=3, ema=0.9)
    script = (
        "import sys, pcamtool.train.loop as t\n"
        "from pcamtool.config import TrainConfig\n"
        "import json\n"
        "cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))\n"
        "orig = t.write_metrics\n"
        "def boom(path, rows):\n"
        "    orig(path, rows)\n"
        "    if len(rows) == 2: raise SystemExit(9)\n"
        "t.write_metrics = boom\n"
        "t.fit(cfg, progress=False)\n"
    )
    r = subprocess.run([sys.executable, "-c", script, json.dumps(part_cfg.to_dict())])
    assert r.returncode == 9
    assert len(read_metrics(tmp_path / "part")) == 2
    res = fit(part_cfg, resume=tmp_path / "part", progress=False)
    mf, mp = read_metrics(full.run_dir), read_metrics(res.run_dir)
    assert len(mp) == 3
    assert mf[-1]["val_auc"] == mp[-1]["val_auc"] and mf[-1]["train_loss"] == mp[-1]["train_loss"]


def test_resume_mismatch_and_bad_stores(store, tmp_path):
    with pytest.raises(PcamError, match="not a run folder"):
        fit(tiny(store, tmp_path / "x"), resume=tmp_path, progress=False)
    with pytest.raises(PcamError, match="not found"):
        fit(tiny(tmp_path / "missing.h5", tmp_path / "y"), progress=False)
    write_kaggle(tmp_path / "u", n=8, split="test", labels=False)
    unl = pack(tmp_path / "u" / "test", progress=False).path
    with pytest.raises(PcamError, match="no labels"):
        fit(tiny(unl, tmp_path / "z"), progress=False)


def test_config_validation():
    with pytest.raises(PcamError, match="--epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(PcamError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")


DDP = """
import sys
from pcamtool.train.loop import fit
from pcamtool.config import TrainConfig
import json
fit(TrainConfig.from_dict(json.loads(sys.argv[1])), progress=False)
"""


@pytest.mark.slow
def test_ddp_two_processes_gloo(store, tmp_path):
    cfg = tiny(store, tmp_path / "ddp", epochs=1)
    script = tmp_path / "ddp.py"
    script.write_text(DDP)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", "29517", str(script), json.dumps(cfg.to_dict())],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_metrics(tmp_path / "ddp")
    assert len(rows) == 1 and float(rows[0]["val_auc"]) >= 0
    assert (tmp_path / "ddp" / "best.pt").is_file()


def test_auto_epochs_give_small_sets_more_passes():
    from pcamtool.config import AUTO_MAX_EPOCHS, AUTO_MIN_EPOCHS, auto_epochs

    assert auto_epochs(2_499) == 40                       # the real sample's 80% split
    assert auto_epochs(176_020) == AUTO_MIN_EPOCHS         # the full Kaggle training split
    assert auto_epochs(10) == AUTO_MAX_EPOCHS
    assert [auto_epochs(n) for n in (2_000, 3_000, 5_000, 8_000)] == sorted(
        [auto_epochs(n) for n in (2_000, 3_000, 5_000, 8_000)], reverse=True)
    with pytest.raises(PcamError):
        auto_epochs(0)


def test_default_epochs_are_resolved_and_recorded(store, tmp_path, monkeypatch):
    import pcamtool.train.loop as T

    seen = []
    monkeypatch.setattr(T, "auto_epochs", lambda n: seen.append(n) or 1)
    res = fit(tiny(store, tmp_path / "auto", epochs=None), progress=False)
    assert seen and seen[0] == res_rows(res)
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["epochs"] == 1 and res.last_epoch == 1


def res_rows(res) -> int:
    return json.loads((res.run_dir / "config.json").read_text())["resolved"]["train_rows"]
