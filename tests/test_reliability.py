"""Hostile conditions for the I/O layer: Ctrl-C, kills, two runs at once, full disks, odd names and paths."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pcamtool import open_store, pack
from pcamtool.cli import cli
from pcamtool.errors import BusyError, ExistsError, Interrupted, PcamError
from pcamtool.io.csvio import read_id_table, write_rows
from pcamtool.io.fsutil import atomic_path, lock_name, remove_dead_temps

from helpers import default_sigint, write_kaggle


def _leftovers(folder: Path) -> list[str]:
    """Hidden files pcamtool may leave: temporaries and lock files."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and
                  (p.name.endswith(".partial") or p.name.endswith(".lock")))


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


# ---------------------------------------------------------------- atomic_path


def test_atomic_path_temporaries_are_unique_and_a_second_writer_is_refused(tmp_path):
    out = tmp_path / "sub" / "x.csv"
    with atomic_path(out) as first:
        assert first.parent == out.parent and first.name.startswith(".x.csv.") and first.name.endswith(".partial")
        assert str(os.getpid()) in first.name
        first.write_text("one")
        assert lock_name(out).exists()
        # flock locks belong to open files: a second writer in this very process is refused too
        with pytest.raises(BusyError, match=rf"x.csv: being written by another process \(pid {os.getpid()}\)"):
            with atomic_path(out, force=True):
                pass
        assert first.read_text() == "one"  # the refused writer touched nothing
    assert out.read_text() == "one" and _leftovers(out.parent) == []
    with atomic_path(out, force=True) as second:
        assert second.name != first.name
        second.write_text("two")
    assert out.read_text() == "two"


