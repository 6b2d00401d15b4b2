"""evaluate: scores against scikit-learn, thresholds, every bad input, the ROC plot."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

from pcamtool.errors import ExistsError, LabelsError, PcamError
from pcamtool.evaluate import EvalReport, evaluate_arrays, evaluate_submission


def scores(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.int8)
    p = np.clip(0.3 + 0.35 * y + rng.normal(0, 0.2, n), 0, 1)
    return p, y


def write_csv(path: Path, ids, values, header: str = "id,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{i},{v}\n" for i, v in zip(ids, values)))
    return path


def test_matches_sklearn():
    p, y = scores()
    r = evaluate_arrays(p, y)
    assert r.n == len(y) and r.n_positive == int(y.sum())
    assert r.auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert r.accuracy == pytest.approx(accuracy_score(y, p >= 0.5))
    assert r.confusion == confusion_matrix(y, p >= 0.5).tolist()
    assert r.best_confusion == confusion_matrix(y, p >= r.best_threshold).tolist()
    assert r.best_accuracy == pytest.approx(accuracy_score(y, p >= r.best_threshold))
    assert r.roc_png is None


def test_best_threshold_maximizes_youden_j():
    p, y = scores(300, seed=3)
    r = evaluate_arrays(p, y)

    def j(t: float) -> float:
        pred = p >= t
        return pred[y == 1].mean() - pred[y == 0].mean()

    assert r.youden_j == pytest.approx(j(r.best_threshold))
    assert all(j(t) <= r.youden_j + 1e-12 for t in np.unique(p))
    assert r.best_threshold in p  # a real score, not sklearn's inf sentinel


def test_perfect_and_inverted_scores():
    y = np.array([0, 0, 1, 1])
    perfect = evaluate_arrays([0.1, 0.2, 0.8, 0.9], y)
    assert perfect.auc == 1.0 and perfect.best_accuracy == 1.0 and perfect.youden_j == 1.0
    assert perfect.best_confusion == [[2, 0], [0, 2]]
    inverted = evaluate_arrays([0.9, 0.8, 0.2, 0.1], y)
    assert inverted.auc == 0.0 and inverted.accuracy == 0.0
    assert np.isfinite(inverted.best_threshold)


def test_threshold_is_inclusive_and_configurable():
    y = np.array([0, 1, 0, 1])
    r = evaluate_arrays([0.5, 0.5, 0.2, 0.9], y)
    assert r.confusion == [[1, 1], [0, 2]]  # 0.5 counts as positive
    r = evaluate_arrays([0.5, 0.5, 0.2, 0.9], y, threshold=0.6)
    assert r.threshold == 0.6 and r.confusion == [[2, 0], [1, 1]]


def test_report_dict_and_text():
    p, y = scores()
    r = evaluate_arrays(p, y)
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) >= {"n", "auc", "accuracy", "best_threshold", "best_accuracy",
                      "confusion", "best_confusion"}
    d["confusion"][0][0] = -1  # a copy: the frozen report is unchanged
    assert r.confusion[0][0] >= 0
    with pytest.raises(AttributeError):
        r.auc = 1.0  # type: ignore[misc]
    text = r.format()
    assert f"{r.auc:.4f}" in text and "TN" in text and "Youden" in text
    assert len(text.splitlines()) <= 6


@pytest.mark.parametrize("probs, labels, pattern", [
    ([0.1, 1.2, 0.3], [0, 1, 1], r"outside \[0, 1\].*row 1"),
    ([0.1, -0.01, 0.3], [0, 1, 1], r"outside \[0, 1\]"),
    ([0.1, float("nan"), 0.3], [0, 1, 1], "not finite"),
    ([0.1, 0.2, 0.3], [0, 2, 1], "not 0 or 1"),
    ([0.1, 0.2, 0.3], [1, 1, 1], "single class"),
    ([0.1, 0.2, 0.3], [0, 0, 0], "single class"),
    ([0.1, 0.2], [0, 1, 1], "2 probabilities .* but 3 labels"),
    ([], [], "no rows"),
])
def test_bad_arrays(probs, labels, pattern):
    with pytest.raises(PcamError, match=pattern):
        evaluate_arrays(np.array(probs, float), np.array(labels))


def test_submission_round_trip(tmp_path: Path):
    p, y = scores(50)
    ids = [f"id{i:03d}" for i in range(50)]
    order = np.random.default_rng(1).permutation(50)  # the files need not agree on order
    sub = write_csv(tmp_path / "sub.csv", [ids[i] for i in order], p[order])
    lab = write_csv(tmp_path / "labels.csv", ids, y)
    r = evaluate_submission(sub, lab)
    assert r.auc == pytest.approx(roc_auc_score(y, p))
    assert r.n == 50


def test_submission_ids_must_match_both_ways(tmp_path: Path):
    ids = [f"id{i}" for i in range(10)]
    lab = write_csv(tmp_path / "labels.csv", ids, [0, 1] * 5)
    short = write_csv(tmp_path / "short.csv", ids[:6], [0.5] * 6)
    with pytest.raises(PcamError) as err:
        evaluate_submission(short, lab)
    msg = str(err.value)
    assert "4 id(s)" in msg and "labels.csv" in msg and "short.csv" in msg
    assert "id6, id7, id8 and 1 more" in msg
    extra = write_csv(tmp_path / "extra.csv", ids + ["stranger"], [0.5] * 11)
    with pytest.raises(PcamError, match=r"1 id\(s\) of .*extra.csv are not in .*labels.csv: stranger"):
        evaluate_submission(extra, lab)


def test_submission_errors_name_files_and_ids(tmp_path: Path):
    lab = write_csv(tmp_path / "labels.csv", ["a", "b", "c"], [0, 1, 1])
    logits = write_csv(tmp_path / "logits.csv", ["a", "b", "c"], [-2.0, 0.5, 3.0])
    with pytest.raises(PcamError, match=r"logits.csv: 2 probabilities are outside \[0, 1\].*a, c"):
        evaluate_submission(logits, lab)
    one = write_csv(tmp_path / "one.csv", ["a", "b"], [1, 1])
    sub = write_csv(tmp_path / "sub.csv", ["a", "b"], [0.2, 0.7])
    with pytest.raises(PcamError, match=r"one.csv: every one of the 2 labels is 1.*undefined"):
        evaluate_submission(sub, one)
    with pytest.raises(LabelsError, match="submission file not found"):
        evaluate_submission(tmp_path / "nope.csv", lab)
    bad = tmp_path / "bad.csv"
    bad.write_text("id,label\na,0.1\nb,high\n")
    with pytest.raises(LabelsError, match="bad.csv: line 3"):
        evaluate_submission(bad, lab)
    probs_as_labels = write_csv(tmp_path / "p.csv", ["a", "b", "c"], [0.2, 0.7, 0.9])
    with pytest.raises(LabelsError, match="not 0 or 1"):
        evaluate_submission(sub, probs_as_labels)  # arguments swapped


def test_roc_png(tmp_path: Path):
    p, y = scores()
    png = tmp_path / "plots" / "roc.png"
    r = evaluate_arrays(p, y, png)
    assert r.roc_png == str(png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 300
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10  # something is drawn
    assert [f.name for f in png.parent.iterdir()] == ["roc.png"]  # no leftover temporary
    with pytest.raises(ExistsError):
        evaluate_arrays(p, y, png, force=False)
    before = png.read_bytes()
    evaluate_arrays(p[::-1].copy(), y, png)  # replaced by default
    assert png.read_bytes() != before


def test_submission_with_roc(tmp_path: Path):
    lab = write_csv(tmp_path / "labels.csv", ["a", "b", "c", "d"], [0, 1, 0, 1])
    sub = write_csv(tmp_path / "sub.csv", ["a", "b", "c", "d"], [0.1, 0.9, 0.6, 0.4])
    r = evaluate_submission(sub, lab, roc_png=tmp_path / "roc.png")
    assert isinstance(r, EvalReport) and r.auc == 0.75
    assert (tmp_path / "roc.png").stat().st_size > 1000
    assert "roc.png" in r.format()
