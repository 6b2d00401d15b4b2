"""What a hostile user broke (issue 24): crashes by signal, tracebacks, silent acceptance, misleading messages.

Each test is one reported case; it failed (a crash, a traceback, a wrong
exit status or message) before the fix it guards.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pcamtool import open_store, pack
from pcamtool.cli import cli
from pcamtool.errors import PcamError, StoreError

from helpers import write_kaggle


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def _run_cli(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """``pcamtool ARGS`` in a child process: a crash by signal kills the child, not the test run."""
    code = "import sys; from pcamtool.cli import main; sys.argv = ['pcamtool', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def store40(tmp_path) -> Path:
    """An uncompressed store of 40 labelled patches (16 positive)."""
    write_kaggle(tmp_path, n=40)
    return pack(tmp_path / "train", progress=False).path


# ---------------------------------------------------------------- crashes by signal


def fill(disk: Path, leave: int = 0) -> None:
    """Fill the 1 MiB ``disk`` with a file ``filler`` until ``leave`` bytes (or none) are free."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.fstat(fd).st_size < 2**20 - leave and os.write(fd, b"\0" * 4096):
            pass
    except OSError:   # ENOSPC: full
        pass
    finally:
        os.close(fd)


def test_pack_force_onto_a_full_disk_over_a_store_is_an_error_not_a_segfault(tmp_path, small_disk):
    write_kaggle(tmp_path, n=20)
    out = small_disk / "train.h5"
    pack(tmp_path / "train", out=out, progress=False)
    before = out.read_bytes()
    fill(small_disk)
    r = _run_cli("-q", "pack", str(tmp_path / "train"), "-o", str(out), "--force")
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # 139 (SIGSEGV) at exit before
    assert _one_error_line(r.stderr) == f"Error: {out}: cannot write (No space left on device); nothing was written"
    assert out.read_bytes() == before  # the store that was there is untouched
    assert sorted(os.listdir(small_disk)) == ["filler", "train.h5"]


TRUNCATE_DURING_CHECK = """
import os, sys
import pcamtool.io.store as S
path, done = sys.argv[1], []
def shrink():  # at the first read of pixels, after every check of the file's size
    if not done:
        done.append(1)
        os.truncate(path, os.path.getsize(path) // 2)
copy_rows, preadv = S.copy_rows, os.preadv
def copy_through_map(*args):
    shrink()
    return copy_rows(*args)
def read_from_file(*args):
    shrink()
    return preadv(*args)
S.copy_rows, os.preadv = copy_through_map, read_from_file
from pcamtool.cli import main
sys.argv = ["pcamtool", "-q", "info", "--check", path]
main()
"""


