"""PCam benchmark files: pack (.h5 and .h5.gz, every chunk layout), slide groups, bad input, the official split."""
from __future__ import annotations

import gzip
import os
import random
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pcamtool.cli import cli
from pcamtool.errors import Interrupted
from pcamtool.info import store_info
from pcamtool.io.gzstream import GzipSeekable, GzipStreamError
from pcamtool.io.pack import pack_pcam
from pcamtool.io.store import open_store
from pcamtool.train.split import make_split, resolve_groups

from helpers import default_sigint
from pcam_files import PREFIX, write_split

LAYOUTS = {
    "chunk1-gzip": dict(chunks=(1, 96, 96, 3), compression="gzip"),
    "chunk32-gzip": dict(chunks=(32, 96, 96, 3), compression="gzip"),
    "h5py-auto-gzip": dict(chunks=True, compression="gzip"),   # chunks that cut through the pixels
    "contiguous": dict(chunks=None, compression=None),
}


def _exact_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = x.reshape(-1, 3).astype(np.float64) / 255.0
    return v.mean(0), v.std(0)


def _one_line_error(r) -> str:
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    return lines[0]


def _no_outputs(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if p.name.startswith(("pcam_", ".pcam_"))]
    assert left == [], left


@pytest.mark.parametrize("gz", [False, True], ids=["h5", "h5.gz"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pack_copies_pixels_bit_for_bit(tmp_path, layout, gz):
    src = write_split(tmp_path, "valid", n=150, gz=gz, seed=3, **LAYOUTS[layout])
    res = pack_pcam(tmp_path, "valid", chunk=64, progress=False)
    assert res.path == tmp_path / "pcam_valid.h5" and res.count == 150
    store = open_store(res.path, need_labels=True)
    assert np.array_equal(store.load(), src["x"])                    # bit for bit
    assert np.array_equal(store.labels, src["y"].astype(np.int8))
    assert store.ids[0] == "pcam-valid-000000" and store.ids[-1] == "pcam-valid-000149"
    assert store.attrs["format_version"] == 2 and store.mappable
    assert np.array_equal(store.groups, src["slides"])
    assert np.array_equal(store.meta.coord_y, src["coords"][:, 0])
    assert np.array_equal(store.meta.coord_x, src["coords"][:, 1])
    assert np.array_equal(store.meta.tumor_patch, src["tumor"])
    mean, std = _exact_stats(src["x"])
    assert np.allclose(store.mean, mean, atol=1e-12) and np.allclose(store.std, std, atol=1e-9)
    assert res.n_positive == int(src["y"].sum())
    assert store_info(res.path, check=True)["check"] == "passed"


def test_cli_pack_file_or_folder_force_and_info(tmp_path):
    write_split(tmp_path, "test", n=40, gz=True)
    write_split(tmp_path, "train", n=60, seed=1)
    x = tmp_path / f"{PREFIX}test_x.h5.gz"
    r = CliRunner().invoke(cli, ["-q", "pack", str(x)])
    assert r.exit_code == 0, r.output
    assert open_store(tmp_path / "pcam_test.h5").ids[0] == "pcam-test-000000"
    assert "already exists" in _one_line_error(CliRunner().invoke(cli, ["-q", "pack", str(x)]))
    r = CliRunner().invoke(cli, ["-q", "pack", str(x), "--force", "-o", str(tmp_path / "t.h5"), "--compression", "gzip"])
    assert r.exit_code == 0, r.output
    assert np.array_equal(open_store(tmp_path / "t.h5").load(), open_store(tmp_path / "pcam_test.h5").load())
    # a folder of the files: --split chooses; without it, one line saying so
    assert "--split" in _one_line_error(CliRunner().invoke(cli, ["-q", "pack", str(tmp_path)]))
    r = CliRunner().invoke(cli, ["-q", "pack", str(tmp_path), "--split", "train"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["info", str(tmp_path / "pcam_train.h5")])
    assert r.exit_code == 0 and "pcamtool-store v2" in r.output and "slides" in r.output
    assert "holds the test split" in _one_line_error(CliRunner().invoke(cli, ["-q", "pack", str(x), "--split", "valid"]))
    assert "--labels does not apply" in _one_line_error(
        CliRunner().invoke(cli, ["-q", "pack", str(x), "--labels", str(tmp_path / "l.csv")]))


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _rewrite(path: Path, name: str, data: np.ndarray, **kw) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset(name, data=data, **kw)


BAD = {
    "x without y": (lambda d: (d / f"{PREFIX}valid_y.h5").unlink(), "no labels beside it"),
    "y of another length": (lambda d: _rewrite(d / f"{PREFIX}valid_y.h5", "y", np.zeros((31, 1, 1, 1), np.uint8)),
                            "31 labels for 32 images"),
    "y not 0/1": (lambda d: _rewrite(d / f"{PREFIX}valid_y.h5", "y", np.full((32, 1, 1, 1), 7, np.uint8)),
                  "label(s) not 0 or 1"),
    "meta of another length": (lambda d: (d / f"{PREFIX}valid_meta.csv").write_text(
        "\n".join((d / f"{PREFIX}valid_meta.csv").read_text().splitlines()[:-1]) + "\n"), "31 meta rows for 32 images"),
    "meta with other columns": (lambda d: (d / f"{PREFIX}valid_meta.csv").write_text(
        (d / f"{PREFIX}valid_meta.csv").read_text().replace("wsi", "slide", 1)), "columns are"),
    "meta with a bad flag": (lambda d: (d / f"{PREFIX}valid_meta.csv").write_text(
        (d / f"{PREFIX}valid_meta.csv").read_text().replace(",True,", ",maybe,", 1).replace(",False,", ",maybe,", 1)),
        "must be True or False"),
    "x of another shape": (lambda d: _rewrite(d / f"{PREFIX}valid_x.h5", "x", np.zeros((32, 64, 64, 3), np.uint8)),
                           "x is (32, 64, 64, 3) uint8, expected (N, 96, 96, 3) uint8"),
    "x of another dtype": (lambda d: _rewrite(d / f"{PREFIX}valid_x.h5", "x", np.zeros((32, 96, 96, 3), np.float32)),
                           "float32, expected"),
    "h5 not in PCam's layout": (lambda d: _rewrite(d / f"{PREFIX}valid_x.h5", "images",
                                                   np.zeros((32, 96, 96, 3), np.uint8)), "no dataset 'x'"),
    "not HDF5 at all": (lambda d: (d / f"{PREFIX}valid_x.h5").write_bytes(b"id,label\n" * 100),
                        "not a readable HDF5 file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    write_split(tmp_path, "valid", n=32)
    spoil, message = BAD[case]
    spoil(tmp_path)
    line = _one_line_error(CliRunner().invoke(cli, ["-q", "pack", str(tmp_path), "--split", "valid"]))
    assert message in line and PREFIX in line, line   # names the file and the problem
    _no_outputs(tmp_path)


@pytest.mark.parametrize("keep,message", [(0.5, "truncated"), (0.999, "truncated")])
def test_truncated_gz_is_one_line_and_writes_nothing(tmp_path, keep, message):
    write_split(tmp_path, "valid", n=64, gz=True)
    x = tmp_path / f"{PREFIX}valid_x.h5.gz"
    _truncate(x, keep)
    line = _one_line_error(CliRunner().invoke(cli, ["-q", "pack", str(x)]))
    assert message in line and x.name in line, line
    _no_outputs(tmp_path)


def test_damaged_gz_data_found_by_the_stream_check(tmp_path):
    write_split(tmp_path, "valid", n=64, gz=True, chunks=None, compression=None)
    x = tmp_path / f"{PREFIX}valid_x.h5.gz"
    data = bytearray(x.read_bytes())
    data[len(data) // 2] ^= 0xFF   # a flipped byte in the middle of the deflate stream
    x.write_bytes(bytes(data))
    line = _one_line_error(CliRunner().invoke(cli, ["-q", "pack", str(x)]))
    assert x.name in line and ("damaged" in line or "truncated" in line), line
    _no_outputs(tmp_path)


def test_gzip_stream_random_access_matches_the_file(tmp_path):
    raw = np.random.default_rng(0).integers(0, 4, 3_000_000, dtype=np.uint8).tobytes()  # compressible
    plain = tmp_path / "a.bin"
    plain.write_bytes(raw)
    gz = tmp_path / "a.bin.gz"
    with gzip.open(gz, "wb", compresslevel=1) as f:   # two members, as `cat a.gz b.gz` makes
        f.write(raw[:1_000_000])
    with gzip.open(gz, "ab", compresslevel=1) as f:
        f.write(raw[1_000_000:])
    s = GzipSeekable(gz, window=100_000, checkpoint=250_000)
    s._size = len(raw)  # not HDF5: give the size
    rng = random.Random(1)
    for _ in range(200):
        a = rng.randrange(0, len(raw))
        k = rng.randrange(1, 70_000)
        s.seek(a)
        buf = bytearray(k)
        got = s.readinto(buf)
        assert bytes(buf[:got]) == raw[a:a + k]
    assert s.restarts > 0 and s.inflated < 200 * len(raw) / 4   # served from checkpoints, not from the start
    s.verify()
    s.close()


def test_gzip_stream_refuses_what_is_not_a_gzipped_hdf5(tmp_path):
    p = tmp_path / f"{PREFIX}valid_x.h5.gz"
    p.write_bytes(b"plain text, not gzip" * 10)
    with pytest.raises(GzipStreamError, match="not a gzip file"):
        GzipSeekable(p).size
    with gzip.open(p, "wb") as f:
        f.write(b"x" * 100_000)
    with pytest.raises(GzipStreamError, match="does not hold an HDF5 file"):
        GzipSeekable(p).size


def test_slide_groups_split_by_slide_and_groups_file_wins(tmp_path, caplog):
    write_split(tmp_path, "train", n=400, n_slides=20, seed=2)
    store = open_store(pack_pcam(tmp_path, "train", progress=False).path)
    with caplog.at_level("INFO", logger="pcamtool"):
        groups = resolve_groups(store, None)
    assert np.array_equal(groups, store.meta.slide)
    assert "splitting by slide" in caplog.text and "leak" in caplog.text
    for folds, fold in ((None, 0), (5, 0), (5, 3)):
        tr, va = make_split(store.labels, 0.2, 0, folds, fold, groups)
        assert len(tr) and len(va) and len(tr) + len(va) == len(store)
        assert not set(groups[tr]) & set(groups[va])   # no slide on both sides
    # a random split of the same store does put slides on both sides: what the groups prevent
    tr, va = make_split(store.labels, 0.2, 0)
    assert set(store.groups[tr]) & set(store.groups[va])
    csv = tmp_path / "g.csv"
    csv.write_text("id,group\n" + "".join(f"{i},{'a' if k % 2 else 'b'}\n" for k, i in enumerate(store.ids)))
    assert set(resolve_groups(store, csv)) == {"a", "b"}


def test_stores_without_meta_stay_version_1_and_have_no_groups(tmp_path):
    write_split(tmp_path, "valid", n=20, meta=False)
    store = open_store(pack_pcam(tmp_path, "valid", progress=False).path)
    assert store.attrs["format_version"] == 1 and store.groups is None and store.meta is None
    assert resolve_groups(store, None) is None


def test_future_store_version_is_refused_in_one_line(tmp_path):
    write_split(tmp_path, "valid", n=20)
    path = pack_pcam(tmp_path, "valid", progress=False).path
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = 3
    line = _one_line_error(CliRunner().invoke(cli, ["info", str(path)]))
    assert "format version 3" in line


def test_damaged_meta_group_is_refused(tmp_path):
    write_split(tmp_path, "valid", n=20)
    path = pack_pcam(tmp_path, "valid", progress=False).path
    with h5py.File(path, "a") as f:
        del f["meta/coord_x"]
        f["meta"].create_dataset("coord_x", data=np.zeros(19, np.int64))
    assert "meta/coord_x has 19 rows" in _one_line_error(CliRunner().invoke(cli, ["info", str(path)]))


def test_ctrl_c_mid_pack_leaves_nothing(tmp_path, monkeypatch):
    import pcamtool.io.pcam as pcam_mod

    default_sigint()
    monkeypatch.setattr(pcam_mod, "BLOCK_ROWS", 16)
    write_split(tmp_path, "valid", n=128, gz=True)
    seen = []

    def interrupt_once(images):
        seen.append(len(images))
        if len(seen) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return images

    with pytest.raises(Interrupted, match="nothing written"):
        pack_pcam(tmp_path, "valid", transform=interrupt_once, progress=False)
    assert 2 <= len(seen) < 8
    _no_outputs(tmp_path)


def test_stain_option_applies_to_pcam_packs(tmp_path):
    src = write_split(tmp_path, "valid", n=64, gz=True)
    store = open_store(pack_pcam(tmp_path, "valid", stain="reinhard", progress=False).path)
    assert store.stain()["method"] == "reinhard"
    assert not np.array_equal(store.load(), src["x"])
    mean, _ = _exact_stats(store.load())
    assert np.allclose(store.mean, mean, atol=1e-12)   # statistics of the pixels as stored


def test_evaluate_against_a_store_reports_balanced_accuracy(tmp_path):
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from pcamtool.evaluate import evaluate_submission

    src = write_split(tmp_path, "test", n=200, seed=4)
    store = open_store(pack_pcam(tmp_path, "test", progress=False).path)
    y = src["y"].astype(int)
    rng = np.random.default_rng(0)
    probs = np.clip(0.35 * y + rng.uniform(0, 0.65, len(y)), 0, 1)
    probs[y == 1][:5] = 0.1
    sub = tmp_path / "sub.csv"
    sub.write_text("id,label\n" + "".join(f"{i},{p:.6f}\n" for i, p in zip(store.ids[::-1], probs[::-1])))
    rep = evaluate_submission(sub, store.path)
    assert rep.n == 200
    assert rep.auc == pytest.approx(roc_auc_score(y, probs), abs=1e-6)
    assert rep.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, probs >= 0.5))
    r = CliRunner().invoke(cli, ["evaluate", str(sub), "--labels", str(store.path), "--roc", str(tmp_path / "r.png")])
    assert r.exit_code == 0, r.output
    assert "balanced" in r.output


def _learnable_split(root: Path, split: str, n: int, seed: int, **kw) -> dict:
    """A split whose label shows in the centre (bright centre = positive), so a tiny model learns it."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = (np.random.default_rng(seed + 7).integers(0, 256, (n, 96, 96, 3)) // 4 + 100).astype(np.uint8)
    x[y == 1, 32:64, 32:64] = 250
    arrays = write_split(root, split, n=n, seed=seed, x=x, **kw)
    with h5py.File(root / f"{PREFIX}{split}_y.h5", "a") as f:   # the labels the pixels show
        f["y"][...] = y.reshape(n, 1, 1, 1).astype(np.uint8)
    arrays["y"] = y
    return arrays


@pytest.mark.slow
def test_official_split_train_val_store_infer_every_row_evaluate(tmp_path):
    """pack train/valid/test; train on train validating on valid; infer the test store (no sample CSV); evaluate."""
    for split, n, seed in (("train", 128, 0), ("valid", 48, 1), ("test", 48, 2)):
        _learnable_split(tmp_path, split, n, seed)
        r = CliRunner().invoke(cli, ["-q", "pack", str(tmp_path), "--split", split])
        assert r.exit_code == 0, r.output
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["-q", "train", str(tmp_path / "pcam_train.h5"), "--val-store",
                                 str(tmp_path / "pcam_valid.h5"), "-o", str(run), "--arch", "pcamnet",
                                 "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--threads", "1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["-q", "export", str(run)])
    assert r.exit_code == 0, r.output
    model = run / "model.onnx"   # export writes it into the run folder
    sub = tmp_path / "sub.csv"
    r = CliRunner().invoke(cli, ["-q", "infer", str(tmp_path / "pcam_test.h5"), "--model", str(model),
                                 "--tta", "1", "-o", str(sub)])
    assert r.exit_code == 0, r.output
    rows = sub.read_text().splitlines()
    assert rows[0] == "id,label" and [ln.split(",")[0] for ln in rows[1:]] == [f"pcam-test-{i:06d}" for i in range(48)]
    r = CliRunner().invoke(cli, ["evaluate", str(sub), "--labels", str(tmp_path / "pcam_test.h5"), "--json",
                                 "--roc", str(tmp_path / "roc.png")])
    assert r.exit_code == 0, r.output
    import json

    report = json.loads(r.output[r.output.index("{"):])
    assert report["n"] == 48 and 0 <= report["balanced_accuracy"] <= 1 and report["auc"] > 0.5


@pytest.mark.parametrize("gz", [False, True], ids=["h5", "h5.gz"])
def test_gzip_chunks_inflated_in_parallel_match_h5py(tmp_path, gz):
    from pcamtool.io.pcam import PcamSource, find_split

    src = write_split(tmp_path, "valid", n=100, gz=gz, chunks=(8, 96, 96, 3), compression="gzip")
    with PcamSource(find_split(tmp_path, "valid"), workers=3) as fast, \
            PcamSource(find_split(tmp_path, "valid"), workers=1) as plain:
        assert fast._chunk_rows == 8 and plain._chunk_rows == 0   # the raw-chunk path is the one timed
        for rows in (16, 24):
            got = np.concatenate([b.copy() for _, b in fast.blocks(rows)])
            assert np.array_equal(got, src["x"])
        assert np.array_equal(np.concatenate([b.copy() for _, b in plain.blocks()]), src["x"])
        fast.verify()


def test_damaged_gzip_chunk_is_one_line(tmp_path):
    write_split(tmp_path, "valid", n=40, chunks=(8, 96, 96, 3), compression="gzip")
    x = tmp_path / f"{PREFIX}valid_x.h5"
    with h5py.File(x, "r") as f:
        info = f["x"].id.get_chunk_info(2)
    with open(x, "r+b") as fh:   # garble the middle of the third chunk's deflate stream
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(b"\xff" * 64)
    line = _one_line_error(CliRunner().invoke(cli, ["-q", "pack", str(x)]))
    assert x.name in line and "cannot read images" in line, line
    _no_outputs(tmp_path)


def test_train_and_cv_splits_of_a_pcam_store_keep_slides_apart(tmp_path, caplog):
    """The split training and cv make (checkpoint.split_rows) groups a PCam store by slide, no --groups needed."""
    from pcamtool.config import TrainConfig
    from pcamtool.train.checkpoint import split_rows

    write_split(tmp_path, "train", n=300, n_slides=15, seed=6)
    store = open_store(pack_pcam(tmp_path, "train", progress=False).path)
    for folds, fold in ((None, 0), (4, 1)):
        with caplog.at_level("INFO", logger="pcamtool"):
            tr, va = split_rows(TrainConfig(store=str(store.path), val_frac=0.25, folds=folds, fold=fold), store)
        assert len(va) and not set(store.groups[tr]) & set(store.groups[va])
    assert "splitting by slide" in caplog.text
