"""The fast TIFF path under fuzzing: crafted headers never crash the process or read outside its buffers.

Hypothesis mutates real Kaggle tif headers and IFDs (byte order, magic,
offsets, entry counts, tags, types, counts, values, strip tables, next-IFD
pointers, truncation, stray bytes) and hands every file to a worker
*process*, so a segfault is a failed example instead of a dead test run.
The worker has numba's bounds checks compiled in (``NUMBA_BOUNDSCHECK=1``,
in a cache of its own), so a read outside a buffer raises there instead of
going unnoticed. Per file it checks:

* the in-kernel reader (``read_decode``: libc open/pread, and the
  header-guided ``preadv`` straight into the output) and the in-memory
  decoder (``decode_tiff``) give the same status and pixels;
* where the kernel and tifffile both accept the file, the pixels agree;
* ``read_patch`` returns a 96x96x3 uint8 patch or raises ``PcamError``,
  never another exception; tifffile's log lines never reach stderr.

The normal run spends ~10 s; ``PCAMTOOL_FUZZ_SECONDS=600`` runs it for ten
minutes (``make fuzz``); ``-s`` prints the cases run.
"""
from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from helpers import REAL, random_patches

FUZZ_SECONDS = float(os.environ.get("PCAMTOOL_FUZZ_SECONDS", "0"))
EXAMPLES = 250            # per hypothesis run; the normal test run does one
REPLY_TIMEOUT = 60.0      # seconds a worker may take on one file before it counts as hung
WORKER_MEMORY = 8 << 30   # address-space cap: an allocation bomb fails in the worker, not the machine


# ---------------------------------------------------------------- the worker process

