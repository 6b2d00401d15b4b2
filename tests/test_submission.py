"""submission: row order, shard parsing and slicing, merging shards with every check."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pcamtool.io.csvio import read_id_table
from pcamtool.errors import ExistsError, LabelsError, PcamError
from pcamtool.submission import merge_shards, order_like_sample, parse_shard, shard_slice


def write_csv(path: Path, ids, values, header: str = "id,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{i},{v}\n" for i, v in zip(ids, values)))
    return path


@pytest.fixture
def sample(tmp_path: Path) -> tuple[Path, list[str]]:
    """A sample submission whose order is neither sorted nor the prediction order."""
    ids = ["e5", "a1", "c3", "b2", "d4"]
    return write_csv(tmp_path / "sample_submission.csv", ids, [0] * 5), ids


# ---- order_like_sample -------------------------------------------------

def test_order_follows_sample(sample):
    path, order = sample
    ids = ["a1", "b2", "c3", "d4", "e5"]
    probs = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    got_ids, got = order_like_sample(ids, probs, path)
    assert got_ids == order
    assert got.tolist() == [0.5, 0.1, 0.3, 0.2, 0.4]
    assert got.dtype == np.float64 and got is not probs


@pytest.mark.parametrize("probs", [np.array([0.25, 0.5], np.float32), [0, 1]])
def test_order_returns_float64_whatever_the_input_dtype(probs):
    # Written with "%.9g": a float32 0.1 would read back as 0.100000001 in the submission.
    _, got = order_like_sample(["b", "a"], probs)
    assert got.dtype == np.float64
    assert got.tolist() == [float(probs[1]), float(probs[0])]


def test_order_takes_only_the_ids_of_a_sample_whose_labels_are_probabilities(tmp_path: Path):
    # A previous submission can serve as the row order: its labels are not 0/1 and do not matter.
    template = write_csv(tmp_path / "previous.csv", ["b", "c", "a"], [0.25, 0.875, 0.5])
    ids, probs = order_like_sample(["a", "b", "c"], [0.1, 0.2, 0.3], template)
    assert ids == ["b", "c", "a"] and probs.tolist() == [0.2, 0.3, 0.1]


def test_order_without_sample_is_sorted():
    ids, probs = order_like_sample(["c", "a", "b"], [0.3, 0.1, 0.2], None)
    assert ids == ["a", "b", "c"] and probs.tolist() == [0.1, 0.2, 0.3]


def test_order_missing_sample_ids(sample):
    path, _ = sample
    with pytest.raises(PcamError) as err:
        order_like_sample(["a1"], [0.5], path)
    msg = str(err.value)
    assert "sample_submission.csv" in msg and "4 of its 5 id(s) have no prediction" in msg
    assert "e5, c3, b2 and 1 more" in msg  # the first few, in sample order


def test_order_ids_not_in_sample(sample):
    path, ids = sample
    with pytest.raises(PcamError, match=r"2 predicted id\(s\) are not in .*sample_submission.csv: x, y"):
        order_like_sample(ids + ["x", "y"], [0.5] * 7, path)


def test_order_bad_inputs(tmp_path: Path, sample):
    with pytest.raises(PcamError, match="3 ids but 2 probabilities"):
        order_like_sample(["a", "b", "c"], [0.1, 0.2])
    with pytest.raises(PcamError, match=r"id a has two predictions \(rows 0 and 2\)"):
        order_like_sample(["a", "b", "a"], [0.1, 0.2, 0.3])
    with pytest.raises(LabelsError, match="sample submission file not found"):
        order_like_sample(["a"], [0.1], tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("id,prediction\na,0\n")
    with pytest.raises(LabelsError, match="expected 'id,label'"):
        order_like_sample(["a"], [0.1], bad)


# ---- shards ------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("0/1", (0, 1)), ("0/4", (0, 4)), ("3/4", (3, 4)),
                                            (" 2 / 8 ", (2, 8))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text, pattern", [
    ("4/4", "count from 0, so i must be 0 to 3"),
    ("1/0", "at least 1"),
    ("1", "expected i/n"),
    ("a/b", "expected i/n"),
    ("-1/4", "expected i/n"),
    ("1/2/3", "expected i/n"),
    ("", "expected i/n"),
])
def test_parse_shard_errors(text, pattern):
    with pytest.raises(PcamError, match=pattern):
        parse_shard(text)


@pytest.mark.parametrize("n_items", [0, 1, 5, 7, 100, 57458])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_shard_slices_partition(n_items, n):
    slices = [shard_slice(n_items, i, n) for i in range(n)]
    covered = np.concatenate([np.arange(n_items)[s] for s in slices])
    assert covered.tolist() == list(range(n_items))  # contiguous, disjoint, in order, complete
    sizes = [s.stop - s.start for s in slices]
    assert max(sizes) - min(sizes) <= 1


def test_shard_slice_errors():
    for args in [(10, 2, 2), (10, -1, 2), (10, 0, 0), (-1, 0, 1)]:
        with pytest.raises(PcamError):
            shard_slice(*args)


# ---- merge_shards --------------------------------------------------------

def make_shards(tmp_path: Path, ids: list[str], probs: list[float], n: int) -> list[Path]:
    paths = []
    for i in range(n):
        s = shard_slice(len(ids), i, n)
        paths.append(write_csv(tmp_path / f"sub.{i}.csv", ids[s], probs[s]))
    return paths


def test_merge_with_sample(tmp_path: Path, sample):
    sample_path, order = sample
    ids = sorted(order)
    probs = [0.1, 0.25, 0.5, 0.75, 0.9]
    shards = make_shards(tmp_path, ids, probs, 3)
    out = tmp_path / "submission.csv"
    got_ids, got = merge_shards(shards[::-1], out, sample_csv=sample_path)
    assert got_ids == order
    expected = dict(zip(ids, probs))
    assert got.tolist() == [expected[k] for k in order]
    text = out.read_text().splitlines()
    assert text[0] == "id,label" and [r.split(",")[0] for r in text[1:]] == order
    assert read_id_table(out, as_float=True) == {k: expected[k] for k in order}
    assert not list(tmp_path.glob(".*partial"))


def test_merge_without_sample_sorts_and_may_not_write(tmp_path: Path):
    shards = [write_csv(tmp_path / "b.csv", ["z", "m"], [0.9, 0.5]),
              write_csv(tmp_path / "a.csv", ["a"], [0.1])]
    ids, probs = merge_shards(shards, None)
    assert ids == ["a", "m", "z"] and probs.tolist() == [0.1, 0.5, 0.9]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv"]


def test_merge_duplicate_id_names_both_files(tmp_path: Path):
    a = write_csv(tmp_path / "s0.csv", ["x", "dup"], [0.1, 0.2])
    b = write_csv(tmp_path / "s1.csv", ["dup", "y"], [0.3, 0.4])
    with pytest.raises(PcamError, match=r"id dup is in two shards: .*s0.csv and .*s1.csv"):
        merge_shards([a, b], tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_merge_same_file_twice(tmp_path: Path):
    a = write_csv(tmp_path / "s0.csv", ["x"], [0.1])
    with pytest.raises(PcamError, match="s0.csv: shard file given twice"):
        merge_shards([a, tmp_path / "." / "s0.csv"], None)


def test_merge_missing_sample_ids(tmp_path: Path, sample):
    sample_path, order = sample
    shards = make_shards(tmp_path, sorted(order), [0.5] * 5, 3)
    with pytest.raises(PcamError) as err:
        merge_shards(shards[:2], tmp_path / "out.csv", sample_csv=sample_path)  # a shard lost
    msg = str(err.value)
    assert "sample_submission.csv" in msg and "have no prediction" in msg
    assert "e5" in msg and "merging 2 shard file(s)" in msg
    assert not (tmp_path / "out.csv").exists()


def test_merge_extra_ids(tmp_path: Path, sample):
    sample_path, order = sample
    shards = make_shards(tmp_path, sorted(order) + ["zz"], [0.5] * 6, 2)
    with pytest.raises(PcamError, match=r"1 predicted id\(s\) are not in .*sample_submission.csv: zz"):
        merge_shards(shards, None, sample_csv=sample_path)


def test_merge_refuses_to_overwrite(tmp_path: Path):
    a = write_csv(tmp_path / "s0.csv", ["x"], [0.1])
    out = tmp_path / "out.csv"
    out.write_text("precious\n")
    with pytest.raises(ExistsError, match="already exists"):
        merge_shards([a], out)
    assert out.read_text() == "precious\n"
    merge_shards([a], out, force=True)
    assert out.read_text() == "id,label\nx,0.1\n"


def test_merge_bad_inputs(tmp_path: Path):
    with pytest.raises(PcamError, match=r"^no shard files to merge$"):
        merge_shards([], None)
    with pytest.raises(LabelsError, match="shard file not found"):
        merge_shards([tmp_path / "missing.csv"], None)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\na,0.1\na,0.2\n")
    with pytest.raises(LabelsError, match="bad.csv: line 3: duplicate id a"):
        merge_shards([bad], None)


def test_merge_rejects_a_shard_value_that_is_not_a_probability(tmp_path: Path):
    # Shards are pcamtool's own predictions: 1.5 means a broken run, not a score to rank.
    good = write_csv(tmp_path / "s0.csv", ["a"], [0.5])
    bad = write_csv(tmp_path / "s1.csv", ["b", "c"], [1.0, 1.5])
    with pytest.raises(LabelsError, match=r"s1.csv: line 3: label '1.5' is not a probability \(0 to 1\)"):
        merge_shards([good, bad], None)


def test_merge_does_not_clobber_an_output_that_appears_while_shards_are_read(tmp_path, monkeypatch):
    # out is checked before reading (to fail fast) and again when written: another
    # merge to the same path may finish in between, and its file must survive.
    import pcamtool.submission as submission
    a = write_csv(tmp_path / "s0.csv", ["x"], [0.1])
    out = tmp_path / "out.csv"
    real = submission.read_id_table

    def read_while_another_run_finishes(*args, **kwargs):
        table = real(*args, **kwargs)
        out.write_text("id,label\nother,0.5\n")
        return table

    monkeypatch.setattr(submission, "read_id_table", read_while_another_run_finishes)
    with pytest.raises(ExistsError, match="already exists"):
        merge_shards([a], out)
    assert out.read_text() == "id,label\nother,0.5\n"


# ---- a missing shard without --sample ------------------------------------

def test_merge_without_sample_notices_a_missing_shard_by_name(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("pcamtool"), "propagate", True)  # the CLI tests turn it off
    a = write_csv(tmp_path / "sub.0of3.csv", ["a", "b"], [0.1, 0.2])
    c = write_csv(tmp_path / "sub.2of3.csv", ["e"], [0.5])
    with pytest.raises(PcamError, match=r"shard\(s\) 1of3 missing: 2 file\(s\) given for 3 shards"):
        merge_shards([a, c])
    b = write_csv(tmp_path / "sub.1of3.csv", ["c", "d"], [0.3, 0.4])
    with caplog.at_level("WARNING", logger="pcamtool"):
        ids, probs = merge_shards([c, a, b])
    assert ids == ["a", "b", "c", "d", "e"] and not caplog.records
    other = write_csv(tmp_path / "x_0-of-2.csv", ["z"], [0.9])
    with pytest.raises(PcamError, match=r"^shard file names disagree on the number of shards \(2, 3\)$"):
        merge_shards([a, other])


def test_merge_without_sample_or_shard_names_warns(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("pcamtool"), "propagate", True)
    a = write_csv(tmp_path / "first.csv", ["a"], [0.1])
    b = write_csv(tmp_path / "second.csv", ["b"], [0.2])
    with caplog.at_level("WARNING", logger="pcamtool"):
        ids, _ = merge_shards([a, b])
    assert ids == ["a", "b"]
    # a set: a handler another test left on the pcamtool logger may hand caplog the same record twice
    assert {r.getMessage() for r in caplog.records} == {
        "merged 2 shard file(s) without --sample: a missing shard cannot be noticed "
        "(give --sample, or name the shards like sub.0of2.csv)"}