def test_atomic_path_refuses_existing_folder_and_keeps_output_on_error(tmp_path):
    out = tmp_path / "x.csv"
    out.write_text("mine")
    with pytest.raises(ExistsError, match="already exists"):
        with atomic_path(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_path(out, force=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert out.read_text() == "mine" and _leftovers(tmp_path) == []
    with pytest.raises(PcamError, match="is a folder"):
        with atomic_path(tmp_path, force=True):
            pass
    with pytest.raises(PcamError, match=r"x.csv is not a folder"):
        with atomic_path(out / "y.csv"):
            pass


def test_write_problem_tells_output_failures_from_others():
    from pcamtool.io.fsutil import write_problem

    tmp = Path("/out/.s.h5.1.abcdef12.partial")
    h5 = "Unable to synchronously create file (unable to open file: name = '/out/.s.h5.1.abcdef12.partial'"
    assert write_problem(OSError(f"{h5}, errno = 13, error message = 'Permission denied')"), tmp) == \
        "Permission denied"
    assert write_problem(OSError(f"{h5}, flags = 13)"), tmp) == "Unable to synchronously create file"
    assert write_problem(_h5py_enospc(tmp.name), tmp) == "No space left on device"
    assert write_problem(OSError(errno.ENOSPC, "No space left on device"), tmp) == "No space left on device"
    assert write_problem(OSError(errno.ENOENT, "No such file", "/in/a.tif"), tmp) is None  # an input's
    assert write_problem(RuntimeError("boom"), tmp) is None
    assert write_problem(KeyboardInterrupt(), tmp) is None


def test_temporaries_of_dead_processes_are_removed(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    out = tmp_path / "s.h5"
    stale = tmp_path / f".s.h5.{dead}.0123abcd.partial"
    live = tmp_path / f".s.h5.{os.getpid()}.0123abcd.partial"
    other = tmp_path / f".s.h5.5.{dead}.0123abcd.partial"  # the temporary of "s.h5.5", not of "s.h5"
    fixed = tmp_path / ".s.h5.partial"
    for p in (stale, live, other, fixed):
        p.write_text("x")
    assert remove_dead_temps(out) == [stale]
    assert not stale.exists() and live.exists() and other.exists() and fixed.exists()


# ---------------------------------------------------------------- Ctrl-C, kills, two runs


# `pcamtool -q pack ...` with every decoded batch held back 50 ms: a compressed
# pack of these few files is otherwise done within a blink of a quiet machine,
# before the test's signal lands (the test raced, and lost on an idle CI run).
_SLOW_PACK_CLI = """
import sys, time
import pcamtool.io.pack as P
real = P.iter_batches
def slow(*a, **k):
    for b in real(*a, **k):
        time.sleep(0.05)
        yield b
P.iter_batches = slow
from pcamtool.cli import main
sys.argv = ["pcamtool", "-q", "pack", *sys.argv[1:]]
main()
"""


def _spawn_pack(src: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SLOW_PACK_CLI, str(src), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)


def _wait_for_temp(proc: subprocess.Popen, folder: Path, name: str, min_bytes: int) -> Path:
    """The running pack's temporary, once it holds ``min_bytes`` (the pack is well under way)."""
    deadline = time.time() + 90
    while time.time() < deadline:
        for p in folder.glob(f".{name}.*.partial"):
            try:
                if p.stat().st_size >= min_bytes:
                    return p
            except FileNotFoundError:
                pass
        if proc.poll() is not None:
            pytest.fail(f"pack ended before it could be interrupted: {proc.returncode} {proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("pack never started writing")


# Enough patches that a compressed pack is still well under way after its
# first two chunks, however fast the machine (~3,000 patches/s at best).
N_KILL = 1500


@pytest.fixture(scope="module")
def many_tifs(tmp_path_factory):
    """One folder of N_KILL patches for the kill tests (each packs it into its own tmp_path)."""
    root = tmp_path_factory.mktemp("many")
    ids, images, _ = write_kaggle(root, n=N_KILL)
    return root / "train", ids, images


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_ctrl_c_stops_a_compressed_pack_promptly(tmp_path, many_tifs, compression):
    """Ctrl-C used to be lost in h5py's weakref callbacks: the pack finished and exited 0."""
    src, *_ = many_tifs
    out = tmp_path / "train.h5"
    proc = _spawn_pack(src, "-o", str(out), "--compression", compression, "--chunk", "32")
    _wait_for_temp(proc, tmp_path, "train.h5", 2**20)  # two chunks of 32 written, ~1,400 patches to go
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("pack went on after Ctrl-C")
    assert proc.returncode == 130, err
    line = _one_error_line(err)
    assert line == f"Interrupted: {out}: pack interrupted, nothing written (the same command starts it again)"
    assert os.listdir(tmp_path) == []


def test_killed_compressed_pack_leaves_nothing_final_and_the_same_command_finishes(tmp_path, many_tifs):
    src, ids, images = many_tifs
    args = ["-o", str(tmp_path / "train.h5"), "--compression", "lzf", "--chunk", "32"]
    proc = _spawn_pack(src, *args)
    temp = _wait_for_temp(proc, tmp_path, "train.h5", 2**20)
    proc.kill()
    proc.wait()
    assert temp.exists() and not (tmp_path / "train.h5").exists()
    r = CliRunner().invoke(cli, ["-q", "pack", str(src), *args])
    assert r.exit_code == 0, r.output  # no --force: nothing was finished
    assert os.listdir(tmp_path) == ["train.h5"]  # the dead run's temporary is gone too
    store = open_store(tmp_path / "train.h5")
    assert np.array_equal(store.load(), images[np.argsort(ids)])


SLOW_PACK = """
import sys, time
from pcamtool import pack
def slow(images):
    time.sleep(0.05)
    return images
pack(sys.argv[1], chunk=8, transform=slow, progress=False, workers=1)
print("done")
"""


def test_second_pack_to_the_same_store_is_refused_while_the_first_runs(tmp_path):
    ids, images, _ = write_kaggle(tmp_path, n=160)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PACK, str(tmp_path / "train")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_temp(proc, tmp_path, "train.h5", 1)
    with pytest.raises(BusyError, match=rf"train.h5: being written by another process \(pid {proc.pid}\)"):
        pack(tmp_path / "train", progress=False, force=True)
    r = CliRunner().invoke(cli, ["-q", "pack", str(tmp_path / "train"), "--force"])
    assert r.exit_code == 1 and "being written by another process" in _one_error_line(r.output)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0 and "done" in out, err  # the first run was not disturbed
    store = open_store(tmp_path / "train.h5")
    assert np.array_equal(store.gather(np.arange(len(ids))), images[np.argsort(ids)])
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- full disks, odd places


def _h5py_enospc(tmp_name: str) -> OSError:
    """What h5py raises when the disk fills during a compressed write (text from a real one)."""
    return OSError(f"Can't write data (file write failed: time = Wed Dec  2 01:00:00 2026\n, filename = "
                   f"'{tmp_name}', file descriptor = 5, errno = 28, error message = 'No space left on device', "
                   f"buf = 0x55, total write size = 27648, bytes this sub-write = 27648, bytes actually "
                   f"written = 18446744073709551615, offset = 0)")


@pytest.mark.parametrize("where", ["pwrite", "fallocate", "h5py"])
def test_disk_full_names_the_store_not_the_temporary(kaggle, monkeypatch, where):
    root, *_ = kaggle
    from pcamtool.io import store as store_mod

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    compression = "none"
    if where == "pwrite":
        monkeypatch.setattr(store_mod.StoreWriter, "_rows_io", full)
    elif where == "fallocate":
        monkeypatch.setattr(store_mod.os, "posix_fallocate", full)
    else:
        compression = "gzip"

        def h5py_full(self, images):
            raise _h5py_enospc(self.path.name)

        monkeypatch.setattr(store_mod.StoreWriter, "write", h5py_full)
    out = root / "out.h5"
    with pytest.raises(PcamError) as info:
        pack(root / "train", out=out, compression=compression, progress=False)
    msg = str(info.value)
    assert msg == f"{out}: cannot write (No space left on device); nothing was written"
    assert not out.exists() and _leftovers(root) == []
    r = CliRunner().invoke(cli, ["-q", "pack", str(root / "train"), "-o", str(out), "--compression", compression])
    assert _one_error_line(r.output) == f"Error: {msg}" and r.exit_code == 1


DISK_FILLS = """
import sys
import numpy as np
from pcamtool.io import store
from pcamtool.io.fsutil import QuietFailingFile

class Disk:  # a file on a disk that fills up after 300 kB
    def __init__(self, f):
        self.f = f
    def write(self, data):
        if self.f.tell() + len(data) > 300_000:
            raise OSError(28, "No space left on device")
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)

class Filling(QuietFailingFile):
    def __init__(self, path):
        super().__init__(path)
        self._f = Disk(self._f)

store.QuietFailingFile = Filling
images = np.random.default_rng(0).integers(0, 256, (64, 96, 96, 3), dtype=np.uint8)
try:
    with store.StoreWriter(sys.argv[1], 64, chunk=8, compression="gzip") as w:
        for a in range(0, 64, 8):
            w.write(images[a:a + 8])
except OSError as exc:
    print("raised", exc.errno, exc.filename)
"""


def test_a_disk_filling_under_hdf5_is_an_error_not_a_crash(tmp_path):
    """HDF5 2.0 segfaults when a write fails as it closes a file: it must never see one fail."""
    path = tmp_path / "s.h5"
    r = subprocess.run([sys.executable, "-c", DISK_FILLS, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]  # -11 (SIGSEGV) without QuietFailingFile
    assert r.stdout.split() == ["raised", "28", str(path)]


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_pack_onto_a_really_full_disk(kaggle, small_disk, compression):
    root, *_ = kaggle  # 40 patches, 1.1 MB: more than the disk holds
    out = small_disk / "train.h5"
    with pytest.raises(PcamError, match=rf"^{out}: cannot write \(No space left on device\); nothing was written$"):
        pack(root / "train", out=out, compression=compression, progress=False)
    assert os.listdir(small_disk) == []


def test_csv_onto_a_full_or_read_only_disk(small_disk):
    (small_disk / "filler").write_bytes(b"\0" * (2**20 - 4096))
    out = small_disk / "submission.csv"
    with pytest.raises(PcamError, match=rf"^{out}: cannot write \(No space left on device\)"):
        write_rows(out, [f"{i:040x}" for i in range(2000)], np.linspace(0, 1, 2000))
    assert sorted(os.listdir(small_disk)) == ["filler"]
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(PcamError, match=rf"^{out}: cannot write there \(Read-only file system\)"):
        write_rows(out, ["a"], [0.5])


def test_pack_dot_inside_the_folder_uses_its_real_name(kaggle, monkeypatch):
    root, ids, images, y = kaggle
    monkeypatch.chdir(root / "train")
    res = pack(Path("."), progress=False)
    assert res.path.resolve() == (root / "train.h5").resolve() and not (root / "train" / ".h5").exists()
    store = open_store(root / "train.h5")
    assert store.has_labels and np.array_equal(store.labels, y[np.argsort(ids)])  # ../train_labels.csv found


def test_pack_output_onto_a_folder_or_under_a_file(kaggle):
    root, *_ = kaggle
    (root / "dir.h5").mkdir()
    r = CliRunner().invoke(cli, ["-q", "pack", str(root / "train"), "-o", str(root / "dir.h5")])
    assert _one_error_line(r.output) == f"Error: {root / 'dir.h5'}: is a folder; give the name of a file to write"
    r = CliRunner().invoke(cli, ["-q", "pack", str(root / "train"), "-o", str(root / "train_labels.csv" / "x.h5")])
    assert "train_labels.csv is not a folder" in _one_error_line(r.output)
    assert ".partial" not in r.output


# ---------------------------------------------------------------- CSV ids


ODD_IDS = ["plain", "with,comma", 'with"quote', "with\nnewline", "with\r\rcarriage", "café-日本"]


def test_any_id_round_trips_through_a_csv(tmp_path):
    probs = np.linspace(0.05, 0.95, len(ODD_IDS))
    path = write_rows(tmp_path / "sub.csv", ODD_IDS, probs, value="label")
    table = read_id_table(path, as_float=True)
    assert list(table) == ODD_IDS and np.allclose(list(table.values()), probs)
    assert path.read_text(encoding="utf-8").startswith("id,label\nplain,")  # plain ids stay unquoted


def test_an_id_that_cannot_be_utf8_is_named_not_a_traceback(tmp_path):
    undecodable = os.fsdecode(b"\xffid")  # what a tif named b"\xffid.tif" lists as
    with pytest.raises(PcamError, match=r"'\\udcffid' is not valid UTF-8 text"):
        write_rows(tmp_path / "sub.csv", ["ok", undecodable], [0.1, 0.2])
    assert os.listdir(tmp_path) == []


def test_evaluate_reads_pcamtools_own_submission_with_odd_ids(tmp_path):
    from pcamtool.evaluate import evaluate_submission

    labels = [0, 1, 0, 1, 1, 0]
    write_rows(tmp_path / "truth.csv", ODD_IDS, labels)
    write_rows(tmp_path / "sub.csv", ODD_IDS[::-1], [0.1, 0.8, 0.2, 0.9, 0.7, 0.3][::-1])
    report = evaluate_submission(tmp_path / "sub.csv", tmp_path / "truth.csv")
    assert report.n == 6 and report.auc == 1.0


# ---------------------------------------------------------------- eda


def test_eda_refuses_to_overwrite_without_force(tmp_path):
    write_kaggle(tmp_path, n=12)
    out = tmp_path / "eda"
    args = ["-q", "eda", str(tmp_path / "train"), "-o", str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sorted(before) == sorted(["class_balance.png", "samples.png", "channel_histograms.png",
                                     "outliers.png", "outliers.csv"])
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "already holds class_balance.png" in _one_error_line(r.output)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    r = CliRunner().invoke(cli, args + ["--force"])
    assert r.exit_code == 0, r.output
    assert all(p.stat().st_mtime_ns != before[p.name] for p in out.iterdir())
    assert _leftovers(out) == []


def test_eda_on_unreadable_tifs_fails_or_skips_like_pack(tmp_path):
    ids, *_ = write_kaggle(tmp_path, n=12)
    bad = tmp_path / "train" / f"{ids[4]}.tif"
    bad.write_bytes(b"II*\0garbage")
    args = ["eda", str(tmp_path / "train"), "-o", str(tmp_path / "eda")]
    r = CliRunner().invoke(cli, ["-q", *args])
    assert r.exit_code == 1 and bad.name in _one_error_line(r.output)
    assert not (tmp_path / "eda").exists()
    r = CliRunner().invoke(cli, ["-q", *args, "--skip-bad"])
    assert r.exit_code == 0
    assert f"skipped 1 unreadable image(s): {bad.name}" in r.stderr


def test_interrupted_is_a_keyboard_interrupt():
    assert issubclass(Interrupted, KeyboardInterrupt) and not issubclass(Interrupted, PcamError)


def test_pack_runs_off_the_main_thread(kaggle):
    """Signal handlers can only be set on the main thread: pack elsewhere leaves Ctrl-C alone."""
    from concurrent.futures import ThreadPoolExecutor

    root, ids, *_ = kaggle
    before = signal.getsignal(signal.SIGINT)
    with ThreadPoolExecutor(1) as pool:
        res = pool.submit(pack, root / "train", progress=False).result()
    assert res.count == len(ids) and signal.getsignal(signal.SIGINT) is before
    pack(root / "train", progress=False, force=True)  # on the main thread: its handler is put back after
    assert signal.getsignal(signal.SIGINT) is before
