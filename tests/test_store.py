"""store: the checks of every open, ``info --check``, UTF-8 ids, a file shrinking under the map."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pcamtool import open_store, pack
from pcamtool.cli import cli
from pcamtool.errors import BadImageError, StoreError
from pcamtool.info import store_info
from pcamtool.io.sources import ImageSource

from helpers import random_patches, write_kaggle


@pytest.fixture
def store_path(tmp_path):
    write_kaggle(tmp_path, n=20)
    return pack(tmp_path / "train", chunk=8, progress=False).path


def _edit(path, fn):
    with h5py.File(path, "a") as f:
        fn(f)


def _replace(f, name, data):
    del f[name]
    f.create_dataset(name, data=data)


@pytest.mark.parametrize("edit,pattern", [
    (lambda f: f.attrs.__setitem__("stain", "{not json"), "'stain' is not a stain description"),
    (lambda f: f.attrs.__setitem__("stain", json.dumps({"method": "reinhard", "mean": [1, 2]})),
     r"not a stain description.*reinhard.*mean"),
    (lambda f: f.attrs.__setitem__("stain", json.dumps(["reinhard"])), "'stain' is not a stain description"),
    (lambda f: f.attrs.__delitem__("mean"), "attribute 'mean' is missing"),
    (lambda f: f.attrs.__setitem__("std", [0.1, np.nan, 0.2]), "attribute 'std'"),
    (lambda f: f.attrs.__setitem__("std", "wide"), "attribute 'std'"),
    (lambda f: f.attrs.__setitem__("skipped", "[unclosed"), "'skipped' is not a JSON list"),
    (lambda f: f.attrs.__setitem__("count", 19), "attribute 'count' is 19 but the labels give 20"),
    (lambda f: f.attrs.__setitem__("format_version", "one"), "store format version one"),
    (lambda f: _replace(f, "labels", np.r_[np.zeros(19, np.int8), 2]), r"1 label\(s\) not 0, 1 or -1 \(row 19"),
    (lambda f: _replace(f, "labels", np.r_[np.zeros(19), 0.5]), "labels are float64"),
    (lambda f: _replace(f, "ids", np.array([b"a"] * 2 + [b"b%02d" % i for i in range(18)])),
     r"1 id\(s\) appear more than once \(a\)"),
    (lambda f: _replace(f, "ids", np.array([b"a"] * 19)), "20 images but 19 ids"),
    (lambda f: _replace(f, "ids", np.array([b"\xff%02d" % i for i in range(20)])), "ids are not valid UTF-8"),
])
def test_open_store_refuses_malformed(store_path, edit, pattern):
    _edit(store_path, edit)
    with pytest.raises(StoreError, match=pattern):
        open_store(store_path)
    r = CliRunner().invoke(cli, ["info", str(store_path)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert [ln for ln in r.output.splitlines() if ln] == [r.output.strip()]


def test_open_store_accepts_unsorted_unique_ids_but_check_does_not(store_path):
    ids = open_store(store_path).ids
    _edit(store_path, lambda f: _replace(f, "ids", np.array(list(ids[::-1]), dtype="S40")))
    store = open_store(store_path)  # readable: rows and ids still pair up
    assert list(store.ids) == list(ids[::-1])
    with pytest.raises(StoreError, match="ids not sorted"):
        store_info(store_path, check=True)


def test_info_check_wants_the_count_attributes(store_path):
    _edit(store_path, lambda f: f.attrs.__delitem__("n_positive"))
    open_store(store_path)  # optional on open (nothing reads them)
    r = CliRunner().invoke(cli, ["info", str(store_path), "--check"])
    assert r.exit_code == 1 and "attribute(s) n_positive missing" in r.output


def test_info_check_passes_and_finds_changed_pixels(store_path):
    info = store_info(store_path, check=True)
    assert info["check"] == "passed"
    r = CliRunner().invoke(cli, ["info", str(store_path), "--check"])
    assert r.exit_code == 0 and "check        passed" in r.stdout
    store = open_store(store_path)
    # one pixel of row 5, changed in place where the map says the row lives
    where = int(store._offsets[5 // store.chunk_rows]) + (5 % store.chunk_rows) * 96 * 96 * 3
    del store
    with open(store_path, "r+b") as fh:
        fh.seek(where)
        old = fh.read(1)[0]
        fh.seek(where)
        fh.write(bytes([255 - old]))
    open_store(store_path)  # the cheap checks cannot see pixels
    r = CliRunner().invoke(cli, ["info", str(store_path), "--check"])
    assert r.exit_code == 1 and "recorded mean" in r.output and "the pixels give" in r.output


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_chunks_past_the_end_are_refused(tmp_path, compression):
    write_kaggle(tmp_path, n=30)
    path = pack(tmp_path / "train", chunk=4, compression=compression, progress=False).path
    with h5py.File(path) as f:
        ds = f["images"]
        last = max(ds.id.get_chunk_info(i).byte_offset for i in range(ds.id.get_num_chunks()))
    # HDF5 keeps its metadata before the chunks here: cutting into the last chunk leaves it openable
    os.truncate(path, last + 10)
    with pytest.raises(StoreError, match="truncated"):
        open_store(path)


def test_compressed_check_reads_block_by_block(tmp_path):
    ids, images, _ = write_kaggle(tmp_path, n=30)
    path = pack(tmp_path / "train", chunk=4, compression="lzf", progress=False).path
    store = open_store(path)
    got = [(a, block) for a, block in store.chunks(size=10)]
    assert [a for a, _ in got] == [0, 8, 16, 24]  # whole chunks: 10 rounds down to 8
    assert store._ram is None  # never decompressed whole
    assert np.array_equal(np.concatenate([b for _, b in got]), images[np.argsort(ids)])
    assert store_info(path, check=True)["check"] == "passed"


def test_store_truncated_while_mapped_fails_in_one_line(store_path):
    store = open_store(store_path)
    assert store.mappable
    before = store.gather([0, 19])
    os.truncate(store_path, os.path.getsize(store_path) // 2)  # as another process might
    with pytest.raises(StoreError, match="truncated while in use"):
        store.gather([0, 19])  # without the size check: SIGBUS, the process dies
    assert before.shape == (2, 96, 96, 3)


def test_non_ascii_ids_round_trip_and_infer_lists_the_same(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    names = ["café", "日本-01", "plain", "a,b", "q\"uote"]
    images = random_patches(len(names), seed=3)
    import tifffile

    for n, img in zip(names, images):
        tifffile.imwrite(folder / f"{n}.tif", img, photometric="rgb")
    from pcamtool.io.csvio import write_rows

    write_rows(tmp_path / "train_labels.csv", names, [1, 0, 1, 0, 1])
    res = pack(folder, progress=False)
    store = open_store(res.path)
    order = np.argsort(names)
    assert list(store.ids) == sorted(names)
    assert np.array_equal(store.gather(np.arange(len(names))), images[order])
    assert list(store.labels) == [[1, 0, 1, 0, 1][i] for i in order]
    assert ImageSource(folder).ids == list(store.ids) == ImageSource(res.path).ids
    with h5py.File(res.path) as f:
        assert f["ids"].dtype.kind == "S"  # fixed-length, as before: only the encoding is declared
        assert h5py.check_string_dtype(f["ids"].dtype).encoding == "utf-8"


def test_undecodable_file_name_fails_naming_it_or_is_skipped(tmp_path):
    ids, images, _ = write_kaggle(tmp_path, n=6, labels=False, split="test")
    folder = tmp_path / "test"
    bad = os.path.join(os.fsencode(folder), b"\xff\xfe.tif")
    with open(bad, "wb") as fh:
        fh.write((folder / f"{ids[0]}.tif").read_bytes())
    with pytest.raises(BadImageError, match=r"xff.*not valid UTF-8"):
        pack(folder, progress=False)
    assert not (tmp_path / "test.h5").exists()
    r = CliRunner().invoke(cli, ["-q", "pack", str(folder)])
    assert r.exit_code == 1 and "not valid UTF-8" in r.output and "Traceback" not in r.output
    res = pack(folder, progress=False, skip_bad=True)
    assert res.count == 6 and len(res.skipped) == 1 and "UTF-8" in res.skipped[0][1]
    assert list(open_store(res.path).ids) == sorted(ids)


def test_ascii_stores_of_earlier_versions_still_open(store_path):
    ids = open_store(store_path).ids
    _edit(store_path, lambda f: _replace(f, "ids", np.array(list(ids), dtype="S40")))  # plain ASCII, as 0.1.0 wrote
    assert list(open_store(store_path).ids) == list(ids)


def test_stores_without_patch_meta_stay_version_1_with_no_groups(store_path):
    """A tif pack writes version 1, as before (older pcamtool reads it); it knows no slides."""
    store = open_store(store_path)
    assert int(store.attrs["format_version"]) == 1 and store.meta is None and store.groups is None
    with h5py.File(store_path, "r") as f:
        assert "meta" not in f


def test_patch_meta_round_trips_and_is_checked(tmp_path):
    from pcamtool.io.store import PatchMeta, StoreWriter

    n = 6
    meta = PatchMeta(np.array(["slide_a", "slide_b", "slide_a", "sl\u00efde_c", "slide_b", "slide_a"]),
                     np.arange(n) * 96, np.arange(n)[::-1] * 96, np.array([1, 0, 0, 1, 1, 0], bool))
    path = tmp_path / "s.h5"
    images = random_patches(n)
    with StoreWriter(path, n, chunk=4) as w:
        w.write(images)
        w.finish([f"r{i}" for i in range(n)], np.array([1, 0, 0, 1, 0, 0]),
                 {"mean": np.zeros(3), "std": np.ones(3), "count": n}, meta=meta)
    store = open_store(path)
    assert int(store.attrs["format_version"]) == 2
    assert list(store.groups) == list(meta.slide)
    assert np.array_equal(store.meta.coord_y, meta.coord_y) and np.array_equal(store.meta.coord_x, meta.coord_x)
    assert np.array_equal(store.meta.tumor_patch, meta.tumor_patch)
    assert list(store.meta.take(np.array([3, 0])).slide) == ["sl\u00efde_c", "slide_a"]
    _edit(path, lambda f: (f["meta"].__delitem__("tumor_patch"),
                           f["meta"].create_dataset("tumor_patch", data=np.full(n, 3, np.int8))))
    with pytest.raises(StoreError, match="meta/tumor_patch holds values other than 0 and 1"):
        open_store(path)
    _edit(path, lambda f: f.__delitem__("meta/slide"))
    with pytest.raises(StoreError, match="incomplete meta group"):
        open_store(path)
    _edit(path, lambda f: f.attrs.__setitem__("format_version", 7))
    with pytest.raises(StoreError, match="format version 7, this pcamtool reads versions 1, 2"):
        open_store(path)
