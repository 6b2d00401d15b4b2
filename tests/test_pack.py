"""pack: pixel-exact stores, exact statistics, every bad input, atomic writes, kill and rerun."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from pcamtool import open_store, pack
from pcamtool.cli import cli
from pcamtool.errors import BadImageError, ExistsError, LabelsError, PcamError
from pcamtool.kernels import plain
from pcamtool.kernels.stats import channel_sums

from helpers import random_patches, write_kaggle


def test_pack_round_trip(kaggle):
    root, ids, images, y = kaggle
    res = pack(root / "train", progress=False, chunk=16)
    assert res.path == root / "train.h5"
    store = open_store(res.path)
    order = np.argsort(ids)
    assert list(store.ids) == sorted(ids)
    assert np.array_equal(store.gather(np.arange(len(ids))), images[order])
    assert np.array_equal(store.labels, y[order])
    assert store.mappable
    x = images.astype(np.float64) / 255
    assert np.allclose(store.mean, x.reshape(-1, 3).mean(0), rtol=0, atol=1e-12)
    assert np.allclose(store.std, x.reshape(-1, 3).std(0), rtol=0, atol=1e-12)
    with h5py.File(res.path) as f:
        assert f["images"].chunks == (16, 96, 96, 3)
        assert f["images"].compression is None
        assert f["labels"].dtype == np.int8
        assert f["ids"].dtype.kind == "S"
        assert f.attrs["format"] == "pcamtool-store" and f.attrs["format_version"] == 1
        assert f.attrs["n_positive"] == int(y.sum())


@pytest.mark.parametrize("compression", ["lzf", "gzip"])
def test_compressed_store_reads_the_same(kaggle, compression):
    root, ids, images, _ = kaggle
    res = pack(root / "train", out=root / f"{compression}.h5", compression=compression, progress=False)
    store = open_store(res.path)
    assert not store.mappable
    idx = np.array([5, 0, 3, 3])
    assert np.array_equal(store.gather(idx), images[np.argsort(ids)][idx])


def test_gather_random_batches_match_h5py(kaggle):
    root, *_ = kaggle
    res = pack(root / "train", chunk=7, progress=False)
    store = open_store(res.path)
    rng = np.random.default_rng(0)
    with h5py.File(res.path) as f:
        full = f["images"][...]
    for _ in range(5):
        idx = rng.integers(0, len(store), 13)
        assert np.array_equal(store.gather(idx), full[idx])


def test_unlabelled_test_folder(tmp_path):
    write_kaggle(tmp_path, n=10, split="test", labels=False)
    res = pack(tmp_path / "test", progress=False)
    store = open_store(res.path)
    assert (store.labels == -1).all() and not store.has_labels
    with pytest.raises(PcamError, match="no labels"):
        open_store(res.path, need_labels=True)


def test_stats_kernel_jitted_equals_plain_and_numpy():
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (9, 96, 96, 3), dtype=np.uint8)
    imgs[0] = 255  # the overflow corner: all-white patches
    keep = np.ones(9, np.bool_)
    keep[4] = False
    results = []
    for fn in (channel_sums, plain(channel_sums)):
        s, q = np.zeros(3, np.uint64), np.zeros(3, np.uint64)
        fn(imgs, keep, s, q)
        results.append((s, q))
    ref = imgs[keep].reshape(-1, 3).astype(np.uint64)
    for s, q in results:
        assert np.array_equal(s, ref.sum(0))
        assert np.array_equal(q, (ref * ref).sum(0))


@pytest.mark.parametrize("shape", [(4, 5, 7, 3), (2, 96, 95, 3), (3, 1, 16, 3)])
def test_stats_kernel_any_patch_size(shape):
    """Byte counts that are not a multiple of the kernel's 48 lanes take its tail loop."""
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, shape, dtype=np.uint8)
    keep = np.ones(len(imgs), np.bool_)
    ref = imgs.reshape(-1, 3).astype(np.uint64)
    for fn in (channel_sums, plain(channel_sums)):
        s, q = np.zeros(3, np.uint64), np.zeros(3, np.uint64)
        fn(imgs, keep, s, q)
        assert np.array_equal(s, ref.sum(0))
        assert np.array_equal(q, (ref * ref).sum(0))


def test_existing_store_needs_force(kaggle):
    root, *_ = kaggle
    pack(root / "train", progress=False)
    before = (root / "train.h5").stat().st_mtime_ns
    with pytest.raises(ExistsError, match="--force"):
        pack(root / "train", progress=False)
    assert (root / "train.h5").stat().st_mtime_ns == before
    pack(root / "train", progress=False, force=True)


def _corrupt(root: Path, ids: list[str]) -> Path:
    bad = root / "train" / f"{ids[3]}.tif"
    bad.write_bytes(bad.read_bytes()[:3000])  # truncated
    return bad


