"""Batches from a store (pcamtool.train.data): where rows are cached, the sampler's order, DDP shares, the batch ring.

Most tests use a small in-memory stand-in for a store (rows whose pixels say
their own index), so every batch can be checked against the rows it should
hold; one test runs the same loader over a real packed store.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pcamtool.train.data as data
from pcamtool.errors import PcamError
from pcamtool.train.data import CACHES, Batch, BatchLoader, RowSource, resolve_cache

CPU = torch.device("cpu")


class FakeStore:
    """The part of :class:`pcamtool.io.store.Store` the loader uses; row ``i`` is filled with ``i % 251``."""

    def __init__(self, n: int = 23, mappable: bool = True, path: str = "fake.h5") -> None:
        self.n, self.mappable, self.path = n, mappable, path
        self.labels = (np.arange(n) % 3 == 0).astype(np.int8)
        self.loaded = 0
        self.gathered: list[np.ndarray] = []

    def __len__(self) -> int:
        return self.n

    def row(self, i: int) -> np.ndarray:
        return np.full((96, 96, 3), i % 251, np.uint8)

    def gather(self, idx, out=None):
        idx = np.asarray(idx, np.int64)
        self.gathered.append(idx.copy())
        if out is None:
            out = np.empty((len(idx), 96, 96, 3), np.uint8)
        for k, i in enumerate(idx):
            out[k] = self.row(int(i))
        return out

    def load(self):
        self.loaded += 1

    def chunks(self, size):
        for s in range(0, self.n, size):
            yield s, self.gather(np.arange(s, min(self.n, s + size)))


def rows_of(b: Batch) -> list[int]:
    """The row each image of a batch came from (its constant pixel value)."""
    return [int(v) for v in b.x[:, 0, 0, 0]]


# ------------------------------------------------------------------ resolve_cache


def test_explicit_caches_are_kept_and_bad_ones_named():
    s = FakeStore()
    assert CACHES == ("auto", "gpu", "ram", "mmap")
    assert resolve_cache("ram", s, CPU) == "ram" and resolve_cache("mmap", s, CPU) == "mmap"
    with pytest.raises(PcamError, match=r"unknown cache 'disk' \(choose from auto, gpu, ram, mmap\)"):
        resolve_cache("disk", s, CPU)
    with pytest.raises(PcamError, match="--cache gpu needs a CUDA device"):
        resolve_cache("gpu", s, CPU)
    with pytest.raises(PcamError, match=r"compressed.h5: compressed store cannot be memory-mapped \(use --cache ram"):
        resolve_cache("mmap", FakeStore(mappable=False, path="compressed.h5"), CPU)
    assert resolve_cache("ram", FakeStore(mappable=False), CPU) == "ram"


def test_auto_cache_is_ram_below_half_the_free_memory_else_the_map(monkeypatch):
    size = 1000 * data.ROW_BYTES
    s = FakeStore(n=1000)
    monkeypatch.setattr(data, "available_ram", lambda: 2 * size + 2)
    assert resolve_cache("auto", s, CPU) == "ram"
    monkeypatch.setattr(data, "available_ram", lambda: 2 * size)      # exactly half: not below
    assert resolve_cache("auto", s, CPU) == "mmap"
    monkeypatch.setattr(data, "available_ram", lambda: 2 * size + 1)  # half of it rounds down to the size
    assert resolve_cache("auto", s, CPU) == "mmap"
    monkeypatch.setattr(data, "available_ram", lambda: 0)             # unknown memory
    assert resolve_cache("auto", s, CPU) == "mmap"
    # a compressed store cannot be mapped: it goes to RAM whatever the memory says
    assert resolve_cache("auto", FakeStore(n=1000, mappable=False), CPU) == "ram"


def test_auto_cache_is_the_gpu_below_half_its_free_memory(monkeypatch):
    size = 1000 * data.ROW_BYTES
    s = FakeStore(n=1000)
    cuda = torch.device("cuda", 1)
    asked = []

    def free_memory(free):
        def mem_get_info(device):
            asked.append(device)
            return free, 10 * free
        return mem_get_info

    monkeypatch.setattr(data, "available_ram", lambda: 2 * size + 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", free_memory(2 * size + 2))
    assert resolve_cache("auto", s, cuda) == "gpu"
    assert asked == [cuda]   # the free memory of the training device, not of device 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", free_memory(2 * size))   # exactly half: not below
    assert resolve_cache("auto", s, cuda) == "ram"
    monkeypatch.setattr(torch.cuda, "mem_get_info", free_memory(2 * size + 1))
    assert resolve_cache("auto", s, cuda) == "ram"
    monkeypatch.setattr(data, "available_ram", lambda: 0)
    assert resolve_cache("auto", s, cuda) == "mmap"
    # an explicit gpu cache on a CUDA device is kept without asking for memory
    asked.clear()
    assert resolve_cache("gpu", s, cuda) == "gpu" and asked == []


# ------------------------------------------------------------------ RowSource


def test_row_source_ram_loads_once_and_mmap_never():
    s = FakeStore()
    RowSource(s, "ram", CPU)
    assert s.loaded == 1
    s2 = FakeStore()
    src = RowSource(s2, "mmap", CPU)
    assert s2.loaded == 0 and src.gpu is None
    assert src.store is s2 and src.cache == "mmap" and src.device == CPU
    assert src.labels.dtype == torch.float32 and src.labels.tolist() == s2.labels.astype(float).tolist()


def test_gpu_cache_uploads_the_store_in_chunks_and_gathers_batches_from_it(monkeypatch):
    # the gpu branch runs on the CPU too (the cache tensor simply lives on the CPU)
    monkeypatch.setattr(data, "UPLOAD_ROWS", 4)
    s = FakeStore(n=10)
    src = RowSource(s, "gpu", CPU)
    assert [g.tolist() for g in s.gathered] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert s.loaded == 0
    assert src.gpu.dtype == torch.uint8 and tuple(src.gpu.shape) == (10, 96, 96, 3)
    assert src.gpu[:, 0, 0, 0].tolist() == list(range(10)) and bool((src.gpu[:, -1, -1, -1] == torch.arange(10)).all())
    s.gathered.clear()
    ld = BatchLoader(src, [9, 2, 2, 7, 0, 5, 4], 3, prefetch=0)
    assert ld._slots[0].x.numel() == 0   # no host image buffers: images never leave the cache
    got = list(ld)
    assert [b.index.tolist() for b in got] == [[9, 2, 2], [7, 0, 5], [4]]
    for b in got:
        assert rows_of(b) == list(b.index) and b.x.shape[1:] == (96, 96, 3)
        assert b.y.tolist() == [float(i % 3 == 0) for i in b.index]
    assert s.gathered == []   # batches never touch the store


# ------------------------------------------------------------------ BatchLoader order


def loader(n: int = 23, bs: int = 5, **kw) -> tuple[FakeStore, BatchLoader]:
    s = FakeStore(n)
    return s, BatchLoader(RowSource(s, "mmap", CPU), kw.pop("indices", np.arange(n)), bs, **kw)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_unshuffled_batches_are_the_indices_in_order(prefetch):
    idx = np.array([7, 3, 3, 19, 0, 22, 11, 5, 1, 2, 4, 6])
    s, ld = loader(bs=5, indices=idx, prefetch=prefetch)
    got = list(ld)
    assert [len(b.index) for b in got] == [5, 5, 2] and len(ld) == 3
    assert np.array_equal(np.concatenate([b.index for b in got]), idx)
    for b in got:
        assert rows_of(b) == list(b.index)
        assert b.y.tolist() == [float(i % 3 == 0) for i in b.index]
        assert b.x.dtype == torch.uint8 and b.x.shape[1:] == (96, 96, 3) and b.y.dtype == torch.float32
    assert ld.epoch == 1


def test_drop_last_drops_only_the_short_batch():
    _, ld = loader(n=23, bs=5, drop_last=True)
    got = list(ld)
    assert len(ld) == 4 and [len(b.index) for b in got] == [5, 5, 5, 5]
    assert np.array_equal(np.concatenate([b.index for b in got]), np.arange(20))
    _, ld = loader(n=20, bs=5)
    assert len(ld) == 4 and [len(b.index) for b in ld] == [5, 5, 5, 5]
    _, ld = loader(n=24, bs=5, drop_last=True)   # one row short of a fifth batch
    assert len(ld) == 4 and [b.index.tolist() for b in ld] == [list(range(k, k + 5)) for k in (0, 5, 10, 15)]


def test_drop_last_keeps_the_last_full_batch():
    # rows a multiple of the batch size: every batch runs (the schedule's steps, len(), count it)
    _, ld = loader(n=20, bs=5, drop_last=True)
    got = list(ld)
    assert len(ld) == 4 and len(got) == 4
    assert np.array_equal(np.concatenate([b.index for b in got]), np.arange(20))
    _, ld = loader(n=23, bs=5, drop_last=True)
    got = list(ld)
    assert len(ld) == 4 and len(got) == 4 and all(len(b.index) == 5 for b in got)


def test_shuffled_epoch_e_is_the_permutation_of_seed_plus_e():
    idx = np.arange(100, 123)
    s = FakeStore(130)
    ld = BatchLoader(RowSource(s, "mmap", CPU), idx, 4, shuffle=True, seed=11)
    for e in range(3):
        want = idx[np.random.default_rng(11 + e).permutation(len(idx))]
        assert np.array_equal(ld.epoch_indices(e), want)
        got = np.concatenate([b.index for b in ld])
        assert np.array_equal(got, want), e
    assert not np.array_equal(ld.epoch_indices(0), ld.epoch_indices(1))
    unseeded = BatchLoader(RowSource(s, "mmap", CPU), idx, 4, shuffle=True)   # the seed defaults to 0
    assert np.array_equal(unseeded.epoch_indices(0), idx[np.random.default_rng(0).permutation(len(idx))])


def test_ddp_ranks_share_a_padded_epoch_and_take_turns():
    idx = np.arange(10)
    s = FakeStore(10)
    shares = [BatchLoader(RowSource(s, "mmap", CPU), idx, 2, shuffle=True, seed=5, rank=r, world=3)
              for r in range(3)]
    perm = idx[np.random.default_rng(5).permutation(10)]
    padded = np.concatenate([perm, perm[:2]])  # 10 rows over 3 ranks: 4 each, the first two repeated
    for r, ld in enumerate(shares):
        assert np.array_equal(ld.epoch_indices(0), padded[r::3])
        assert len(ld) == 2
    assert sorted(np.concatenate([ld.epoch_indices(0) for ld in shares]).tolist()) == sorted(padded.tolist())


def test_two_ranks_split_an_unshuffled_odd_epoch_alternately():
    s = FakeStore(7)
    shares = [BatchLoader(RowSource(s, "mmap", CPU), np.arange(7), 3, rank=r, world=2) for r in range(2)]
    assert shares[0].epoch_indices(0).tolist() == [0, 2, 4, 6]
    assert shares[1].epoch_indices(0).tolist() == [1, 3, 5, 0]   # padded with the epoch's first row
    assert [[b.index.tolist() for b in ld] for ld in shares] == [[[0, 2, 4], [6]], [[1, 3, 5], [0]]]
    unranked = BatchLoader(RowSource(s, "mmap", CPU), np.arange(7), 3, world=2)   # the rank defaults to 0
    assert unranked.epoch_indices(0).tolist() == [0, 2, 4, 6]


def test_rows_of_any_integer_type_come_back_as_int64():
    s = FakeStore(10)
    ld = BatchLoader(RowSource(s, "mmap", CPU), np.array([9, 4, 1], np.int32), 2)
    assert ld.epoch_indices(0).dtype == np.int64
    assert [b.index.dtype for b in ld] == [np.int64, np.int64]


# ------------------------------------------------------------------ sampler state


def test_sampler_state_resumes_the_epoch_and_refuses_another_run():
    _, ld = loader(n=23, bs=5, shuffle=True, seed=2)
    list(ld)
    list(ld)
    state = ld.state_dict()
    assert state == {"epoch": 2, "seed": 2, "rows": 23, "world": 1}
    _, fresh = loader(n=23, bs=5, shuffle=True, seed=2)
    fresh.load_state_dict(state)
    assert fresh.epoch == 2
    assert np.array_equal(np.concatenate([b.index for b in fresh]), ld.epoch_indices(2))
    fresh.load_state_dict({"epoch": 7})   # an old checkpoint with the epoch only
    assert fresh.epoch == 7
    with pytest.raises(PcamError, match=r"the checkpoint's sampler \(seed 3\) does not match this run \(seed 2\)"):
        fresh.load_state_dict({**state, "seed": 3})
    with pytest.raises(PcamError, match=r"\(rows 24, world 2\) does not match this run \(rows 23, world 1\)"):
        fresh.load_state_dict({**state, "rows": 24, "world": 2})


# ------------------------------------------------------------------ the batch ring


def test_batches_stay_intact_while_the_producer_runs_ahead():
    """The ring has prefetch + 3 slots: a batch is not overwritten before the next one is asked for."""
    _, ld = loader(n=40, bs=3, shuffle=True, seed=1, prefetch=3)
    assert len(ld._slots) == 6
    for b in ld:
        assert rows_of(b) == list(b.index)


def test_the_producer_never_refills_a_buffer_the_consumer_may_still_hold():
    # on the CPU a batch is a view of its host buffer: any prefetch + 3 batches in a row use distinct ones
    _, ld = loader(n=60, bs=2, prefetch=2)
    ptrs = [b.x.data_ptr() for b in ld]
    assert len(ptrs) == 30
    assert all(len(set(ptrs[k:k + 5])) == 5 for k in range(26))


@pytest.mark.parametrize("prefetch, where", [(-1, "MainThread"), (0, "MainThread"), (1, "pcam-batches")])
def test_prefetch_zero_gathers_in_the_callers_thread_and_more_in_a_daemon_thread(prefetch, where):
    import threading

    s, ld = loader(n=12, bs=4, prefetch=prefetch)
    assert len(ld._slots) == max(prefetch, 0) + 3
    assert len(loader(n=12, bs=4)[1]._slots) == 2 + 3   # two batches prefetched by default
    threads = []
    gather = s.gather

    def recording(idx, out=None):
        threads.append(threading.current_thread())
        return gather(idx, out)

    s.gather = recording
    assert [b.index.tolist() for b in ld] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert {t.name for t in threads} == {where}
    # an abandoned loader must never keep the interpreter alive at exit
    assert all(t.daemon for t in threads if t.name == "pcam-batches")


def test_a_failing_gather_reaches_the_consumer():
    s, ld = loader(n=20, bs=4, prefetch=2)

    def broken(idx, out=None):
        if idx[0] >= 8:
            raise OSError("disk went away")
        return FakeStore.gather(s, idx, out)

    s.gather = broken
    got = []
    with pytest.raises(OSError, match="disk went away"):
        for b in ld:
            got.append(list(b.index))
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_stopping_early_ends_the_producer_thread():
    import threading

    _, ld = loader(n=60, bs=2, prefetch=2)
    it = iter(ld)
    next(it)
    it.close()   # the consumer walks away after one batch (a break in the epoch loop)
    assert not any(t.name == "pcam-batches" and t.is_alive() for t in threading.enumerate())


def test_stopping_early_stops_gathering_the_rest_of_the_epoch():
    s, ld = loader(n=60, bs=2, prefetch=2)
    it = iter(ld)
    next(it)
    it.close()
    # at most the queued batches and the one being made: not the 30 of the epoch
    assert len(s.gathered) <= 2 + 3


def test_closing_while_the_producer_makes_the_last_batch_does_not_deadlock():
    # the producer still has two puts to make (the last batch, then the end mark)
    # into a one-batch queue after the consumer has walked away
    import threading
    import time

    s, ld = loader(n=4, bs=2, prefetch=1)
    it = iter(ld)
    gather = s.gather

    def slow_last(idx, out=None):
        if idx[0] == 2:
            while not it.gi_running:   # until the consumer is closing the generator
                time.sleep(0.001)
            time.sleep(0.05)
        return gather(idx, out)

    s.gather = slow_last
    next(it)
    closer = threading.Thread(target=it.close, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive()


def test_loader_over_a_real_store(tmp_path: Path):
    from pcamtool import pack
    from helpers import write_kaggle

    from pcamtool.io.store import open_store

    write_kaggle(tmp_path, n=20)
    store = open_store(pack(tmp_path / "train", progress=False).path)
    for cache in ("ram", "mmap"):
        ld = BatchLoader(RowSource(store, cache, CPU), np.arange(20), 6, shuffle=True, seed=4)
        for b in ld:
            assert np.array_equal(b.x.numpy(), store.gather(b.index))
            assert b.y.numpy().tolist() == store.labels[b.index].astype(np.float32).tolist()
