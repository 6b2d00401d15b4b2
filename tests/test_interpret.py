"""interpret: the galleries pick the right rows from a run, a cv folder or a submission, and keep what exists."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pcamtool import pack
from pcamtool.cli import cli
from pcamtool.errors import ExistsError, PcamError
from pcamtool.interpret import KINDS, OUTPUTS, interpret, select_rows

from helpers import write_kaggle


def read_gallery(out: Path) -> dict[str, list[dict]]:
    with open(out / "gallery.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [r for r in rows if r["kind"] == k] for k in KINDS}


def assert_pngs(out: Path) -> None:
    for name in OUTPUTS:
        if name.endswith(".png"):
            with Image.open(out / name) as im:
                assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_select_rows_picks_the_most_confident_of_each_kind():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1])
    probs = np.array([0.9, 0.6, 0.1, 0.95, 0.2, 0.45, 0.99, 0.7, 0.3, 0.05])
    got = {k: v.tolist() for k, v in select_rows(probs, labels, 2).items()}
    assert got == {"false_positives": [3, 0], "false_negatives": [9, 4],
                   "true_positives": [6, 7], "true_negatives": [2, 8]}
    every = select_rows(probs, labels, 10)
    assert sorted(np.concatenate(list(every.values())).tolist()) == list(range(10))   # each row once
    # at the threshold itself a row counts as predicted positive; a higher threshold moves rows
    assert select_rows(np.array([0.5, 0.5]), np.array([0, 1]), 5)["false_positives"].tolist() == [0]
    assert select_rows(probs, labels, 5, threshold=0.8)["false_negatives"].tolist() == [9, 4, 5, 7]


@pytest.fixture
def submission(tmp_path: Path):
    """40 labelled tifs and a submission with known confident mistakes."""
    ids, images, y = write_kaggle(tmp_path, n=40)
    p = np.where(y == 1, 0.8, 0.2) + np.linspace(-0.1, 0.1, 40)
    neg, pos = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    p[neg[[3, 7, 11]]] = [0.97, 0.93, 0.6]     # false positives, surest first
    p[pos[[2, 5]]] = [0.02, 0.3]               # false negatives, surest first
    sub = tmp_path / "sub.csv"
    sub.write_text("id,label\n" + "".join(f"{i},{v}\n" for i, v in zip(ids, p)))
    expect = {"false_positives": [ids[i] for i in neg[[3, 7, 11]]],
              "false_negatives": [ids[i] for i in pos[[2, 5]]]}
    return tmp_path, sub, ids, p, y, expect


def test_submission_galleries_pick_the_planted_mistakes(submission):
    root, sub, ids, p, y, expect = submission
    out = root / "look"
    r = CliRunner().invoke(cli, ["interpret", str(sub), "--images", str(root / "train"), "-n", "3",
                                 "--saliency", "none", "-o", str(out)])
    assert r.exit_code == 0, r.output
    g = read_gallery(out)
    assert [row["id"] for row in g["false_positives"]] == expect["false_positives"]
    assert [row["id"] for row in g["false_negatives"]] == expect["false_negatives"]
    tp = [i for i in np.argsort(-p) if y[i] == 1 and p[i] >= 0.5][:3]
    tn = [i for i in np.argsort(p) if y[i] == 0 and p[i] < 0.5][:3]
    assert [row["id"] for row in g["true_positives"]] == [ids[i] for i in tp]
    assert [row["id"] for row in g["true_negatives"]] == [ids[i] for i in tn]
    assert all(float(row["prob"]) == pytest.approx(p[ids.index(row["id"])], abs=1e-6) for k in KINDS for row in g[k])
    assert all(int(row["label"]) == y[ids.index(row["id"])] for k in KINDS for row in g[k])
    assert_pngs(out)


def test_existing_outputs_are_kept_unless_forced(submission):
    root, sub, *_ = submission
    out = root / "look"
    args = ["interpret", str(sub), "--images", str(root / "train"), "--saliency", "none", "-o", str(out), "-n", "2"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    before = (out / "overview.png").read_bytes()
    r = CliRunner().invoke(cli, args + ["-n", "4"])
    assert r.exit_code == 1 and "already holds" in r.output and "--force" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert (out / "overview.png").read_bytes() == before
    r = CliRunner().invoke(cli, args + ["-n", "4", "--force"])
    assert r.exit_code == 0 and len(read_gallery(out)["true_positives"]) == 4


def test_bad_requests_are_one_line(submission, tmp_path: Path):
    root, sub, ids, *_ = submission
    with pytest.raises(PcamError, match="--images"):
        interpret(sub, root / "o1")
    with pytest.raises(PcamError, match="give the model"):
        interpret(sub, root / "o2", images=root / "train", saliency="gradcam")
    extra = root / "extra.csv"
    extra.write_text(sub.read_text() + "f" * 40 + ",0.5\n")
    labels = root / "labels.csv"
    labels.write_text((root / "train_labels.csv").read_text() + "f" * 40 + ",1\n")
    with pytest.raises(PcamError, match="1 id\\(s\\) have no image there: f{40}"):
        interpret(extra, root / "o3", images=root / "train", labels=labels, saliency="none")
    with pytest.raises(PcamError, match="neither a run folder"):
        interpret(tmp_path, root / "o4")
    (root / "o5").mkdir()
    (root / "o5" / "gallery.csv").write_text("mine")
    with pytest.raises(ExistsError):
        interpret(sub, root / "o5", images=root / "train", saliency="none")
    assert (root / "o5" / "gallery.csv").read_text() == "mine"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run on a learnable store (bright centre = tumour), exported."""
    import tifffile

    from pcamtool.config import AugmentConfig, TrainConfig
    from pcamtool.export import export_onnx
    from pcamtool.train.loop import fit

    root = tmp_path_factory.mktemp("interpret")
    ids, images, y = write_kaggle(root, n=60)
    for i, img, lab in zip(ids, images, y):
        img = (img // 4 + 100).astype(np.uint8)
        if lab:
            img[40:56, 40:56] = 250
        tifffile.imwrite(root / "train" / f"{i}.tif", img, photometric="rgb")
    store = pack(root / "train", progress=False).path
    cfg = TrainConfig(store=str(store), out=str(root / "run"), arch="simple", model_kwargs={"width": 8}, epochs=1,
                      batch_size=16, device="cpu", threads=1, augment=AugmentConfig.off())
    res = fit(cfg, progress=False)
    export_onnx(res.run_dir / "best.pt", res.run_dir / "model.onnx", store_path=store, force=True)
    return res.run_dir, store, cfg


@pytest.mark.slow
def test_run_galleries_are_its_validation_rows_with_grad_cam_or_occlusion(trained_run, tmp_path: Path):
    from pcamtool.io.store import open_store
    from pcamtool.train.cv import fold_rows, predict_rows

    import torch

    run_dir, store_path, cfg = trained_run
    store = open_store(store_path)
    rows = np.sort(fold_rows(cfg, store, None, 0))
    want = dict(zip([store.ids[r] for r in rows], predict_rows(run_dir / "best.pt", store, rows, torch.device("cpu"))))
    res = interpret(run_dir, tmp_path / "cam", n=3)
    assert res.saliency == "gradcam" and sum(res.counts.values()) == len(rows)
    g = read_gallery(tmp_path / "cam")
    shown = [r for k in KINDS for r in g[k]]
    assert shown and all(r["id"] in want and float(r["prob"]) == pytest.approx(want[r["id"]], abs=1e-6) for r in shown)
    expect = select_rows(np.array(list(want.values())), np.asarray(store.labels)[rows], 3)
    assert {k: [r["id"] for r in g[k]] for k in KINDS} == {k: [list(want)[i] for i in v] for k, v in expect.items()}
    assert_pngs(tmp_path / "cam")
    res = interpret(run_dir, tmp_path / "occ", n=2, saliency="occlusion", provider="cpu")
    assert res.saliency == "occlusion"
    assert_pngs(tmp_path / "occ")


@pytest.mark.slow
def test_cv_galleries_read_oof_and_explain_each_row_with_its_fold(trained_run, tmp_path: Path):
    from pcamtool.io.store import open_store

    run_dir, store_path, cfg = trained_run
    store = open_store(store_path)
    cv_dir = tmp_path / "cv"
    for k in range(2):   # both folds stand in with the same exported model
        (cv_dir / f"fold{k}").mkdir(parents=True)
        shutil.copy(run_dir / "model.onnx", cv_dir / f"fold{k}" / "model.onnx")
    (cv_dir / "cv_config.json").write_text(json.dumps({"format": "pcamtool-cv", "folds": 2, "config": cfg.to_dict()}))
    rng = np.random.default_rng(0)
    probs = np.clip(np.asarray(store.labels) * 0.6 + rng.random(len(store)) * 0.4, 0, 1)
    folds = np.arange(len(store)) % 2
    with open(cv_dir / "oof.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "fold", "prob"])
        w.writerows([store.ids[i], int(store.labels[i]), int(folds[i]), f"{probs[i]:.6f}"] for i in range(len(store)))
    res = CliRunner().invoke(cli, ["interpret", str(cv_dir), "-n", "2", "--provider", "cpu"])
    assert res.exit_code == 0, res.output
    g = read_gallery(cv_dir / "interpret")
    expect = select_rows(probs, store.labels, 2)
    for k in KINDS:
        assert [r["id"] for r in g[k]] == [store.ids[i] for i in expect[k]]
        assert [int(r["fold"]) for r in g[k]] == [int(folds[i]) for i in expect[k]]
    assert_pngs(cv_dir / "interpret")


@pytest.mark.slow
def test_submission_with_an_onnx_model_gets_occlusion(trained_run, tmp_path: Path):
    from pcamtool.infer import write_submission

    run_dir, store_path, _ = trained_run
    sub = write_submission(store_path, [run_dir / "model.onnx"], tmp_path / "sub.csv", tta=1, provider="cpu",
                           progress=False)
    res = interpret(sub.path, None, images=store_path, model=[run_dir / "model.onnx"], n=2, provider="cpu")
    assert res.saliency == "occlusion" and res.out_dir == tmp_path / "sub-interpret"
    assert sum(res.counts.values()) == len(sub.ids)
    assert_pngs(res.out_dir)
