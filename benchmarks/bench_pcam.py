"""How fast ``pack`` turns one PCam benchmark split into a store, against reading it with h5py.

A split of ``PCAMTOOL_BENCH_PCAM_N`` (default 20,480) generated patches is
written in the published layout (``x`` (N, 96, 96, 3), ``y`` (N, 1, 1, 1),
the meta CSV), in two inner layouts, each as ``.h5`` and as ``.h5.gz``
(gzip -6 of the whole file, as distributed):

* ``contiguous``: uncompressed pixels in one block (what a ``.gz`` of 6.1 GB
  for 7.2 GB of pixels suggests the originals hold);
* ``chunk1-gzip``: one HDF5 chunk per patch, gzip-compressed inside.

Per case, timed in turns in one run (best of ROUNDS; median kept):

* ``h5py x[...]``: a plain h5py read of the whole x dataset in one call,
  into memory; for a ``.gz`` through :class:`~pcamtool.io.gzstream.GzipSeekable`
  (``gzip.GzipFile`` restarts from the start of the file on every backward
  seek HDF5 makes: the number it would make is recorded instead of a time);
* ``gunzip floor`` (``.gz`` only): ``zlib`` inflating the file, nothing else;
* ``pack``: :func:`pcamtool.io.pack.pack_pcam` into a fresh uncompressed
  store (reads, exact statistics, the write, the meta CSV, the checks),
  inflating with ``zlib_ng`` when installed (``pcamtool[fastgz]``);
* ``pack (zlib)`` (``.gz`` only): the same with the standard library's
  ``zlib``, as the h5py read uses (``PCAMTOOL_GZIP=zlib``);
* ``torchvision-style loop`` (``.h5`` only; torchvision gunzips first):
  open both files and read one sample and its label per call, as
  ``torchvision.datasets.PCAM.__getitem__`` does, on the first
  ``LOOP_SAMPLE`` rows (a rate, scaled from the subset).

Example::

    .venv/bin/pytest benchmarks/bench_pcam.py -q
"""
from __future__ import annotations

import gzip
import io
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from pcamtool.io.gzstream import GzipSeekable
from pcamtool.io.pack import pack_pcam

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pcam_files import PREFIX, pcam_patches  # noqa: E402

N = int(os.environ.get("PCAMTOOL_BENCH_PCAM_N", 20480))
ROUNDS = 3
LOOP_SAMPLE = 2000
LAYOUTS = {"contiguous": {}, "chunk1-gzip": {"chunks": (1, 96, 96, 3), "compression": "gzip"}}


