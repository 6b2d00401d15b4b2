"""evaluate: the shared metrics and the report against scikit-learn, thresholds, every bad input, the ROC plot."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, roc_auc_score

from pcamtool import evaluate
from pcamtool.errors import ExistsError, LabelsError, PcamError
from pcamtool.evaluate import PROB_EPS, EvalReport, binary_metrics, evaluate_arrays, evaluate_submission

from helpers import write_store


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


def test_tied_youden_thresholds_resolve_to_the_highest():
    # J = 2/3 at 0.7 (TPR 2/3, FPR 0) and at 0.4 (TPR 1, FPR 1/3): equal, though
    # 1 - 1/3 and 2/3 - 0 differ in the last bit of a float
    r = evaluate_arrays([0.1, 0.6, 0.3, 0.4, 0.7, 0.9], [0, 0, 0, 1, 1, 1])
    assert r.best_threshold == 0.7 and r.youden_j == pytest.approx(2 / 3)
    assert r.best_confusion == [[3, 0], [1, 2]]


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


# --- what the report, the plot and the answer key promise, row by row ---------------------------

def test_binary_metrics_count_a_label_of_one_half_as_positive_and_a_probability_at_the_threshold_as_predicted():
    # labels ">= 0.5 count as 1" (smoothed or float labels from training)
    m = binary_metrics(np.array([0.9, 0.1]), np.array([0.5, 0.0]))
    assert m["acc"] == 1.0 and m["auc"] == 1.0
    assert binary_metrics(np.array([0.5, 0.2]), np.array([1, 0]))["acc"] == 1.0


def test_binary_metrics_give_an_auc_with_a_single_positive_row():
    # a tiny validation split with one tumour patch still has both classes
    assert binary_metrics(np.array([0.2, 0.3, 0.9]), np.array([0, 0, 1]))["auc"] == 1.0
    assert binary_metrics(np.array([0.2, 0.7, 0.9]), np.array([0, 1, 1]))["auc"] == 1.0


def test_binary_metrics_of_float32_probabilities_clip_like_float64():
    # training hands float32: 1 - 1e-7 rounds to 1 - 1.19e-7 in float32, a different loss
    m = binary_metrics(np.array([1.0, 0.0], np.float32), np.array([0, 1]))
    assert m["loss"] == pytest.approx(-np.log(PROB_EPS), rel=1e-9)


def test_binary_metrics_of_one_class_or_no_rows_are_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn warns on one class, numpy on the mean of nothing
        for y in ([0, 0, 0], [1, 1, 1]):
            m = binary_metrics(np.array([0.2, 0.6, 0.9]), np.array(y))
            assert np.isnan(m["auc"]) and np.isfinite(m["loss"]) and np.isfinite(m["acc"])
        empty = binary_metrics(np.array([]), np.array([]))
    assert set(empty) == {"loss", "auc", "acc"} and all(np.isnan(v) for v in empty.values())


def test_report_holds_balanced_accuracy_calibration_and_accuracy_at_the_given_threshold():
    # by hand: at 0.5 the predictions are 0 0 1 0 1 1 against 0 0 0 1 1 1, so
    # TP 2, FP 1, FN 1, TN 2 and TPR = TNR = 2/3; bins [0.1, 0.2) and [0.8, 0.9)
    # each hold half the rows, with gaps |1/3 - 0.15| and |2/3 - 0.85|
    r = evaluate_arrays([0.15, 0.15, 0.85, 0.15, 0.85, 0.85], [0, 0, 0, 1, 1, 1])
    assert r.balanced_accuracy == pytest.approx(2 / 3)
    assert r.ece == pytest.approx(0.5 * (1 / 3 - 0.15) + 0.5 * (0.85 - 2 / 3))
    assert r.brier == pytest.approx((4 * 0.15**2 + 2 * 0.85**2) / 6)
    assert r.reliability_png is None and r.roc_png is None
    # at 0.6 only 0.9 is called positive: all right; at 0.5 two negatives would be wrong
    r = evaluate_arrays([0.55, 0.5, 0.2, 0.9], [0, 0, 0, 1], threshold=0.6)
    assert r.accuracy == 1.0 and r.balanced_accuracy == 1.0 and r.confusion == [[3, 0], [0, 1]]


def test_probabilities_of_exactly_zero_and_one_are_accepted():
    r = evaluate_arrays([0.0, 1.0, 0.0, 1.0], [0, 1, 1, 0])
    assert r.auc == 0.5 and r.n == 4


@pytest.mark.parametrize("probs, labels, pattern", [
    ([0.1, 1.2, 0.3], [0, 1, 1], r"^probabilities: 1 probability is outside \[0, 1\] or not finite: row 1 "
                                 r"\(e\.g\. 1\.2; a submission holds probabilities, not logits\)$"),
    ([0.1, None, 0.3], [0, 1, 1], r"^probabilities: 1 probability is .*not finite: row 1 \(e\.g\. nan"),
    ([0.3], [1], r"^labels: every one of the 1 labels is 1; ROC AUC is undefined with a single class$"),
    ([0.1, 0.2, 0.3], [0, 0, 0], r"^labels: every one of the 3 labels is 0"),
    ([0.1, 0.2, 0.3], [0, 2, 7], r"^labels: 2 label\(s\) are not 0 or 1: row 1, row 2$"),
    ([], [], r"^labels: nothing to score \(no rows\)$"),
    ([0.1, 0.2], [0, 1, 1], r"^2 probabilities \(probabilities\) but 3 labels \(labels\)$"),
])
def test_errors_name_the_default_sources_and_the_rows(probs, labels, pattern):
    with pytest.raises(PcamError, match=pattern):
        evaluate_arrays(probs, labels)


@pytest.mark.parametrize("probs, labels", [
    (np.full((4, 1), 0.5), np.array([0, 1, 0, 1])),
    (np.array([0.1, 0.9, 0.2, 0.8]), np.array([[0, 1], [0, 1]]).T),
])
def test_probabilities_and_labels_must_be_one_dimensional(probs, labels):
    shapes = f"must be 1-D, got shapes {probs.shape} and {labels.shape}"
    with pytest.raises(PcamError, match=re.escape(shapes)):
        evaluate_arrays(probs, labels)


def test_ids_must_match_the_rows():
    with pytest.raises(PcamError, match=r"^2 ids for 3 probabilities$"):
        evaluate_arrays([0.1, 0.5, 0.9], [0, 1, 1], ids=["a", "b"])


def test_report_text_lays_out_every_score():
    r = EvalReport(n=8, n_positive=2, auc=0.75, loss=0.5, accuracy=0.625, threshold=0.5,
                   confusion=[[4, 2], [1, 1]], best_threshold=0.3, best_accuracy=0.75,
                   best_confusion=[[5, 1], [1, 1]], youden_j=1 / 3, roc_png="out/roc.png", ece=0.125,
                   brier=0.1875, reliability_png="out/rel.png", balanced_accuracy=7 / 12)
    assert r.format().split("\n") == [
        "rows        8 (2 positive, 25.0%)",
        "ROC AUC     0.7500",
        "log loss    0.5000",
        "at 0.5      accuracy 0.6250  balanced 0.5833  TN 4  FP 2  FN 1  TP 1",
        "at 0.3000   accuracy 0.7500  TN 5  FP 1  FN 1  TP 1  (Youden threshold: J 0.3333)",
        "calibration ECE 0.1250  Brier 0.1875",
        "ROC curve   out/roc.png",
        "reliability out/rel.png",
    ]
    empty = EvalReport(n=0, n_positive=0, auc=float("nan"), loss=float("nan"), accuracy=float("nan"),
                       threshold=0.5, confusion=[[0, 0], [0, 0]], best_threshold=0.5,
                       best_accuracy=float("nan"), best_confusion=[[0, 0], [0, 0]], youden_j=0.0)
    assert empty.format().splitlines()[0] == "rows        0 (0 positive, 0.0%)"


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """Every matplotlib figure saved during the test, to read what a plot shows."""
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig

    def record(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def test_roc_plot_shows_the_curve_the_chance_line_and_both_operating_points(tmp_path, saved_figures):
    from matplotlib.colors import to_rgb

    # By hand: at 0.5, TP 0.7 0.9, FP 0.6, FN 0.2 -> (FPR, TPR) = (1/3, 2/3), accuracy 4/6;
    # J peaks (2/3) only at 0.7 -> (0, 2/3), accuracy 5/6; 7 of 9 pairs ranked right.
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.6, 0.3, 0.2, 0.7, 0.9])
    png = tmp_path / "roc.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = evaluate_arrays(p, y, png)
    assert (r.best_threshold, r.confusion, r.best_confusion) == (0.7, [[2, 1], [1, 2]], [[3, 0], [1, 2]])
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] == im.size[1]  # ROC space is square
    (fig,) = saved_figures
    (ax,) = fig.axes
    assert ax.get_xlabel() == "false positive rate" and ax.get_ylabel() == "true positive rate"
    assert ax.get_title() == "ROC curve, 6 rows (3 positive)"
    legend = ax.get_legend()
    lines = {t.get_text(): h for t, h in zip(legend.get_texts(), legend.legend_handles)}
    assert list(lines) == ["ROC (AUC = 0.7778)", "chance",
                           "Youden threshold 0.700 (acc 0.833)", "threshold 0.5 (acc 0.667)"]
    drawn = {label: line for label, line in zip(lines, ax.get_lines())}
    curve = np.column_stack(drawn["ROC (AUC = 0.7778)"].get_data())
    corners = [(0, 0), (0, 2 / 3), (2 / 3, 2 / 3), (2 / 3, 1), (1, 1)]
    assert all(np.isclose(curve, c).all(axis=1).any() for c in corners)
    assert np.allclose(curve[[0, -1]], [(0, 0), (1, 1)])
    chance = drawn["chance"]
    assert np.allclose(np.column_stack(chance.get_data()), [(0, 0), (1, 1)])
    assert chance.get_linestyle() == "--"
    rgb = np.array([to_rgb(line.get_color()) for line in drawn.values()])
    assert np.ptp(rgb[1]) == 0  # the chance line is grey
    assert len({tuple(c) for c in rgb}) == 4  # every element has its own colour
    assert np.allclose(np.column_stack(drawn["Youden threshold 0.700 (acc 0.833)"].get_data()), [(0, 2 / 3)])
    assert np.allclose(np.column_stack(drawn["threshold 0.5 (acc 0.667)"].get_data()), [(1 / 3, 2 / 3)])
    assert [drawn[k].get_marker() for k in list(drawn)[2:]] == ["o", "s"]
    assert legend._loc == 4  # lower right: where a useful curve leaves room
    for lo, hi in (ax.get_xlim(), ax.get_ylim()):  # the unit square, with a thin margin
        assert -0.02 <= lo < 0 and 1 < hi <= 1.02
    assert ax.get_aspect() == 1.0
    grid = ax.xaxis.get_gridlines()[0]
    assert grid.get_visible() and grid.get_alpha() < 1  # a faint grid under the curve
    assert ax.get_position().width > 0.8  # laid out tight: the axes fill the figure


def test_plot_roc_keeps_an_existing_file_unless_forced(tmp_path):
    y = np.array([0, 1, 0, 1])
    r = evaluate_arrays([0.2, 0.8, 0.4, 0.6], y)
    png = tmp_path / "roc.png"
    png.write_bytes(b"mine")
    fpr, tpr = np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0])
    with pytest.raises(ExistsError, match="roc.png: already exists"):
        evaluate.plot_roc(fpr, tpr, r, png)
    assert png.read_bytes() == b"mine"
    assert evaluate.plot_roc(fpr, tpr, r, str(png), force=True) == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reliability_diagram_is_drawn_and_replaced_only_when_forced(tmp_path):
    p, y = scores()
    rel = tmp_path / "rel.png"
    r = evaluate_arrays(p, y, reliability_png=rel)
    assert r.reliability_png == str(rel) and rel.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reliability" in r.format()
    with pytest.raises(ExistsError, match="rel.png: already exists"):
        evaluate_arrays(p, y, reliability_png=rel)
    rel.write_bytes(b"mine")
    evaluate_arrays(p, y, reliability_png=rel, force=True)
    assert rel.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_submission_passes_threshold_and_reliability_on(tmp_path: Path):
    lab = write_csv(tmp_path / "labels.csv", ["a", "b", "c", "d"], [0, 1, 0, 1])
    sub = write_csv(tmp_path / "sub.csv", ["a", "b", "c", "d"], [0.1, 0.9, 0.65, 0.6])
    r = evaluate_submission(sub, lab, threshold=0.7, reliability_png=tmp_path / "rel.png")
    assert r.threshold == 0.7 and r.accuracy == 0.75 and r.confusion == [[2, 0], [1, 1]]
    assert r.reliability_png == str(tmp_path / "rel.png") and (tmp_path / "rel.png").stat().st_size > 1000


def test_submission_reports_missing_and_extra_ids_in_one_message(tmp_path: Path):
    lab = write_csv(tmp_path / "labels.csv", ["a", "b", "c"], [0, 1, 1])
    sub = write_csv(tmp_path / "sub.csv", ["a", "b", "z"], [0.1, 0.2, 0.3])
    with pytest.raises(PcamError) as err:
        evaluate_submission(sub, lab)
    assert str(err.value) == (f"1 id(s) of {lab} are missing from {sub}: c; "
                              f"1 id(s) of {sub} are not in {lab}: z")


def test_a_missing_answer_key_is_named(tmp_path: Path):
    sub = write_csv(tmp_path / "sub.csv", ["a", "b"], [0.1, 0.9])
    with pytest.raises(LabelsError, match=r"nope.csv: labels file not found"):
        evaluate_submission(sub, tmp_path / "nope.csv")


def test_answer_key_may_be_a_labelled_store(tmp_path: Path):
    ids = [f"pcam-test-{i}" for i in range(6)]
    key = write_store(tmp_path / "test.h5", [0, 1, 0, 1, 1, 0], ids)
    sub = write_csv(tmp_path / "sub.csv", ids[::-1], [0.1, 0.8, 0.7, 0.3, 0.6, 0.2])  # file order differs
    r = evaluate_submission(sub, key)
    # rows in id order: p = 0.2 0.6 0.3 0.7 0.8 0.1 against 0 1 0 1 1 0: every positive above every negative
    assert r.n == 6 and r.n_positive == 3 and r.auc == 1.0
    assert r.confusion == [[3, 0], [0, 3]]


def test_an_unlabelled_store_is_refused_as_answer_key(tmp_path: Path):
    ids = [f"pcam-test-{i}" for i in range(4)]
    key = write_store(tmp_path / "test.h5", [-1, -1, -1, -1], ids)
    sub = write_csv(tmp_path / "sub.csv", ids, [0.1, 0.8, 0.7, 0.3])
    with pytest.raises(PcamError, match=r"test.h5: store has no labels"):
        evaluate_submission(sub, key)
