"""The synthetic data generator: Kaggle layout, determinism, the PCam label rule, realism checks."""
from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile

import pcamtool.synth as synth
from pcamtool.errors import ExistsError, PcamError
from pcamtool.synth import schema as R
from pcamtool.synth.kaggle_tiff import TIFF_HEADER, TIFF_SIZE

from oracles import render_split, tumour_touches_centre

HEX40 = re.compile(r"^[0-9a-f]{40}$")


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def digest(folder: Path) -> dict[str, str]:
    """sha1 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, synth.SynthSummary]:
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, synth.generate(out, n_train=64, n_test=16, seed=0, progress=False)


@pytest.fixture(scope="module")
def train_render() -> synth.Rendered:
    """1,200 train patches with their cell lists, painted once for several tests."""
    return render_split(1200, seed=0, split="train", with_cells=True)


# ---------------------------------------------------------------- files


def test_layout_and_csvs(small):
    out, res = small
    assert sorted(p.name for p in out.iterdir()) == [
        "sample_submission.csv", "test", "test_labels.csv", "train", "train_labels.csv"]
    head, rows = read_csv(out / "train_labels.csv")
    assert head == ["id", "label"] and len(rows) == 64
    assert {r[1] for r in rows} <= {"0", "1"}
    assert sorted(r[0] + ".tif" for r in rows) == sorted(p.name for p in (out / "train").iterdir())
    head, sub = read_csv(out / "sample_submission.csv")
    assert head == ["id", "label"] and {r[1] for r in sub} == {"0"}
    head, key = read_csv(out / "test_labels.csv")
    assert head == ["id", "label"] and [r[0] for r in key] == [r[0] for r in sub]
    assert sorted(r[0] + ".tif" for r in key) == sorted(p.name for p in (out / "test").iterdir())
    assert res.n_train == 64 and res.n_test == 16 and res.train_dir == out / "train"
    assert res.test_positive_fraction == pytest.approx(np.mean([int(r[1]) for r in key]))
    assert not list(out.glob(".*"))  # no partial leftovers


def test_ids_unique_hex(small):
    out, _ = small
    ids = [r[0] for r in read_csv(out / "train_labels.csv")[1]] + [r[0] for r in read_csv(out / "test_labels.csv")[1]]
    assert len(set(ids)) == len(ids) == 80
    assert all(HEX40.match(i) for i in ids)


def test_tifs_have_kaggle_layout(small):
    out, _ = small
    for path in list((out / "train").iterdir())[:8] + list((out / "test").iterdir())[:4]:
        assert path.stat().st_size == TIFF_SIZE == 27935
        img = tifffile.imread(path)
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            assert len(tf.pages) == 1 and tf.byteorder == "<"
            assert page.dataoffsets == (287,) and page.databytecounts == (27648,)
            assert page.compression == 1 and page.photometric == 2 and page.planarconfig == 1
        assert path.read_bytes()[287:] == img.tobytes()


def test_header_matches_real_kaggle_file(real_dir):
    first = sorted((real_dir / "train").iterdir())[0].read_bytes()
    # Identical but for the 20-byte DateTime string at the very end of the header.
    assert TIFF_HEADER[:267] == first[:267]
    assert len(first) == TIFF_SIZE


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    out, _ = small
    again = synth.generate(tmp_path / "again", n_train=64, n_test=16, seed=0, progress=False, workers=1)
    assert digest(again.out) == digest(out)
    other = synth.generate(tmp_path / "other", n_train=64, n_test=16, seed=1, progress=False)
    a = tifffile.imread(sorted((out / "train").iterdir())[0])
    assert set(digest(other.out)).isdisjoint(k for k in digest(out) if k.endswith(".tif"))
    b = tifffile.imread(sorted((other.out / "train").iterdir())[0])
    assert not np.array_equal(a, b)


def test_batching_and_threads_do_not_change_pixels():
    whole = render_split(40, seed=3, split="test")
    parts = list(synth.iter_split(40, seed=3, split="test", batch=7, workers=2))
    assert np.array_equal(np.concatenate([p.images for p in parts]), whole.images)
    assert np.array_equal(np.concatenate([p.labels for p in parts]), whole.labels)


def test_negative_seed_is_fine():
    assert render_split(3, seed=-5).images.shape == (3, 96, 96, 3)


def test_refuses_nonempty_out_without_force(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    synth.generate(out, n_train=4, n_test=2, progress=False)  # empty folder: fine
    with pytest.raises(ExistsError):
        synth.generate(out, n_train=4, n_test=2, progress=False)
    (out / "notes.txt").write_text("keep me")
    res = synth.generate(out, n_train=6, n_test=3, seed=2, force=True, progress=False)
    assert len(list(res.train_dir.iterdir())) == 6 and len(list(res.test_dir.iterdir())) == 3
    assert (out / "notes.txt").read_text() == "keep me"


def test_force_never_deletes_files_synth_did_not_write(tmp_path):
    out = tmp_path / "d"
    synth.generate(out, n_train=4, n_test=2, progress=False)
    (out / "train" / "my_notes.txt").write_text("mine")
    (out / "test" / "scan.tif").write_bytes(b"a user's own tif")
    for leftover in ("my_notes.txt", "scan.tif"):
        with pytest.raises(PcamError, match=f"synth did not write \\({leftover}\\)"):
            synth.generate(out, n_train=6, n_test=3, force=True, progress=False)
        assert len(list((out / "train").glob("*.tif"))) == 4  # nothing replaced
        assert (out / "test" / "scan.tif").read_bytes() == b"a user's own tif"
        (out / ("train" if leftover.endswith(".txt") else "test") / leftover).unlink()
    res = synth.generate(out, n_train=6, n_test=3, force=True, progress=False)
    assert len(list(res.train_dir.iterdir())) == 6 and len(list(res.test_dir.iterdir())) == 3
    assert not list(out.glob(".*"))


def test_a_second_run_into_the_same_folder_is_refused(tmp_path):
    from pcamtool.io.fsutil import output_lock

    out = tmp_path / "d"
    out.mkdir()
    with output_lock(out / "train_labels.csv"):  # what a run still writing there holds
        with pytest.raises(PcamError, match="another process"):
            synth.generate(out, n_train=2, n_test=1, progress=False)
    assert not list(out.iterdir())


def test_leftovers_of_a_killed_run_are_not_data(tmp_path):
    out = tmp_path / "d"
    (out / ".train.partial").mkdir(parents=True)
    (out / ".train.partial" / "half.tif").write_bytes(b"II*\0")
    res = synth.generate(out, n_train=4, n_test=2, progress=False)
    assert res.n_train == 4 and not (out / ".train.partial").exists()


# ---------------------------------------------------------------- content


def test_positive_fraction_and_blanks(train_render):
    r = train_render
    assert 0.33 <= r.labels.mean() <= 0.47
    white = (r.images.min(-1) > 220).reshape(len(r.images), -1).mean(1)
    assert 0.002 <= (white > 0.95).mean() <= 0.03  # ~1 % blank glass
    assert r.images.std() > 40  # tissue, not a flat colour


def test_label_is_tumour_touching_the_centre(train_render):
    r = train_render
    geometric = np.array([tumour_touches_centre(c) for c in r.cells])
    assert np.array_equal(geometric, r.labels.astype(bool))
    assert np.array_equal(r.tumour_mask[:, 32:64, 32:64].any((1, 2)), r.labels.astype(bool))
    has_tumour = np.array([(c[:, R.C_KIND] == R.KIND_TUMOUR).any() for c in r.cells])
    # Negatives with tumour off the centre exist: a model must look at the centre.
    assert (has_tumour & (r.labels == 0)).sum() >= 40
    assert (r.targets[r.labels == 1] == R.T_POS).all()


def test_test_split_comes_from_another_stain_centre():
    def od_colour(images: np.ndarray) -> np.ndarray:
        od = -np.log10((images.astype(np.float64) + 1) / 256)
        return od[od.sum(-1) > 0.3].mean(0)  # tissue pixels only

    tr = od_colour(render_split(450, seed=0, split="train").images)
    te = od_colour(render_split(450, seed=0, split="test").images)
    angle = np.degrees(np.arccos(tr @ te / np.linalg.norm(tr) / np.linalg.norm(te)))
    assert angle > 3.0
    assert tr[2] / tr[0] - te[2] / te[0] > 0.1  # the test centre's hematoxylin is bluer


def hand_features(images: np.ndarray) -> np.ndarray:
    """What a model without convolutions sees: colour and darkness, centre and whole."""
    c = images[:, 32:64, 32:64].astype(np.float32) / 255
    f = images[:, ::2, ::2].astype(np.float32) / 255  # whole-patch statistics need no full resolution
    grey_c = c.mean(-1)
    return np.concatenate([
        c.mean((1, 2)), c.std((1, 2)), f.mean((1, 2)), f.std((1, 2)),
        (grey_c < 0.4).mean((1, 2))[:, None], (grey_c < 0.55).mean((1, 2))[:, None],
    ], 1)


def test_hand_features_cannot_solve_it(train_render):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = hand_features(train_render.images), train_render.labels
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    p = cross_val_predict(model, x, y, cv=3, method="predict_proba")[:, 1]
    auc = roc_auc_score(y, p)
    # Real PCam gives ~0.83 with these features; darkness alone must not give the label away.
    assert 0.6 < auc < 0.95


def test_plain_python_kernels_paint_the_same_bytes(tmp_path):
    """PCAMTOOL_NUMBA=0 (debugging) must not change a single pixel."""
    import subprocess
    import sys

    code = ("import numpy as np, sys; from pcamtool.synth import iter_split; "
            "np.save(sys.argv[1], next(iter_split(2, seed=3, split='test')).images)")
    env = {**__import__("os").environ, "PCAMTOOL_NUMBA": "0"}
    subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code, str(tmp_path / "p.npy")],
                   check=True, env=env, timeout=120)
    plain = np.load(tmp_path / "p.npy")
    assert np.array_equal(plain, render_split(2, seed=3, split="test").images)