def _worker() -> None:
    """Read the file named on each stdin line every way pcamtool can; one JSON verdict per line."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    import tifffile

    from pcamtool.errors import PcamError
    from pcamtool.io import tiff as T
    from pcamtool.kernels.decode import FALLBACK, NATIVE_IO, OK, decode_tiff, read_decode

    reference = sys.argv[2]  # a valid Kaggle-layout file: read first, it arms the direct preadv path
    slot = np.empty(T.SLOT_BYTES, np.uint8)
    zeros = np.zeros(3, np.uint64)

    def native(paths: list[str]) -> tuple[int, np.ndarray]:
        names = np.frombuffer(b"\0".join(map(os.fsencode, paths)) + b"\0", np.uint8)
        out = np.zeros((len(paths), 96, 96, 3), np.uint8)
        status = np.empty(len(paths), np.int8)
        read_decode(names, T._OPEN_FLAGS, slot, out, status, False, zeros, zeros.copy())
        return int(status[-1]), out[-1]

    for line in sys.stdin:
        path = line.rstrip("\n")
        v: dict = {}
        data = np.fromfile(path, np.uint8)
        mem = np.zeros((96, 96, 3), np.uint8)
        buf = np.zeros(T.SLOT_BYTES, np.uint8)
        n = min(data.size, T.SLOT_BYTES - 1)
        buf[:n] = data[:n]
        # A file that fills the slot is left to tifffile by both readers.
        v["decode"] = int(decode_tiff(buf, n, mem)) if data.size < T.SLOT_BYTES else FALLBACK
        kernel = mem if v["decode"] == OK else None
        if NATIVE_IO:
            for key, paths in (("alone", [path]), ("after_kaggle", [reference, path])):
                status, px = native(paths)
                v[key] = status
                # both readers see the same bytes: same verdict, same pixels
                v[key + "_agrees"] = status == v["decode"] and (status != OK or bool(np.array_equal(px, mem)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                img = T.read_patch(path)
                v["reader"] = "ok"
                v["reader_matches_kernel"] = kernel is None or bool(np.array_equal(img, kernel))
            except PcamError as exc:
                v["reader"] = "bad"
                v["reason"] = str(exc)
            except BaseException as exc:  # noqa: BLE001 - exactly what the test must catch
                v["reader"] = f"other {type(exc).__name__}: {exc}"
        v["warnings"] = [f"{w.category.__name__}: {w.message}" for w in caught]
        with T._TIFFFILE_LOG.capture(), np.errstate(all="ignore"):  # stderr is for read_patch's leaks only
            try:
                with tifffile.TiffFile(path) as tf:
                    s = tf.series[0]
                    ok = tuple(s.shape) == (96, 96, 3) and s.dtype == np.uint8
                    theirs = tf.asarray() if ok else None
            except Exception:  # noqa: BLE001 - tifffile rejecting the file is a verdict
                theirs = None
        v["tifffile"] = theirs is not None and theirs.shape == (96, 96, 3) and theirs.dtype == np.uint8
        if kernel is not None and v["tifffile"]:
            v["kernel_matches_tifffile"] = bool(np.array_equal(kernel, theirs))
        if v["reader"] == "ok" and v["tifffile"]:
            v["reader_matches_tifffile"] = bool(np.array_equal(img, theirs))
        print(json.dumps(v), flush=True)


class Worker:
    """A worker process fed one file at a time; restarted after a crash."""

    def __init__(self, reference: Path, cache: Path, stderr: Path) -> None:
        self.args = [sys.executable, __file__, "--worker", str(reference)]
        self.env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(cache),
                    "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
        self.stderr_path = stderr
        self.proc = None

    def start(self) -> None:
        self.stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, env=self.env, text=True, bufsize=1)

    def check(self, path: Path) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if not line:  # end of output (it died) or no answer in time (it hangs)
            how = f"died with exit code {self.proc.wait(10)}" if ready else "hung"
            self.close()
            return {"crash": f"worker {how} on {path}"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc.stdin.close()
            self.proc.stdout.close()
            self.stderr.close()
            self.proc = None


# ---------------------------------------------------------------- mutations

def _seeds() -> list[bytes]:
    """Real Kaggle files where present, else the same layout from the generator; plus other layouts."""
    import tifffile

    from pcamtool.synth.kaggle_tiff import encode_tiff

    real = sorted((REAL / "train").glob("*.tif"))[:3] if (REAL / "train").is_dir() else []
    seeds = [p.read_bytes() for p in real] or [encode_tiff(img) for img in random_patches(2, seed=5)]
    img = random_patches(1, seed=6)[0]
    with tempfile.TemporaryDirectory() as d:
        for i, kw in enumerate([dict(byteorder=">"), dict(rowsperstrip=7), dict(rowsperstrip=32, byteorder=">")]):
            p = Path(d) / f"{i}.tif"
            tifffile.imwrite(p, img, photometric="rgb", **kw)
            seeds.append(p.read_bytes())
    return seeds


SEEDS: list[bytes] = []
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 16, 95, 96, 97, 191, 192, 287, 288, 9216, 27647, 27648, 27649,
               27935, 27936, 32767, 32768, 32769, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFF0, 0xFFFFFFFF]
# The tags the fast path reads, and those it must refuse or that change how tifffile reads pixels.
TAGS = [254, 256, 257, 258, 259, 262, 266, 270, 273, 274, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325,
        330, 338, 339, 530, 32997, 32998]


def _ifd(data: bytes) -> tuple[str, int, int]:
    """Byte order ('<' or '>'), IFD offset and entry count of a seed (which is well formed)."""
    order = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack_from(order + "I", data, 4)[0]
    return order, ifd, struct.unpack_from(order + "H", data, ifd)[0]


def _apply(data: bytes, ops: list[tuple]) -> bytes:
    """The seed ``data`` with the mutations ``ops`` applied in order (each stays within the file)."""
    order, ifd, n = _ifd(data)
    b = bytearray(data)

    def put(fmt: str, pos: int, value: int) -> None:
        size = struct.calcsize(fmt)
        if 0 <= pos and pos + size <= len(b):
            struct.pack_into(order + fmt, b, pos, value & ((1 << (8 * size)) - 1))

    for op in ops:
        kind = op[0]
        if kind == "order":
            b[0:2] = op[1]
        elif kind == "magic":
            put("H", 2, op[1])
        elif kind == "ifd_offset":
            put("I", 4, op[1])
        elif kind == "entries":
            put("H", ifd, op[1])
        elif kind == "next_ifd":
            put("I", ifd + 2 + 12 * n, op[1])
        elif kind == "entry":
            _, i, field, value = op
            pos = ifd + 2 + 12 * (i % n)
            fmt, off = {"tag": ("H", 0), "type": ("H", 2), "count": ("I", 4), "value": ("I", 8),
                         "short": ("H", 8)}[field]
            put(fmt, pos + off, value)
        elif kind == "strips":
            # A strip table of `rows` rows per strip appended to the file, its entries perturbed.
            _, rows, skew = op
            k = -(-96 // rows)
            start = len(b)
            offsets = [start + 8 * k + j * rows * 288 for j in range(k)]
            counts = [min(rows, 96 - j * rows) * 288 for j in range(k)]
            for j, (which, delta) in enumerate(skew):
                (offsets if which else counts)[j % k] += delta
            b += struct.pack(f"{order}{k}I", *[v & 0xFFFFFFFF for v in offsets])
            b += struct.pack(f"{order}{k}I", *[v & 0xFFFFFFFF for v in counts])
            b += data[-96 * 96 * 3:]
            for e in range(n):
                pos = ifd + 2 + 12 * e
                tag = struct.unpack_from(order + "H", b, pos)[0]
                table = {273: start, 279: start + 4 * k}.get(tag)
                if table is not None:
                    struct.pack_into(order + "HII", b, pos + 2, 4, k, table if k > 1 else
                                     (offsets[0] if tag == 273 else counts[0]) & 0xFFFFFFFF)
                elif tag == 278:
                    struct.pack_into(order + "HI", b, pos + 2, 4, 1)
                    put("I", pos + 8, rows)
        elif kind == "poke":
            _, pos, value = op
            if pos < len(b):
                b[pos] = value
        elif kind == "truncate":
            del b[op[1] % (len(b) + 1):]
        elif kind == "append":
            b += bytes(op[1])
    return bytes(b)


def _ops():
    from hypothesis import strategies as st

    u32 = st.one_of(st.sampled_from(INTERESTING), st.integers(0, 0xFFFFFFFF))
    field = st.sampled_from(["tag", "type", "count", "value", "short"])
    entry = st.tuples(st.just("entry"), st.integers(0, 63), field, u32).map(
        lambda t: t if t[2] != "tag" else (t[0], t[1], t[2], TAGS[t[3] % len(TAGS)] if t[3] % 3 else t[3]))
    entry_type = st.tuples(st.just("entry"), st.integers(0, 63), st.just("type"), st.integers(0, 19))
    return st.lists(st.one_of(
        entry, entry, entry_type,
        st.tuples(st.just("order"), st.sampled_from([b"II", b"MM", b"IM", b"\0\0"])),
        st.tuples(st.just("magic"), st.sampled_from([42, 43, 0, 0x2A00, 0xFFFF])),
        st.tuples(st.just("ifd_offset"), u32),
        st.tuples(st.just("entries"), st.one_of(st.sampled_from([0, 1, 14, 16, 0xFFFF]), st.integers(0, 0xFFFF))),
        st.tuples(st.just("next_ifd"), u32),
        st.tuples(st.just("strips"), st.integers(1, 96),
                  st.lists(st.tuples(st.booleans(), st.sampled_from([-1, 1, -288, 288, 1 << 31, -(1 << 20)])),
                           max_size=3)),
        st.tuples(st.just("poke"), st.integers(0, 400), st.integers(0, 255)),
        st.tuples(st.just("truncate"), st.one_of(st.integers(0, 400), st.integers(0, 40000))),
        st.tuples(st.just("append"), st.sampled_from([1, 16, 4096, 8192])),
    ), min_size=1, max_size=4)


def _problems(v: dict) -> list[str]:
    """What a worker's verdict on one file says is wrong (empty: all held)."""
    if "crash" in v:
        return [v["crash"]]
    checks = ("alone_agrees", "after_kaggle_agrees", "reader_matches_kernel", "kernel_matches_tifffile",
              "reader_matches_tifffile")
    bad = [k for k in checks if v.get(k) is False]
    if v["reader"] not in ("ok", "bad"):
        bad.append(f"read_patch raised {v['reader']}")
    if v["warnings"]:
        bad.append(f"read_patch let warnings out: {v['warnings']}")
    return bad