def test_bad_tif_fails_with_its_name_and_no_store(kaggle):
    root, ids, *_ = kaggle
    bad = _corrupt(root, ids)
    with pytest.raises(BadImageError, match=bad.name):
        pack(root / "train", progress=False)
    assert not (root / "train.h5").exists()
    assert not list(root.glob(".*partial")) and not list(root.glob(".*lock"))


def test_skip_bad_lists_skipped(kaggle):
    root, ids, images, y = kaggle
    bad = _corrupt(root, ids)
    res = pack(root / "train", progress=False, skip_bad=True, chunk=8)
    assert res.count == len(ids) - 1 and len(res.skipped) == 1 and bad.name in res.skipped[0][0]
    store = open_store(res.path)
    keep = [i for i in np.argsort(ids) if ids[i] != ids[3]]
    assert np.array_equal(store.gather(np.arange(len(store))), images[keep])
    assert np.array_equal(store.labels, y[keep])
    assert bad.name in json.loads(store.attrs["skipped"])[0][0]



@pytest.mark.parametrize("chunk,batch", [(5, 3), (3, 5), (4, 4)])
def test_decode_batches_across_chunks(kaggle, monkeypatch, chunk, batch):
    """Decoding batches need not line up with the chunks, with a file skipped or not."""
    root, ids, images, y = kaggle
    # the module pcamtool.io.pack (the package exports its pack function)
    monkeypatch.setattr(sys.modules["pcamtool.io.pack"], "DECODE_BATCH", batch)
    order = np.argsort(ids)
    res = pack(root / "train", progress=False, chunk=chunk)
    store = open_store(res.path)
    assert np.array_equal(store.gather(np.arange(len(store))), images[order])
    x = images.astype(np.float64) / 255
    assert np.allclose(store.mean, x.reshape(-1, 3).mean(0), rtol=0, atol=1e-12)
    _corrupt(root, ids)
    res = pack(root / "train", progress=False, chunk=chunk, skip_bad=True, force=True)
    store = open_store(res.path)
    keep = [i for i in order if ids[i] != ids[3]]
    assert np.array_equal(store.gather(np.arange(len(store))), images[keep])
    assert np.array_equal(store.labels, y[keep])


@pytest.mark.parametrize("case,error,pattern", [
    ("empty_dir", PcamError, "no .tif files"),
    ("missing_dir", PcamError, "folder not found"),
    ("orphan_label", LabelsError, "have no image"),
    ("unlabelled_image", LabelsError, "no label row"),
    ("duplicate_id", PcamError, "duplicate id"),  # two files a.tif, a.tiff: an error of the folder
    ("bad_header", LabelsError, "expected 'id,label'"),
    ("bad_label", LabelsError, "line 3: label '2' is not 0 or 1"),
    ("short_row", LabelsError, "line 2: expected 2 fields"),
    ("duplicate_row", LabelsError, "duplicate id"),
])
def test_bad_inputs(tmp_path, case, error, pattern):
    ids, *_ = write_kaggle(tmp_path, n=6)
    csv = tmp_path / "train_labels.csv"
    lines = csv.read_text().splitlines()
    src = tmp_path / "train"
    if case == "empty_dir":
        src = tmp_path / "empty"
        src.mkdir()
    elif case == "missing_dir":
        src = tmp_path / "nope"
    elif case == "orphan_label":
        csv.write_text("\n".join(lines + ["f" * 40 + ",1"]) + "\n")
    elif case == "unlabelled_image":
        csv.write_text("\n".join(lines[:-1]) + "\n")
    elif case == "duplicate_id":
        (src / f"{ids[0]}.tif").rename(src / f"{ids[0]}.tiff")
        tifffile.imwrite(src / f"{ids[0]}.tif", np.zeros((96, 96, 3), np.uint8), photometric="rgb")
    elif case == "bad_header":
        csv.write_text("name,class\n" + "\n".join(lines[1:]) + "\n")
    elif case == "bad_label":
        lines[2] = lines[2][:-1] + "2"
        csv.write_text("\n".join(lines) + "\n")
    elif case == "short_row":
        lines[1] = lines[1].split(",")[0]
        csv.write_text("\n".join(lines) + "\n")
    elif case == "duplicate_row":
        csv.write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(error, match=pattern):
        pack(src, progress=False)
    assert not (tmp_path / "train.h5").exists()


def test_cli_bad_input_is_one_line_no_traceback(kaggle):
    root, ids, *_ = kaggle
    _corrupt(root, ids)
    r = CliRunner().invoke(cli, ["-q", "pack", str(root / "train")])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and ids[3] in lines[0]
    assert "Traceback" not in r.output


