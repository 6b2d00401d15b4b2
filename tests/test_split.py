"""Train/validation splits (pcamtool.train.split): stratified hold-out, K-fold, grouped by slide, groups files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pcamtool.errors import PcamError
from pcamtool.train.split import make_split, read_groups


def labels(n: int = 100, pos: float = 0.4) -> np.ndarray:
    return (np.arange(n) % 10 < pos * 10).astype(np.int8)


def is_partition(tr: np.ndarray, va: np.ndarray, n: int) -> bool:
    return (len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == n
            and np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(n)))


@pytest.mark.parametrize("frac", [0.1, 0.2, 0.25, 0.5])
def test_holdout_is_a_stratified_partition_of_the_requested_size(frac):
    y = labels(200)
    tr, va = make_split(y, val_frac=frac, seed=0)
    assert is_partition(tr, va, 200)
    assert len(va) == round(200 * frac)
    assert y[va].mean() == pytest.approx(y.mean(), abs=0.01)     # stratified: same positive share
    assert y[tr].mean() == pytest.approx(y.mean(), abs=0.01)


def test_holdout_depends_on_the_seed_only():
    y = labels(120)
    a, b, c = make_split(y, 0.2, seed=1), make_split(y, 0.2, seed=1), make_split(y, 0.2, seed=2)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    assert not np.array_equal(np.sort(a[1]), np.sort(c[1]))


def test_kfold_folds_tile_the_data_and_are_stratified():
    y = labels(100)
    vals = []
    for fold in range(5):
        tr, va = make_split(y, folds=5, fold=fold, seed=3)
        assert is_partition(tr, va, 100)
        assert len(va) == 20 and y[va].sum() == 8      # 40 positives over 5 folds
        vals.append(va)
    assert np.array_equal(np.sort(np.concatenate(vals)), np.arange(100))
    # same seed, same folds; fold k differs from fold k+1
    assert np.array_equal(make_split(y, folds=5, fold=2, seed=3)[1], vals[2])
    assert not np.array_equal(np.sort(vals[0]), np.sort(vals[1]))


def test_grouped_folds_keep_every_group_on_one_side():
    y = labels(120)
    groups = np.array([f"slide{i // 6}" for i in range(120)])   # 20 slides of 6 patches
    seen = []
    for fold in range(4):
        tr, va = make_split(y, folds=4, fold=fold, seed=0, groups=groups)
        assert is_partition(tr, va, 120)
        assert not set(groups[tr]) & set(groups[va])
        seen.append(set(groups[va]))
    assert set().union(*seen) == set(groups)      # every slide validates exactly once
    assert sum(len(s) for s in seen) == 20
    # a grouped hold-out: 1/val_frac folds, fold 0 held out
    tr, va = make_split(y, val_frac=0.25, seed=0, groups=groups)
    assert is_partition(tr, va, 120) and not set(groups[tr]) & set(groups[va])
    assert 0.15 <= len(va) / 120 <= 0.35
    tr2, va2 = make_split(y, folds=4, fold=0, seed=0, groups=groups)
    assert np.array_equal(va, va2)


def test_grouped_split_of_a_large_val_frac_rounds_to_two_folds():
    y = labels(40)
    groups = np.array([f"s{i // 4}" for i in range(40)])
    tr, va = make_split(y, val_frac=0.7, groups=groups)   # 1/0.7 rounds to 1, at least 2 folds
    assert is_partition(tr, va, 40) and 0.3 <= len(va) / 40 <= 0.7


@pytest.mark.parametrize("kwargs,says", [
    ({"folds": 1}, "--folds must be at least 2, got 1"),
    ({"folds": 5, "fold": 5}, "--fold 5 is not one of the 5 folds (0 to 4)"),
    ({"folds": 5, "fold": -1}, "--fold -1 is not one of the 5 folds (0 to 4)"),
    ({"folds": 41}, "--folds 41: the store has 40 positive images, and every fold needs at least one of "
                    "each class (use --folds 40 or fewer)"),
    ({"val_frac": 0.01}, "--val-frac 0.01: 1 of 100 images would validate; both sides need"),
    ({"val_frac": 0.99}, "--val-frac 0.99: 99 of 100 images would validate"),
    ({"val_frac": 0.0}, "--val-frac must be between 0 and 1, got 0.0"),
    ({"val_frac": 1.0}, "--val-frac must be between 0 and 1, got 1.0"),
])
def test_bad_fold_options_are_one_line(kwargs, says):
    with pytest.raises(PcamError) as e:
        make_split(labels(100), **kwargs)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_folds_up_to_the_rarer_class_count_are_allowed():
    y = np.array([0, 1] * 5)
    tr, va = make_split(y, folds=5, fold=4)
    assert is_partition(tr, va, 10) and len(va) == 2 and sorted(y[va]) == [0, 1]
    y = np.array([1] * 3 + [0] * 7)
    assert len(make_split(y, folds=3, fold=2)[1]) >= 3
    with pytest.raises(PcamError, match="has 3 positive images"):
        make_split(y, folds=4)
    with pytest.raises(PcamError, match="has 3 negative images"):
        make_split(1 - y, folds=4)
    four = np.array([0, 0, 1, 1])
    tr, va = make_split(four, val_frac=0.5)   # 2 of 4 validate: the fewest either side may have
    assert is_partition(tr, va, 4) and sorted(four[va].tolist()) == [0, 1]


def test_a_class_with_fewer_than_two_images_cannot_be_split():
    with pytest.raises(PcamError, match="at least 2 images of each class"):
        make_split(np.array([0] * 9 + [1]))
    with pytest.raises(PcamError, match="at least 2 images of each class"):
        make_split(np.zeros(10, np.int8))
    tr, va = make_split(np.array([0] * 8 + [1, 1]), val_frac=0.5)
    assert sorted(np.concatenate([tr, va])) == list(range(10))


def test_too_few_groups_name_the_option():
    y = labels(30)
    groups = np.array(["a", "b", "c"] * 10)
    with pytest.raises(PcamError, match=r"3 groups cannot make 5 folds for --folds 5;"):
        make_split(y, folds=5, groups=groups)
    with pytest.raises(PcamError, match=r"3 groups cannot make 4 folds for --val-frac 0.25 \(1/4\)"):
        make_split(y, val_frac=0.25, groups=groups)
    tr, va = make_split(y, folds=3, groups=groups)   # as many groups as folds works
    assert len(set(groups[va])) == 1


def test_grouped_folds_need_groups_holding_each_class():
    y = np.array([1] * 6 + [0] * 24)
    groups = np.array(["p1"] * 3 + ["p2"] * 3 + [f"n{i % 6}" for i in range(24)])  # 2 groups hold positives
    with pytest.raises(PcamError, match=r"only 2 groups hold positive images, so 3 folds for --folds 3 "
                                        r"cannot each validate on both classes \(use at most 2 folds"):
        make_split(y, folds=3, groups=groups)
    with pytest.raises(PcamError, match="only 2 groups hold negative images"):
        make_split(1 - y, folds=3, groups=groups)   # the same layout with the classes swapped
    tr, va = make_split(y, folds=2, fold=1, groups=groups)
    assert sorted(set(y[va].tolist())) == [0, 1] and not set(groups[tr]) & set(groups[va])


# ------------------------------------------------------------------ groups file


def test_read_groups_maps_every_id(tmp_path: Path):
    p = tmp_path / "groups.csv"
    p.write_text("\ufeffGroup, ID\nslideA,b\n\nslideB , a \nslideC,c\n", encoding="utf-8")  # BOM, any order
    got = read_groups(p, np.array(["a", "b", "c", "b"]))
    assert got.tolist() == ["slideB", "slideA", "slideC", "slideA"]


def test_read_groups_refuses_a_wrong_header_or_a_missing_id(tmp_path: Path):
    p = tmp_path / "g.csv"
    p.write_text("id,slide\na,1\n")
    with pytest.raises(PcamError, match=r"g.csv: header is 'id,slide', expected 'id,group'"):
        read_groups(p, np.array(["a"]))
    p.write_text("")
    with pytest.raises(PcamError, match="header is '', expected"):
        read_groups(p, np.array(["a"]))
    p.write_text("id,group\na,1\nb,2\n")
    with pytest.raises(PcamError, match=r"g.csv: no group for 2 id\(s\), e.g. c"):
        read_groups(p, np.array(["a", "c", "d"]))
    p.write_text("id,group\na,1\nb\n")
    with pytest.raises(PcamError, match=r"g.csv: line 3 has 1 field\(s\), expected 2 \(id,group\)"):
        read_groups(p, np.array(["a"]))
    p.write_bytes(b"id,group\n\xff\xfe\x00garbage\n")
    with pytest.raises(PcamError, match=r"g.csv: not an id,group CSV text file \(UnicodeDecodeError"):
        read_groups(p, np.array(["a"]))
    with pytest.raises(PcamError, match=r"nope.csv: groups file not found"):
        read_groups(tmp_path / "nope.csv", np.array(["a"]))
    with pytest.raises(PcamError, match=r": is a folder, expected an id,group CSV file"):
        read_groups(tmp_path, np.array(["a"]))


def test_resolve_groups_prefers_the_file_then_the_store_slides(tmp_path: Path, caplog):
    import logging
    from types import SimpleNamespace

    from pcamtool.train.split import resolve_groups

    p = tmp_path / "g.csv"
    p.write_text("id,group\na,s1\nb,s2\nc,s1\n")
    with_slides = SimpleNamespace(ids=np.array(["a", "b", "c"]), groups=np.array(["x", "y", "y"]), path="st.h5")
    with caplog.at_level(logging.INFO, logger="pcamtool"):
        assert resolve_groups(with_slides, p).tolist() == ["s1", "s2", "s1"]
        assert caplog.messages == [f"splitting by the 2 groups of {p}"]
        caplog.clear()
        assert resolve_groups(with_slides, None).tolist() == ["x", "y", "y"]
        assert caplog.messages == ["splitting by slide: 2 slides recorded in st.h5 (a random split would put "
                                   "patches of one slide on both sides and leak; --groups FILE overrides)"]
        caplog.clear()
        no_path = SimpleNamespace(ids=np.array(["a"]), groups=np.array(["x"]))
        assert resolve_groups(no_path, None).tolist() == ["x"]
        assert caplog.messages[0].startswith("splitting by slide: 1 slides recorded in the store (")
        caplog.clear()
        assert resolve_groups(SimpleNamespace(ids=np.array(["a"]), groups=None), "") is None
        assert resolve_groups(SimpleNamespace(ids=np.array(["a"])), None) is None
        assert caplog.text == ""


def test_read_groups_reads_csv_as_the_csv_module_means(tmp_path: Path):
    p = tmp_path / "g.csv"
    # a quoted group holding a line break (opened with newline="", as the csv module asks)
    p.write_bytes(b'id,group\r\na,"slide\r\n7"\r\nb,plain\r\n')
    assert read_groups(p, np.array(["a", "b"])).tolist() == ["slide\r\n7", "plain"]
    long = ",".join(f"column{i}" for i in range(12))           # 95 characters: shown cut at 60
    p.write_text(long + "\n")
    with pytest.raises(PcamError) as e:
        read_groups(p, np.array(["a"]))
    assert f"header is {long[:60]!r}, expected 'id,group'" in str(e.value)
    p.write_bytes(b"id,group\n\xff\xfe\x00garbage\n")
    with pytest.raises(PcamError, match=r"\(UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff"):
        read_groups(p, np.array(["a"]))
    with pytest.raises(PcamError, match=r"g.csv/x: cannot read the groups file \(Not a directory\)"):
        read_groups(p / "x", np.array(["a"]))


def test_a_long_decoder_message_is_cut_to_80_characters(tmp_path: Path):
    # a bad 3-byte sequence past byte 1000 makes the decoder's message 81 characters long
    data = b"id,group\n" + b"a,s\n" * 300 + b"\xf0\x90\x80A\n"
    with pytest.raises(UnicodeDecodeError) as decoded:
        data.decode("utf-8")
    text = str(decoded.value)
    assert len(text) > 80
    p = tmp_path / "g.csv"
    p.write_bytes(data)
    with pytest.raises(PcamError) as e:
        read_groups(p, np.array(["a"]))
    assert str(e.value) == f"{p}: not an id,group CSV text file (UnicodeDecodeError: {text[:80]})"


def test_defaults_are_a_fifth_held_out_with_seed_zero():
    y = labels(100)
    tr, va = make_split(y)
    want_tr, want_va = make_split(y, val_frac=0.2, seed=0, folds=None, fold=0, groups=None)
    assert np.array_equal(va, want_va) and np.array_equal(tr, want_tr) and len(va) == 20
    tr, va = make_split(y, folds=4)                                     # fold 0 unless told
    assert np.array_equal(va, make_split(y, folds=4, fold=0, seed=0)[1])
    with pytest.raises(PcamError) as e:
        make_split(np.array([0, 0, 0, 1]))
    assert str(e.value) == "need at least 2 images of each class to split off validation data"


def test_grouped_half_split_is_two_folds_of_the_groups():
    y = np.array([0, 1] * 10)
    groups = np.array(["a"] * 10 + ["b"] * 10)
    tr, va = make_split(y, val_frac=0.5, groups=groups)                # 1/0.5 = 2 folds: one slide each side
    assert len(set(groups[va])) == 1 and len(set(groups[tr])) == 1 and len(va) == 10


def test_fold_means_nothing_without_folds():
    y = labels(60)
    groups = np.array([f"s{i // 3}" for i in range(60)])
    for g in (None, groups):
        a, b = make_split(y, val_frac=0.25, groups=g, fold=2), make_split(y, val_frac=0.25, groups=g)
        assert np.array_equal(a[1], b[1])