# ---------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    from pcamtool.synth.kaggle_tiff import encode_tiff

    folder = tmp_path_factory.mktemp("fuzz")
    reference = folder / "reference.tif"
    reference.write_bytes(encode_tiff(random_patches(1, seed=7)[0]))
    # Bounds-checked kernels are compiled into a cache of their own, kept across runs.
    cache = Path(tempfile.gettempdir()) / f"pcamtool-fuzz-numba-{os.getuid()}"
    w = Worker(reference, cache, folder / "worker.stderr")
    yield w, folder
    w.close()
    leaked = (folder / "worker.stderr").read_text(errors="replace")
    assert "tifffile" not in leaked, f"tifffile log lines reached stderr:\n{leaked[:2000]}"


@pytest.mark.slow
def test_fuzzed_headers_never_crash_and_agree_with_tifffile(worker):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    w, folder = worker
    SEEDS[:] = SEEDS or _seeds()
    path = folder / "case.tif"
    counts = {"cases": 0, "kernel_ok": 0, "tifffile_ok": 0, "both_ok": 0, "reader_bad": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not FUZZ_SECONDS,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(seed=st.integers(0, len(SEEDS) - 1), ops=_ops())
    def check(seed: int, ops: list[tuple]) -> None:
        path.write_bytes(_apply(SEEDS[seed], ops))
        v = w.check(path)
        counts["cases"] += 1
        if "crash" not in v:
            counts["kernel_ok"] += v["decode"] == 0
            counts["tifffile_ok"] += v["tifffile"]
            counts["both_ok"] += v["decode"] == 0 and v["tifffile"]
            counts["reader_bad"] += v["reader"] == "bad"
        assert not _problems(v), f"{_problems(v)} for seed {seed} with {ops}"

    end = time.monotonic() + FUZZ_SECONDS
    check()
    while time.monotonic() < end:
        check()
    print(f"\nfuzzed TIFF headers: {json.dumps(counts)}")
    # The mutations must reach both sides of every check, or the test proves little.
    assert counts["both_ok"] > 0 and counts["reader_bad"] > 0 and counts["kernel_ok"] < counts["cases"]


def test_a_crashing_worker_is_a_reported_case(tmp_path):
    """The harness itself: a worker that segfaults (or hangs) yields a failed verdict naming the file."""
    w = Worker(tmp_path / "unused.tif", tmp_path, tmp_path / "stderr")
    w.args = [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"]  # reads address 0: SIGSEGV
    try:
        v = w.check(tmp_path / "case.tif")
    finally:
        w.close()
    assert _problems(v) == [f"worker died with exit code -11 on {tmp_path / 'case.tif'}"]


def test_mutation_helpers_leave_seeds_intact():
    """The harness itself: no mutation means the seed's bytes; the strip table rewrites stay decodable."""
    SEEDS[:] = SEEDS or _seeds()
    from pcamtool.io.tiff import read_patch

    for data in SEEDS:
        assert _apply(data, [("append", 0)]) == data
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "s.tif"
            p.write_bytes(_apply(data, [("strips", 5, [])]))
            img = read_patch(p)
            p.write_bytes(data)
            assert np.array_equal(img, read_patch(p))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker()
