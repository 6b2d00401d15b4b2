"""evaluate: the shared metrics and the report against scikit-learn, thresholds, every bad input, the ROC plot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, roc_auc_score

from pcamtool import evaluate
from pcamtool.errors import ExistsError, LabelsError, PcamError
from pcamtool.evaluate import PROB_EPS, EvalReport, binary_metrics, evaluate_arrays, evaluate_submission


def scores(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(np.int8)
    p = np.clip(0.3 + 0.35 * y + rng.normal(0, 0.2, n), 0, 1)
    return p, y


def write_csv(path: Path, ids, values, header: str = "id,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{i},{v}\n" for i, v in zip(ids, values)))
    return path


def test_binary_metrics_match_sklearn():
    p, y = scores(5000, seed=2)
    m = binary_metrics(p, y)
    assert set(m) == {"loss", "auc", "acc"} and all(isinstance(v, float) for v in m.values())
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert m["loss"] == pytest.approx(log_loss(y, np.clip(p, PROB_EPS, 1 - PROB_EPS)), rel=1e-12)
    assert m["acc"] == pytest.approx(accuracy_score(y, p >= 0.5))
    # what training hands it: float32 probabilities and float labels
    m32 = binary_metrics(p.astype(np.float32), y.astype(np.float32))
    assert m32["auc"] == pytest.approx(m["auc"], abs=1e-6) and m32["acc"] == m["acc"]


def test_binary_metrics_clip_certain_mistakes_and_allow_one_class():
    m = binary_metrics(np.array([0.0, 1.0, 1.0, 0.0]), np.array([1, 1, 0, 0]))
    # two certain mistakes cost -log(1e-7) each, two certain hits ~1e-7 each
    assert m["loss"] == pytest.approx(-np.log(PROB_EPS) / 2, rel=1e-6)
    assert m["acc"] == 0.5 and m["auc"] == 0.5
    one = binary_metrics(np.array([0.2, 0.9]), np.array([1, 1]))  # a tiny validation split
    assert np.isnan(one["auc"]) and one["acc"] == 0.5 and np.isfinite(one["loss"])
    assert binary_metrics(np.array([0.4, 0.6]), np.array([0, 1]), threshold=0.7)["acc"] == 0.5


def test_binary_metrics_need_no_matplotlib_or_torch():
    code = ("import sys, numpy as np; from pcamtool.evaluate import binary_metrics; "
            "print(binary_metrics(np.array([0.2, 0.8]), np.array([0, 1]))['auc']); "
            "print(sorted(m for m in ('matplotlib', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1.0", "[]"]


def test_report_scores_come_from_binary_metrics(monkeypatch):
    p, y = scores()
    monkeypatch.setattr(evaluate, "binary_metrics", lambda probs, labels, threshold: {
        "loss": 1.25, "auc": 0.625, "acc": 0.375})
    r = evaluate_arrays(p, y)
    assert (r.loss, r.auc, r.accuracy) == (1.25, 0.625, 0.375)


def test_matches_sklearn():
    p, y = scores()
    r = evaluate_arrays(p, y)
    assert r.n == len(y) and r.n_positive == int(y.sum())
    assert r.auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert r.loss == pytest.approx(log_loss(y, np.clip(p, PROB_EPS, 1 - PROB_EPS)), rel=1e-12)
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
    assert set(d) >= {"n", "auc", "loss", "accuracy", "best_threshold", "best_accuracy",
                      "confusion", "best_confusion"}
    d["confusion"][0][0] = -1  # a copy: the frozen report is unchanged
    assert r.confusion[0][0] >= 0
    with pytest.raises(AttributeError):
        r.auc = 1.0  # type: ignore[misc]
    text = r.format()
    assert f"{r.auc:.4f}" in text and f"{r.loss:.4f}" in text and "TN" in text and "Youden" in text
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
    before = png.read_bytes()
    with pytest.raises(ExistsError, match="roc.png: already exists"):
        evaluate_arrays(p[::-1].copy(), y, png)  # kept unless forced
    assert png.read_bytes() == before
    evaluate_arrays(p[::-1].copy(), y, png, force=True)
    assert png.read_bytes() != before


def test_submission_with_roc(tmp_path: Path):
    lab = write_csv(tmp_path / "labels.csv", ["a", "b", "c", "d"], [0, 1, 0, 1])
    sub = write_csv(tmp_path / "sub.csv", ["a", "b", "c", "d"], [0.1, 0.9, 0.6, 0.4])
    r = evaluate_submission(sub, lab, roc_png=tmp_path / "roc.png")
    assert isinstance(r, EvalReport) and r.auc == 0.75
    assert (tmp_path / "roc.png").stat().st_size > 1000
    assert "roc.png" in r.format()


def test_submission_keeps_an_existing_roc_unless_forced(tmp_path: Path):
    lab = write_csv(tmp_path / "labels.csv", ["a", "b", "c", "d"], [0, 1, 0, 1])
    sub = write_csv(tmp_path / "sub.csv", ["a", "b", "c", "d"], [0.1, 0.9, 0.6, 0.4])
    roc = tmp_path / "roc.png"
    roc.write_bytes(b"the user's own figure")
    with pytest.raises(ExistsError, match="roc.png: already exists .*--force"):
        evaluate_submission(sub, lab, roc_png=roc)
    with pytest.raises(ExistsError):  # refused before the CSVs are even read
        evaluate_submission(tmp_path / "missing.csv", lab, roc_png=roc)
    assert roc.read_bytes() == b"the user's own figure"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["labels.csv", "roc.png", "sub.csv"]
    r = evaluate_submission(sub, lab, roc_png=roc, force=True)
    assert r.roc_png == str(roc) and roc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