def _write(folder: Path, layout: str, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    x_path = folder / f"{PREFIX}valid_x.h5"
    rng = np.random.default_rng(0)
    with h5py.File(x_path, "w") as f:
        ds = f.create_dataset("x", shape=(N, 96, 96, 3), dtype=np.uint8, **LAYOUTS[layout])
        for a in range(0, N, 2048):
            ds[a:a + 2048] = pcam_patches(min(2048, N - a), seed=a)
    y = rng.integers(0, 2, N).astype(np.uint8)
    with h5py.File(folder / f"{PREFIX}valid_y.h5", "w") as f:
        f.create_dataset("y", data=y.reshape(N, 1, 1, 1))
    with open(folder / f"{PREFIX}valid_meta.csv", "w") as f:
        f.write(",coord_y,coord_x,tumor_patch,center_tumor_patch,wsi\n")
        f.writelines(f"{i},{i * 7},{i * 3},{bool(y[i])},{bool(y[i])},camelyon16_train_normal_{i // 500:03d}\n"
                     for i in range(N))
    if gz:
        for p in (x_path, folder / f"{PREFIX}valid_y.h5"):
            with open(p, "rb") as src, gzip.open(f"{p}.gz", "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst, 2**22)
            p.unlink()
        x_path = Path(f"{x_path}.gz")
    with open(x_path, "rb") as fh:  # page-cached: what is timed is reading, not the disk
        while fh.read(2**24):
            pass
    return x_path


@pytest.fixture(scope="module", params=[(lay, gz) for lay in LAYOUTS for gz in (False, True)],
                ids=lambda p: f"{p[0]}-{'h5.gz' if p[1] else 'h5'}")
def split(request, tmp_path_factory) -> Path:
    layout, gz = request.param
    return _write(tmp_path_factory.mktemp(f"pcam-{layout}-{gz}"), layout, gz)


def _h5py_read(x: Path) -> np.ndarray:
    if x.name.endswith(".gz"):
        os.environ["PCAMTOOL_GZIP"] = "zlib"   # the standard library's inflate, as any h5py user has
        try:
            raw = GzipSeekable(x)
        finally:
            del os.environ["PCAMTOOL_GZIP"]
        with raw, h5py.File(raw, "r") as f:
            return f["x"][...]
    with h5py.File(x, "r") as f:
        return f["x"][...]


def _gunzip_floor(x: Path) -> int:
    d, total = zlib.decompressobj(31), 0
    with open(x, "rb") as fh:
        while chunk := fh.read(2**20):
            total += len(d.decompress(chunk))
    return total


def _pack_with_zlib(x: Path, out: Path) -> None:
    os.environ["PCAMTOOL_GZIP"] = "zlib"
    try:
        pack_pcam(x, out=out, force=True, progress=False)
    finally:
        del os.environ["PCAMTOOL_GZIP"]


def _torchvision_loop(x: Path, rows: int) -> int:
    y = x.with_name(x.name.replace("_x.h5", "_y.h5"))
    total = 0
    for i in range(rows):
        with h5py.File(x, "r") as f:
            image = f["x"][i]
        with h5py.File(y, "r") as f:
            total += int(f["y"][i, 0, 0, 0])
        total += int(image[0, 0, 0])
    return total


def _backward_seeks(x: Path) -> int:
    """Reads below the furthest byte read so far while h5py reads x whole.

    Each one is a restart from byte 0 for ``gzip.GzipFile``.
    """
    plain = x.with_name(x.name.removesuffix(".gz"))
    with gzip.open(x, "rb") as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst, 2**22)

    class Counting(io.FileIO):
        high, back = 0, 0

        def readinto(self, b):  # type: ignore[override]
            pos = self.tell()
            if pos < Counting.high:
                Counting.back += 1
            n = super().readinto(b)
            Counting.high = max(Counting.high, pos + (n or 0))
            return n

    with Counting(plain, "r") as raw, h5py.File(raw, "r") as f:
        f["x"][...]
    plain.unlink()
    return Counting.back


def _best(fn, rounds: int = ROUNDS) -> tuple[float, float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def test_pack_against_h5py_read(split: Path, record_rate, benchmark) -> None:
    case = f"{split.parent.name.split('-')[1]}-{'h5.gz' if split.name.endswith('.gz') else 'h5'}"
    out = split.parent / "store.h5"
    pack_pcam(split, out=out, force=True, progress=False)   # warm-up: numba's cache, h5py, the files
    ref = _h5py_read(split)
    got = h5py.File(out, "r")["images"][...]
    assert np.array_equal(got, ref)                        # the pack is a bit-for-bit copy
    del got, ref
    rates = {}
    timed = {"h5py x[...]": lambda: _h5py_read(split),
             "pack": lambda: pack_pcam(split, out=out, force=True, progress=False)}
    if split.name.endswith(".gz"):
        timed["gunzip floor"] = lambda: _gunzip_floor(split)
        timed["pack (zlib)"] = lambda: _pack_with_zlib(split, out)
    results = {name: [] for name in timed}
    for _ in range(ROUNDS):  # in turns, so that a noisy neighbour hits every method alike
        for name, fn in timed.items():
            results[name].append(_best(fn, 1)[0])
    for name, ts in results.items():
        rates[name] = record_rate("pcam", case, name, N / min(ts), N / float(np.median(ts)))
    if not split.name.endswith(".gz"):
        best, median = _best(lambda: _torchvision_loop(split, LOOP_SAMPLE), 1)
        rates["torchvision-style loop"] = record_rate("pcam", case, "torchvision-style loop",
                                                      LOOP_SAMPLE / best, LOOP_SAMPLE / median)
        benchmark.extra_info["pack / torchvision loop"] = round(rates["pack"] / rates["torchvision-style loop"], 1)
    else:
        benchmark.extra_info["gzip.GzipFile restarts from byte 0"] = _backward_seeks(split)
    ratio = [N / min(results["pack"]) / (N / min(results["h5py x[...]"])),
             float(np.median(results["h5py x[...]"]) / np.median(results["pack"]))]
    record_rate("pcam", case, "ratio pack / h5py x[...]", ratio[0], ratio[1], unit="x")
    if "pack (zlib)" in results:
        record_rate("pcam", case, "ratio pack (zlib) / h5py x[...]",
                    min(results["h5py x[...]"]) / min(results["pack (zlib)"]),
                    float(np.median(results["h5py x[...]"]) / np.median(results["pack (zlib)"])), unit="x")
    if "torchvision-style loop" in rates:
        record_rate("pcam", case, "ratio pack / torchvision loop", rates["pack"] / rates["torchvision-style loop"],
                    rates["pack"] / rates["torchvision-style loop"], unit="x")
    benchmark.extra_info["pack / h5py read"] = round(ratio[0], 2)
    benchmark.extra_info["MB/s pack (pixels)"] = round(rates["pack"] * 96 * 96 * 3 / 1e6)
    benchmark.pedantic(lambda: None, rounds=1)  # the figures above are the result; this keeps the plugin's table
