"""How fast ``pack`` turns a folder of tifs into a store, against its floor and baselines.

Every method reads the same page-cached files in one run:

* ``raw floor``: open + read every file's bytes (one thread, ``os.readv`` into
  a reused buffer) and nothing else: no decoding, no writing. A reader cannot
  beat it by much on one core; ``pack`` (2 threads, decoding, statistics and
  the HDF5 write) should reach half of it;
* ``raw floor 2 threads``: the same split over 2 threads, for reference;
* ``PIL loop``: ``np.asarray(Image.open(p))`` per file into a preallocated
  array, the usual Kaggle-kernel loader; ``pack`` should be 5x faster;
* ``tifffile loop``: ``tifffile.imread`` per file;
* ``pack``: :func:`pcamtool.io.pack` in-process, 2 workers, into a fresh temporary
  store (the target), and over the previous store (``force=True``) for the record;
* ``pack (lzf)``: the same into a compressed store, for the record (the
  compressor runs on the main thread; a chunk cache that holds a whole chunk
  made it ~7x faster than with h5py's default 1 MiB).

Plus the statistics kernel :func:`channel_sums` against numpy, in GB/s.

Example::

    .venv/bin/pytest benchmarks/bench_pack.py -q
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pcamtool.kernels.stats import channel_sums
from pcamtool.io.pack import pack
from pcamtool.io.store import open_store

ROUNDS = 5
SLOT = 32768  # larger than a Kaggle tif (27,935 bytes): one read per file


def read_raw(paths: list[str], buf: np.ndarray) -> int:
    """Open, read whole, close: the least any reader must do. Returns bytes read."""
    total = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            total += os.readv(fd, [buf])
        finally:
            os.close(fd)
    return total


def read_pil(paths: list[str], out: np.ndarray) -> None:
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            out[i] = np.asarray(im)


def read_tifffile(paths: list[str], out: np.ndarray) -> None:
    for i, p in enumerate(paths):
        out[i] = tifffile.imread(p)


def _run(benchmark, fn, *args) -> object:
    # One untimed warm-up round; the best of ROUNDS is the headline figure.
    return benchmark.pedantic(fn, args=args, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def test_raw_floor(benchmark, dataset, record) -> None:
    benchmark.group = f"pack-{dataset.name}"
    buf = np.empty(SLOT, np.uint8)
    total = _run(benchmark, read_raw, dataset.paths, buf)
    assert total == sum(os.path.getsize(p) for p in dataset.paths)
    record(benchmark, "pack", dataset.name, "raw floor", len(dataset.paths))


def test_raw_floor_two_threads(benchmark, dataset, record) -> None:
    benchmark.group = f"pack-{dataset.name}"
    half = len(dataset.paths) // 2
    parts = [dataset.paths[:half], dataset.paths[half:]]
    bufs = [np.empty(SLOT, np.uint8) for _ in parts]
    with ThreadPoolExecutor(2) as pool:
        def both() -> int:
            return sum(pool.map(read_raw, parts, bufs))
        total = _run(benchmark, both)
    assert total == sum(os.path.getsize(p) for p in dataset.paths)
    record(benchmark, "pack", dataset.name, "raw floor 2 threads", len(dataset.paths))


def test_pil_loop(benchmark, dataset, record) -> None:
    benchmark.group = f"pack-{dataset.name}"
    out = np.empty((len(dataset.paths), 96, 96, 3), np.uint8)
    _run(benchmark, read_pil, dataset.paths, out)
    assert np.array_equal(out[:3], np.stack([tifffile.imread(p) for p in dataset.paths[:3]]))
    record(benchmark, "pack", dataset.name, "PIL loop", len(dataset.paths))


def test_tifffile_loop(benchmark, dataset, record) -> None:
    benchmark.group = f"pack-{dataset.name}"
    out = np.empty((len(dataset.paths), 96, 96, 3), np.uint8)
    _run(benchmark, read_tifffile, dataset.paths, out)
    record(benchmark, "pack", dataset.name, "tifffile loop", len(dataset.paths))


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "overwrite"])
def test_pack(benchmark, dataset, record, warm_numba: None, tmp_path: Path, existing: bool) -> None:
    """``pack`` into a fresh path (the target), and over an existing store (for the record).

    Overwriting adds the filesystem's cost of dropping the old file's pages
    at the final rename (~60 ms for 86 MB here), which is no work of pack's.
    """
    benchmark.group = f"pack-{dataset.name}"
    out = tmp_path / "bench.h5"

    def setup() -> None:
        if not existing:
            out.unlink(missing_ok=True)

    def run():
        # labels=None picks up <folder>_labels.csv beside the folder (the real
        # sample has one, the generated set not): reading it is part of pack.
        return pack(dataset.folder, out=out, workers=2, force=True, progress=False)

    run()  # warm-up round; also leaves a store for the "overwrite" case
    res = benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)
    assert res.count == len(dataset.paths) and not res.skipped
    store = open_store(out)
    assert np.array_equal(store.gather([0]), tifffile.imread(dataset.paths[0])[None])
    record(benchmark, "pack", dataset.name, "pack" if not existing else "pack (overwriting)",
           len(dataset.paths))


def test_pack_compressed(benchmark, dataset, record, warm_numba: None, tmp_path: Path) -> None:
    benchmark.group = f"pack-{dataset.name}"
    out = tmp_path / "bench-lzf.h5"
    res = benchmark.pedantic(pack, args=(dataset.folder,), kwargs=dict(out=out, workers=2, force=True,
                             compression="lzf", progress=False), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert res.count == len(dataset.paths)
    assert np.array_equal(open_store(out).gather([0]), tifffile.imread(dataset.paths[0])[None])
    record(benchmark, "pack", dataset.name, "pack (lzf)", len(dataset.paths))


# --------------------------------------------------------------------------
# Statistics kernel

N_STATS = 2000


@pytest.fixture(scope="module")
def stats_images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (N_STATS, 96, 96, 3), dtype=np.uint8)


def numpy_sums(images: np.ndarray, step: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Exact sums the plain-numpy way, in slices so the uint64 copy stays in cache."""
    sums = np.zeros(3, np.uint64)
    sq = np.zeros(3, np.uint64)
    for a in range(0, len(images), step):
        x = images[a:a + step].reshape(-1, 3).astype(np.uint64)
        sums += x.sum(0)
        sq += (x * x).sum(0)
    return sums, sq


def test_stats_channel_sums(benchmark, stats_images: np.ndarray, record) -> None:
    benchmark.group = "stats"
    keep = np.ones(len(stats_images), np.bool_)

    def run() -> tuple[np.ndarray, np.ndarray]:
        s, q = np.zeros(3, np.uint64), np.zeros(3, np.uint64)
        channel_sums(stats_images, keep, s, q)
        return s, q

    s, q = _run(benchmark, run)
    ref_s, ref_q = numpy_sums(stats_images)
    assert np.array_equal(s, ref_s) and np.array_equal(q, ref_q)
    record(benchmark, "stats", f"{N_STATS} images", "channel_sums (numba)",
           stats_images.nbytes / 1e9, "GB/s")


def test_stats_numpy(benchmark, stats_images: np.ndarray, record) -> None:
    benchmark.group = "stats"
    _run(benchmark, numpy_sums, stats_images)
    record(benchmark, "stats", f"{N_STATS} images", "numpy uint64 sums",
           stats_images.nbytes / 1e9, "GB/s")