def test_a_store_truncated_while_info_check_reads_it_is_an_error_not_sigbus(store40):
    r = subprocess.run([sys.executable, "-c", TRUNCATE_DURING_CHECK, str(store40)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # -7 / 135 (SIGBUS) before
    assert _one_error_line(r.stderr).startswith(f"Error: {store40}: the file was truncated while in use")


# ---------------------------------------------------------------- info --check


def test_info_check_on_a_store_with_a_zeroed_tail_is_one_line(store40):
    size = store40.stat().st_size
    with open(store40, "r+b") as f:  # the metadata HDF5 writes last
        f.seek(size - 4096)
        f.write(b"\0" * 4096)
    r = CliRunner().invoke(cli, ["-q", "info", "--check", str(store40)])
    assert r.exit_code == 1
    assert _one_error_line(r.output).startswith(f"Error: {store40}: damaged store")


def _contiguous_copy(src: Path, dst: Path) -> None:
    """The same store with ``images`` unchunked (h5py's default layout): still a valid store."""
    with h5py.File(src, "r") as a, h5py.File(dst, "w") as b:
        for k, v in a.attrs.items():
            b.attrs[k] = v
        for name in a:
            b[name] = a[name][...]
    assert h5py.File(dst, "r")["images"].chunks is None


def test_info_check_on_a_contiguous_store(store40, tmp_path):
    flat = tmp_path / "flat.h5"
    _contiguous_copy(store40, flat)
    r = CliRunner().invoke(cli, ["-q", "info", "--check", str(flat)])
    assert r.exit_code == 0, r.output  # TypeError: 'NoneType' object is not iterable before
    assert "layout       contiguous (not chunked), compression none" in r.output
    assert "check        passed" in r.output
    store = open_store(flat)
    assert np.array_equal(store.load(), open_store(store40).load())


def test_info_check_mean_mismatch_prints_the_values_differently(store40):
    with h5py.File(store40, "r+") as f:
        f.attrs["mean"] = f.attrs["mean"] + 1e-8  # beyond the tolerance, below 6 decimals
    r = CliRunner().invoke(cli, ["-q", "info", "--check", str(store40)])
    assert r.exit_code == 1
    line = _one_error_line(r.output)
    recorded, actual = line.split("recorded mean ")[1].split(" (the images")[0].split(" but the pixels give ")
    assert recorded != actual, line  # both printed [0.49907, ...] before


def test_a_corrupt_gzip_chunk_names_the_store(tmp_path):
    write_kaggle(tmp_path, n=20)
    path = pack(tmp_path / "train", compression="gzip", progress=False).path
    with h5py.File(path, "r") as f:
        info = f["images"].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        f.write(b"\xff" * 64)
    store = open_store(path)  # the chunk is not read on open
    with pytest.raises(StoreError, match=rf"^{path}: damaged store, its images cannot be read"):
        store.gather([0, 1])  # what train and infer call
    with pytest.raises(StoreError, match=rf"^{path}: damaged chunk in rows 0\.\.19 "):
        list(open_store(path).chunks())


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize("unlabelled", [3, 40])
def test_a_store_with_unlabelled_rows_says_how_many(store40, unlabelled):
    with h5py.File(store40, "r+") as f:  # as a store merged from a labelled and an unlabelled one
        labels = f["labels"][...]
        labels[:unlabelled] = -1
        f["labels"][...] = labels
        f.attrs["n_positive"] = int((labels == 1).sum())
        f.attrs["n_unlabelled"] = unlabelled
    with pytest.raises(StoreError) as info:
        open_store(store40, need_labels=True)
    if unlabelled == 40:
        assert str(info.value) == f"{store40}: store has no labels (none of its 40 rows; pack it with a labels CSV)"
    else:
        assert str(info.value).startswith(f"{store40}: 3 of its 40 rows have no label")
    r = CliRunner().invoke(cli, ["-q", "train", str(store40), "--epochs", "1"])
    assert r.exit_code == 1 and _one_error_line(r.output) == f"Error: {info.value}"


# ---------------------------------------------------------------- folds and groups


@pytest.mark.parametrize("command", ["train", "cv"])
@pytest.mark.parametrize("folds", [20, 300, 1000])
def test_more_folds_than_images_of_a_class_says_the_real_limit(store40, tmp_path, command, folds):
    r = CliRunner().invoke(cli, ["-q", command, str(store40), "--folds", str(folds), "--epochs", "1",
                                 "-o", str(tmp_path / "run")])
    assert r.exit_code == 1
    assert _one_error_line(r.output) == (f"Error: --folds {folds}: the store has 16 positive images, and every "
                                         f"fold needs at least one of each class (use --folds 16 or fewer)")
    if command == "cv":   # nothing was written, so the same folder takes a possible split afterwards
        assert not (tmp_path / "run" / "cv_config.json").exists()
        r = CliRunner().invoke(cli, ["-q", "cv", str(store40), "--folds", "2", "--epochs", "1", "--no-export",
                                     "-o", str(tmp_path / "run"), "--arch", "simple", "--device", "cpu"])
        assert r.exit_code == 0, r.output


def test_make_split_limits_with_groups_and_tiny_val_frac():
    from pcamtool.train.split import make_split

    y = np.array([0] * 30 + [1] * 10)
    groups = np.array([f"g{i % 10}" for i in range(30)] + ["p0", "p1", "p2"] * 3 + ["p0"])
    with pytest.raises(PcamError, match=r"^--groups: only 3 groups hold positive images, so 5 folds for --folds 5"):
        make_split(y, folds=5, groups=groups)
    tr, va = make_split(y, folds=3, fold=2, groups=groups)
    assert set(y[va]) == {0, 1} and not set(groups[tr]) & set(groups[va])
    with pytest.raises(PcamError, match=r"^--val-frac 0.01: 1 of 40 images would validate"):
        make_split(y, val_frac=0.01)


def test_groups_that_are_a_folder_or_binary_or_short_rows(store40, tmp_path):
    binary = tmp_path / "groups.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    short = tmp_path / "short.csv"
    short.write_text("id,group\nabc\n")
    cases = [(tmp_path, f"Error: --groups {tmp_path}: is a folder, expected an id,group CSV file"),
             (binary, f"Error: {binary}: not an id,group CSV text file (UnicodeDecodeError: "),
             (short, f"Error: {short}: line 2 has 1 field(s), expected 2 (id,group)")]
    for path, message in cases:
        r = CliRunner().invoke(cli, ["-q", "train", str(store40), "--groups", str(path), "--epochs", "1",
                                     "-o", str(tmp_path / "run")])
        assert r.exit_code == 1 and _one_error_line(r.output).startswith(message), r.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- numbers on the command line


@pytest.mark.parametrize("args, option", [
    (["train", "--seed", "-1"], "--seed"),
    (["train", "--seed", "99999999999999999999"], "--seed"),
    (["cv", "--seed", "4294967296"], "--seed"),
    (["train", "--epochs", "99999999999999999999"], "--epochs"),
    (["cv", "--epochs", "10001"], "--epochs"),
    (["demo", "--seed", "-3"], "--seed"),
    (["synth", "OUT", "--seed", "-5"], "--seed"),
    (["synth", "OUT", "--train", "99999999999999999999"], "--train"),
    (["synth", "OUT", "--test", "10000001"], "--test"),
    (["eda", "SRC", "--seed", "-1"], "--seed"),
])
def test_out_of_range_numbers_are_refused_at_the_option(tmp_path, args, option):
    args = [str(tmp_path / a) if a in ("OUT", "SRC") else a for a in args]
    r = CliRunner().invoke(cli, ["-q", *args])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert f"Invalid value for '{option}'" in r.output and "is not in the range" in r.output
    assert not any(tmp_path.iterdir())  # refused before anything was made


def test_the_largest_seed_is_accepted(tmp_path):
    from pcamtool.cli.options import MAX_SEED

    r = CliRunner().invoke(cli, ["-q", "synth", str(tmp_path / "s"), "--train", "4", "--test", "0",
                                 "--seed", str(MAX_SEED)])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "s" / "train").glob("*.tif"))) == 4