def test_cli_pack_and_info_json(kaggle):
    root, ids, *_ = kaggle
    (root / "train" / "notes.txt").write_text("not an image")
    r = CliRunner().invoke(cli, ["pack", str(root / "train"), "--chunk", "8"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["info", str(root / "train.h5"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["count"] == len(ids) and info["chunks"] == [8, 96, 96, 3]
    assert info["compression"] == "none" and info["format_version"] == 1
    assert info["positive"] + info["negative"] == len(ids)
    r = CliRunner().invoke(cli, ["info", str(root / "train.h5")])
    assert "memory-mappable" in r.stdout and f"{len(ids)}" in r.stdout


def test_store_errors(tmp_path, kaggle):
    root, *_ = kaggle
    with pytest.raises(PcamError, match="not found"):
        open_store(tmp_path / "nope.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk" * 100)
    with pytest.raises(PcamError, match="not a readable HDF5"):
        open_store(tmp_path / "junk.h5")
    res = pack(root / "train", progress=False)
    data = res.path.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(PcamError):
        open_store(tmp_path / "cut.h5")
    with h5py.File(res.path, "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(PcamError, match="version 99"):
        open_store(res.path)


KILLABLE = """
import sys, time
from pcamtool import pack
def slow(images):
    time.sleep(0.05)
    return images
pack(sys.argv[1], chunk=8, transform=slow, progress=False, workers=1)
"""


def test_killed_pack_leaves_no_store_and_rerun_finishes(tmp_path):
    ids, images, y = write_kaggle(tmp_path, n=400)
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(tmp_path / "train")])
    deadline = time.time() + 60
    while not list(tmp_path.glob(".train.h5.*.partial")) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [partial] = tmp_path.glob(".train.h5.*.partial")  # named by the dead run's pid
    assert f".{proc.pid}." in partial.name and not (tmp_path / "train.h5").exists()
    res = pack(tmp_path / "train", progress=False)  # no --force needed: nothing was finished
    assert not partial.exists()  # a dead run's temporary is cleaned up by the next
    assert not list(tmp_path.glob(".train.h5*"))
    store = open_store(res.path)
    assert np.array_equal(store.gather(np.arange(400)), images[np.argsort(ids)])


def test_real_sample_packs_pixel_exact(real_dir, tmp_path):
    res = pack(real_dir / "train", out=tmp_path / "real.h5", progress=False)
    store = open_store(res.path)
    assert len(store) == 3124 and store.has_labels
    labels = dict(line.split(",") for line in (real_dir / "train_labels.csv").read_text().split()[1:])
    assert all(int(labels[i]) == v for i, v in zip(store.ids, store.labels))
    rng = np.random.default_rng(0)
    for i in rng.integers(0, len(store), 200):
        assert np.array_equal(store.gather([i])[0], tifffile.imread(real_dir / "train" / f"{store.ids[i]}.tif"))


def test_labels_fast_path_agrees_with_strict_reader(tmp_path, monkeypatch):
    """Plain Kaggle CSVs take the fast parser; anything unusual goes to the strict one."""
    import pcamtool.io.csvio as C

    text = "id,label\n" + "".join(f"{i:040x},{i % 2}\n" for i in range(50))
    path = tmp_path / "labels.csv"
    path.write_text(text)
    fast = C._plain_labels(text, "label")
    assert fast is not None and len(fast) == 50
    for odd in (text.replace("\n", "\r\n"), text + "a,1,2\n", text + "b, 1\n", text + '"c",1\n',
                text + "d,1.0\n", text + f"{0:040x},1\n", "name,label\n" + text.split("\n", 1)[1],
                text + ",1\n"):
        assert C._plain_labels(odd, "label") is None, odd[-12:]
    monkeypatch.setattr(C, "_plain_labels", lambda *a: None)
    assert C.read_labels(path) == fast


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_writer_keep_rows_closes_gaps(tmp_path, chunk):
    """Rows written in place from several threads, then the skipped ones closed up."""
    from concurrent.futures import ThreadPoolExecutor

    from pcamtool.io.store import StoreWriter

    n = 23
    images = random_patches(n, seed=8)
    keep = np.ones(n, bool)
    keep[[0, 5, 6, 7, 13, 22]] = False  # the first, a run across a chunk edge, the last
    path = tmp_path / "s.h5"
    with StoreWriter(path, n, chunk) as w:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda a: w.write_at(a, images[a:a + 5]), range(0, n, 5)))
        w.keep_rows(keep)
        w.images.resize(int(keep.sum()), axis=0)
        w.n = int(keep.sum())
        w.finish([f"{i:02d}" for i in np.flatnonzero(keep)], np.zeros(w.n, np.int8), {})
    with h5py.File(path) as f:
        assert np.array_equal(f["images"][:], images[keep])
