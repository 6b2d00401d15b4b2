"""How fast training batches come out of a packed store.

Random batches of 256 rows (no repeats within a batch, like a shuffled
epoch) from an uncompressed store of ``N_STORE`` rows, three ways, on the
same indices in one run:

* ``Store.gather``: rows copied out of a memory map of the file (the way
  training reads); target: at least half the speed of
* ``numpy arr[idx]``: the same rows out of the whole set held in RAM, the
  fastest a gather can be;
* ``h5py ds[sorted idx]``: h5py fancy indexing (indices must be increasing),
  the slow baseline, timed on a few batches only.

And what checking a store costs: ``open_store`` (its checks of every open
included) and ``info --check`` (every pixel read and summed), against a
plain sequential ``Store.gather`` of every row, which ``--check`` should
stay within a small factor of.

Example::

    .venv/bin/pytest benchmarks/bench_store.py -q
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from pcamtool.info import store_info
from pcamtool.io.store import Store, open_store

BATCH = 256
N_BATCHES = 40       # per timed round for the fast methods
N_SLOW = 3           # per timed round for h5py
ROUNDS = 5


@pytest.fixture(scope="module")
def store(packed_store: Path) -> Store:
    s = open_store(packed_store)
    assert s.mappable, "the benchmark store must be uncompressed (memory-mapped)"
    s.gather(np.arange(len(s)))  # touch every page of the map once: no first-fault costs timed
    return s


@pytest.fixture(scope="module")
def batches(store: Store) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.choice(len(store), BATCH, replace=False) for _ in range(N_BATCHES)]


@pytest.fixture(scope="module")
def in_ram(store: Store) -> np.ndarray:
    with h5py.File(store.path, "r") as f:
        return f["images"][...]


def test_store_gather(benchmark, store: Store, batches: list[np.ndarray], in_ram: np.ndarray,
                      record) -> None:
    benchmark.group = "store"
    assert np.array_equal(store.gather(batches[0]), in_ram[batches[0]])

    def run() -> None:
        for idx in batches:
            store.gather(idx)

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, "store", f"{len(store)} rows, batch {BATCH}", "Store.gather",
           BATCH * len(batches))


def test_numpy_in_ram(benchmark, batches: list[np.ndarray], in_ram: np.ndarray, record) -> None:
    benchmark.group = "store"

    def run() -> None:
        for idx in batches:
            in_ram[idx]

    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, "store", f"{len(in_ram)} rows, batch {BATCH}", "numpy arr[idx]",
           BATCH * len(batches))


def test_h5py_fancy(benchmark, store: Store, batches: list[np.ndarray], in_ram: np.ndarray,
                    record) -> None:
    benchmark.group = "store"
    few = [np.sort(idx) for idx in batches[:N_SLOW]]
    with h5py.File(store.path, "r") as f:
        ds = f["images"]
        assert np.array_equal(ds[few[0]], in_ram[few[0]])

        def run() -> None:
            for idx in few:
                ds[idx]

        benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, "store", f"{len(store)} rows, batch {BATCH}", "h5py ds[sorted idx]",
           BATCH * len(few))


def test_open_store(benchmark, store: Store, record) -> None:
    benchmark.group = "store-check"
    benchmark.pedantic(open_store, args=(store.path,), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, "store-check", f"{len(store)} rows", "open_store", 1, "opens/s")


def test_sequential_gather(benchmark, store: Store, record) -> None:
    benchmark.group = "store-check"
    benchmark.pedantic(lambda: list(store.chunks()), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    record(benchmark, "store-check", f"{len(store)} rows", "Store.chunks (every row)", len(store))


def test_info_check(benchmark, store: Store, record) -> None:
    benchmark.group = "store-check"
    res = benchmark.pedantic(store_info, args=(store.path,), kwargs={"outliers": False, "check": True},
                             rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert res["check"] == "passed"
    record(benchmark, "store-check", f"{len(store)} rows", "info --check", len(store))