# ---------------------------------------------------------------- environment variables


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("Yes", True), (" on ", True),
                                             ("0", False), ("false", False), ("NO", False), ("off", False),
                                             ("", None), (None, None)])
def test_env_flag_values(monkeypatch, value, expected):
    from pcamtool.envflags import env_flag

    if value is None:
        monkeypatch.delenv("PCAMTOOL_AMP", raising=False)
    else:
        monkeypatch.setenv("PCAMTOOL_AMP", value)
    assert env_flag("PCAMTOOL_AMP") is (True if expected is None else expected)
    assert env_flag("PCAMTOOL_AMP", False) is (False if expected is None else expected)


@pytest.mark.parametrize("name", ["PCAMTOOL_AMP", "PCAMTOOL_CHANNELS_LAST", "PCAMTOOL_NUMBA", "PCAMTOOL_DEBUG"])
def test_a_bad_env_flag_is_one_line_naming_it(store40, monkeypatch, name):
    monkeypatch.setenv(name, "banana")
    r = CliRunner().invoke(cli, ["-q", "info", str(store40)])
    assert r.exit_code == 1
    assert _one_error_line(r.output) == f"Error: {name}='banana': expected 1/0, true/false, yes/no or on/off"


def test_amp_and_channels_last_false_switch_them_off(monkeypatch):
    from pcamtool.device import Precision

    monkeypatch.setenv("PCAMTOOL_AMP", "false")
    monkeypatch.setenv("PCAMTOOL_CHANNELS_LAST", "off")
    p = Precision.for_device("cpu")
    assert p.autocast_dtype is None and not p.channels_last and "PCAMTOOL_AMP=0" in p.reason
    monkeypatch.setenv("PCAMTOOL_AMP", "banana")
    with pytest.raises(PcamError, match="PCAMTOOL_AMP='banana'"):
        Precision.for_device("cpu")


