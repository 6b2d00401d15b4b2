"""TensorBoard logging: the event files hold what was written (read back with TensorBoard's own reader)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")  # an optional extra

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from pcamtool.config import AugmentConfig  # noqa: E402
from pcamtool.errors import PcamError  # noqa: E402
from pcamtool.train.tblog import (INSTALL, SCALARS, NullLog, TensorBoardLog, image_grid, open_log,  # noqa: E402
                                  run_log_name)


def events(folder: Path) -> EventAccumulator:
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def rows(n: int = 3) -> list[dict]:
    return [{"epoch": e, "train_loss": 0.7 / e, "val_loss": 0.6 / e, "val_auc": 0.8 + 0.03 * e, "val_acc": 0.7 + 0.02 * e,
             "lr": 1e-3 * e, "img_per_s": 100.0 + e, "skipped_steps": e - 1, "seconds": 2.5 * e} for e in range(1, n + 1)]


def test_event_files_hold_the_scalars_config_images_and_curves(tmp_path: Path):
    log = TensorBoardLog(tmp_path / "run")
    log.config({"arch": "plain4", "lr": 0.002, "augment": {"flip": True}})
    images = np.random.default_rng(0).integers(0, 256, (40, 96, 96, 3), dtype=np.uint8)
    log.augmented_images(images, AugmentConfig())
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.4
    p = np.clip(0.3 * y + 0.7 * rng.random(200), 0, 1)
    for r in rows():
        log.epoch(r, p, y, improved=r["epoch"] != 2)
    log.close()

    ea = events(tmp_path / "run")
    for key, tag in SCALARS.items():
        got = ea.Scalars(tag)
        assert [s.step for s in got] == [1, 2, 3]
        assert [s.value for s in got] == pytest.approx([r[key] for r in rows()], rel=1e-6)
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text) == {"arch": "plain4", "lr": 0.002, "augment": {"flip": True}}
    grid = ea.Images("train/augmented")
    assert len(grid) == 1 and (grid[0].width, grid[0].height) == (8 * 98 + 2, 4 * 98 + 2)   # 32 tiles, 8 a row
    assert [t.step for t in ea.Tensors("validation/pr_curve")] == [1, 2, 3]
    assert [i.step for i in ea.Images("validation/roc_curve")] == [1, 3]        # drawn when the AUC improved


def test_augmented_grid_leaves_training_random_state_alone(tmp_path: Path):
    import torch

    torch.manual_seed(5)
    before = torch.random.get_rng_state().clone()
    log = TensorBoardLog(tmp_path / "run")
    log.augmented_images(np.zeros((4, 96, 96, 3), np.uint8) + 120, AugmentConfig())
    log.close()
    assert torch.equal(torch.random.get_rng_state(), before)


def test_image_grid_lays_out_tiles_with_gutters():
    x = np.stack([np.full((3, 4, 4), i / 10, np.float32) for i in range(10)])
    g = image_grid(x, cols=4, pad=1)
    assert g.shape == (3 * 5 + 1, 4 * 5 + 1, 3)
    assert g[1, 1, 0] == 0.0 and g[1, 6, 0] == pytest.approx(0.1) and g[6, 1, 0] == pytest.approx(0.4)
    assert g[0].min() == 1.0 and g[11:, 11:].min() == 1.0      # gutters and the empty last cells are white


def test_null_log_and_names(tmp_path: Path):
    assert isinstance(open_log(None, tmp_path / "run"), NullLog)
    assert not isinstance(open_log(None, tmp_path / "run"), TensorBoardLog)
    assert isinstance(open_log(tmp_path / "tb", tmp_path / "run", main=False), NullLog)
    log = open_log(tmp_path / "tb", tmp_path / "r1")
    assert isinstance(log, TensorBoardLog) and log.log_dir == tmp_path / "tb" / "r1"
    log.close()
    cv = tmp_path / "cv-plain4"
    (cv / "fold2").mkdir(parents=True)
    (cv / "cv_config.json").write_text("{}")
    assert run_log_name(cv / "fold2") == "cv-plain4/fold2"        # folds side by side under their cv run
    assert run_log_name(tmp_path / "fold2") == "fold2"


def test_missing_tensorboard_is_one_line_naming_the_extra(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if the package were absent
    with pytest.raises(PcamError) as exc:
        TensorBoardLog(tmp_path / "run")
    assert str(exc.value) == INSTALL and "pip install 'pcamtool[tensorboard]'" in INSTALL
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    from pcamtool import pack

    from helpers import write_kaggle

    root = tmp_path_factory.mktemp("tb")
    write_kaggle(root, n=48)
    return pack(root / "train", progress=False).path


def tiny(store: Path, **kw):
    from pcamtool.config import TrainConfig

    base = dict(store=str(store), arch="simple", model_kwargs={"width": 8}, epochs=2, batch_size=16,
                device="cpu", threads=1, augment=AugmentConfig())
    return TrainConfig(**{**base, **kw})


@pytest.mark.slow
def test_train_with_tensorboard_logs_what_metrics_csv_holds(small_store, tmp_path: Path, no_curves):
    import csv

    from pcamtool.train.loop import fit

    res = fit(tiny(small_store, out=str(tmp_path / "run"), tensorboard=str(tmp_path / "tb")), progress=False)
    with open(res.run_dir / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))
    ea = events(tmp_path / "tb" / "run")
    for key, tag in SCALARS.items():
        assert [s.value for s in ea.Scalars(tag)] == pytest.approx([float(r[key]) for r in metrics], rel=1e-5)
    assert [t.step for t in ea.Tensors("validation/pr_curve")] == [1, 2]
    assert len(ea.Images("train/augmented")) == 1
    config = json.loads(ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode())
    assert config["tensorboard"] == str(tmp_path / "tb") and config["arch"] == "simple"


@pytest.mark.slow
def test_cv_writes_one_tensorboard_run_per_fold_under_one_folder(small_store, tmp_path: Path, no_curves):
    from pcamtool.train.cv import run_cv

    run_cv(tiny(small_store, epochs=1, tensorboard=str(tmp_path / "tb")), folds=2, out=tmp_path / "cv-small",
           export=False, progress=False)
    folds = sorted(p.name for p in (tmp_path / "tb" / "cv-small").iterdir())
    assert folds == ["fold0", "fold1"]
    for k in folds:
        assert [s.step for s in events(tmp_path / "tb" / "cv-small" / k).Scalars("validation/auc")] == [1]