def test_numba_false_runs_kernels_as_plain_python():
    code = "import sys, pcamtool.kernels.jit; print(sys.modules['pcamtool.kernels.jit'].ENABLED)"
    for value, shown in (("false", "False"), ("off", "False"), ("yes", "True")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PCAMTOOL_NUMBA": value})
        assert r.stdout.strip() == shown, (value, r.stderr)


def test_debug_zero_keeps_tracebacks_off(tmp_path, monkeypatch):
    missing = tmp_path / "missing.h5"
    monkeypatch.setenv("PCAMTOOL_DEBUG", "0")
    r = CliRunner().invoke(cli, ["-q", "info", str(missing)])
    assert r.exit_code == 1 and _one_error_line(r.output) == f"Error: {missing}: store not found"
    monkeypatch.setenv("PCAMTOOL_DEBUG", "1")
    r = CliRunner().invoke(cli, ["-q", "info", str(missing)])
    assert isinstance(r.exception, StoreError)  # let through, for a bug report


# ---------------------------------------------------------------- merge


@pytest.mark.parametrize("bad", ["1.5", "-0.5"])
def test_merge_refuses_probabilities_outside_0_1_naming_file_and_line(tmp_path, bad):
    a = tmp_path / "sub.0of2.csv"
    a.write_text("id,label\na,0.1\nb,0.2\n")
    b = tmp_path / "sub.1of2.csv"
    b.write_text(f"id,label\nc,0.3\nd,{bad}\n")
    out = tmp_path / "submission.csv"
    r = CliRunner().invoke(cli, ["-q", "merge", str(a), str(b), "-o", str(out)])
    assert r.exit_code == 1 and not out.exists()
    assert _one_error_line(r.output) == f"Error: {b}: line 3: label '{bad}' is not a probability (0 to 1)"


def test_a_failing_merge_without_sample_prints_only_its_error(tmp_path):
    a = tmp_path / "first.csv"
    a.write_text("id,label\na,0.1\n")
    b = tmp_path / "second.csv"
    b.write_text("id,label\na,0.2\n")  # id a twice
    r = CliRunner().invoke(cli, ["merge", str(a), str(b)])
    assert r.exit_code == 1
    assert _one_error_line(r.output) == f"Error: id a is in two shards: {a} and {b}"
    b.write_text("id,label\nb,0.2\n")
    r = CliRunner().invoke(cli, ["merge", str(a), str(b)])
    assert r.exit_code == 0 and r.stdout == "id,label\na,0.1\nb,0.2\n"
    assert "a missing shard cannot be noticed" in r.stderr  # said once it succeeded


# ---------------------------------------------------------------- infer of a linked folder


def test_sample_beside_a_linked_test_folder_is_the_one_beside_the_link(tmp_path, monkeypatch):
    from pcamtool.infer import sample_beside

    real = tmp_path / "elsewhere"
    write_kaggle(real, n=3, split="test", labels=False)
    (real / "sample_submission.csv").write_text("id,label\n")  # the target's: not the user's
    data = tmp_path / "data"
    data.mkdir()
    (data / "test").symlink_to(real / "test", target_is_directory=True)
    (data / "sample_submission.csv").write_text("id,label\n")
    assert sample_beside(data / "test") == data / "sample_submission.csv"
    monkeypatch.chdir(data)
    assert sample_beside(Path("test")).resolve() == (data / "sample_submission.csv").resolve()
    (data / "sample_submission.csv").unlink()
    assert sample_beside(data / "test") is None  # not the target's


@pytest.mark.slow  # trains and exports a small model (~15 s on 2 busy cores)
def test_infer_of_a_linked_test_folder_orders_rows_by_the_sample_beside_the_link(tmp_path):
    from pcamtool.export import export_onnx
    from pcamtool.train.loop import fit
    from test_train import learnable_store, tiny

    store = learnable_store(tmp_path, n=64)
    model = export_onnx(fit(tiny(store, tmp_path / "run", epochs=1, arch="pcamnet"), progress=False).run_dir).path
    real = tmp_path / "elsewhere"
    ids, *_ = write_kaggle(real, n=6, seed=5, split="test", labels=False)
    (real / "sample_submission.csv").write_text("id,label\n" + "".join(f"{i},0\n" for i in sorted(ids)))
    data = tmp_path / "data"
    data.mkdir()
    (data / "test").symlink_to(real / "test", target_is_directory=True)
    mine = sorted(ids, reverse=True)
    (data / "sample_submission.csv").write_text("id,label\n" + "".join(f"{i},0\n" for i in mine))
    r = CliRunner().invoke(cli, ["-q", "infer", str(data / "test"), "--model", str(model), "--tta", "1"])
    assert r.exit_code == 0, r.output
    assert [ln.split(",")[0] for ln in r.stdout.splitlines()[1:]] == mine


# ---------------------------------------------------------------- kill, then rerun


EDA_HELD_AT_THE_LAST_FIGURE = """
import sys, time
import pcamtool.eda as E
real = E._save
def held(fig, path, staged):
    if path.name == "outliers.png":  # the four others are drawn: the old code had written them
        time.sleep(120)
    return real(fig, path, staged)
E._save = held
from pcamtool.cli import main
sys.argv = ["pcamtool", "-q", "eda", *sys.argv[1:]]
main()
"""


def test_eda_killed_before_its_last_output_leaves_none_and_the_same_command_runs(tmp_path):
    import time

    write_kaggle(tmp_path, n=12)
    out = tmp_path / "eda"
    args = [str(tmp_path / "train"), "-o", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", EDA_HELD_AT_THE_LAST_FIGURE, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(out.glob(".outliers.csv.*.partial")):  # outliers.csv is written just before outliers.png
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    left = sorted(p.name for p in out.iterdir())
    assert left and all(n.startswith(".") and n.endswith((".partial", ".lock")) for n in left), left
    r = CliRunner().invoke(cli, ["-q", "eda", *args])
    assert r.exit_code == 0, r.output  # "already holds class_balance.png, ..." before
    assert sorted(p.name for p in out.iterdir()) == sorted(["class_balance.png", "samples.png",
                                                            "channel_histograms.png", "outliers.png",
                                                            "outliers.csv"])


def test_a_lock_left_by_a_killed_writer_is_taken_over(tmp_path):
    from pcamtool.io.fsutil import atomic_path, lock_name

    out = tmp_path / "x.csv"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pcamtool.io.fsutil import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n    print('held', flush=True)\n    time.sleep(120)\n"), str(out)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    assert lock_name(out).exists()
    with atomic_path(out) as tmp:
        tmp.write_text("mine")
    assert out.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["x.csv"]


# ---------------------------------------------------------------- disk full while checkpointing


@pytest.mark.parametrize("room", [0, 100_000])  # torch: "basic_ios::clear: iostream error" / "[enforce fail ...]"
def test_torch_save_onto_a_full_disk_says_no_space_naming_the_output(small_disk, room):
    import torch

    from pcamtool.io.fsutil import WholeWrites, atomic_path

    fill(small_disk, leave=room)
    out = small_disk / "best.pt"
    state = {"w": torch.arange(100_000, dtype=torch.float32)}  # 400 kB: more than is left
    with pytest.raises(PcamError) as info:
        with atomic_path(out, force=True) as tmp, WholeWrites(tmp) as f:
            torch.save(state, f)
    assert str(info.value) == f"{out}: cannot write (No space left on device); nothing was written"
    assert os.listdir(small_disk) == ["filler"]
    os.unlink(small_disk / "filler")
    with atomic_path(out, force=True) as tmp, WholeWrites(tmp) as f:  # and with room, the same file torch writes
        torch.save(state, f)
    assert torch.equal(torch.load(out, weights_only=True)["w"], state["w"])


def test_a_checkpoint_saved_onto_a_full_disk_says_no_space_naming_it(small_disk):
    from test_checkpoint import tiny_checkpoint

    fill(small_disk)
    out = small_disk / "best.pt"
    with pytest.raises(PcamError) as info:
        tiny_checkpoint().save(out)
    assert "No space left on device" in str(info.value) and str(out) in str(info.value)
    assert "enforce fail" not in str(info.value) and "iostream" not in str(info.value)
    assert os.listdir(small_disk) == ["filler"]



def test_a_recorded_groups_path_that_became_a_folder_is_named_as_a_folder(store40, tmp_path):
    """A checkpoint's recorded --groups (read back by export --int8 and cv) that is now a folder."""
    from types import SimpleNamespace

    from pcamtool.io.store import open_store
    from pcamtool.train.checkpoint import split_rows

    (tmp_path / "groups.csv").mkdir()
    cfg = SimpleNamespace(val_store=None, groups=str(tmp_path / "groups.csv"), val_frac=0.2, seed=0, folds=None,
                          fold=0, max_train=None)
    with pytest.raises(PcamError, match=r"groups.csv: is a folder, expected an id,group CSV file"):
        split_rows(cfg, open_store(store40))


def test_ctrl_c_while_a_checkpoint_is_written_interrupts_after_the_write(tmp_path):
    """torch's C++ writer turns an exception raised inside ``write`` into "[enforce fail ...]": Ctrl-C waits."""
    import signal

    import torch

    from pcamtool.io.fsutil import WholeWrites

    sent: list[int] = []

    class CtrlCInWrite(WholeWrites):
        def write(self, data):
            if not sent:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGINT)   # lands while torch.save is inside this call
            return super().write(data)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)   # a background shell ignores it
    try:
        with pytest.raises(KeyboardInterrupt):
            with CtrlCInWrite(tmp_path / "x.pt") as f:
                torch.save({"w": torch.arange(1000)}, f)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sent and torch.equal(torch.load(tmp_path / "x.pt", weights_only=True)["w"], torch.arange(1000))
