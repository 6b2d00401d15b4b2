"""calibration: ECE, MCE and Brier against hand-made fixtures and a plain loop; the reliability diagram; evaluate's hook."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import brier_score_loss

from pcamtool.calibration import Calibration, brier_score, calibration, plot_reliability
from pcamtool.errors import ExistsError, PcamError
from pcamtool.evaluate import evaluate_arrays


def calibrated_exactly(per_bin: int = 100, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """In bin b every row says p = (b + 0.5) / bins, and exactly that share of its rows is positive."""
    p, y = [], []
    for b in range(bins):
        c = (b + 0.5) / bins
        pos = round(per_bin * c)
        p += [c] * per_bin
        y += [1] * pos + [0] * (per_bin - pos)
    return np.array(p), np.array(y)


def loop_ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """The textbook definition, one bin at a time (test oracle)."""
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = (p >= lo) & ((p < hi) if b < bins - 1 else (p <= hi))
        if sel.any():
            total += sel.sum() / len(p) * abs(y[sel].mean() - p[sel].mean())
    return total


def test_perfectly_calibrated_fixture_has_zero_ece():
    p, y = calibrated_exactly()
    cal = calibration(p, y)
    assert cal.ece == pytest.approx(0.0, abs=1e-12) and cal.mce == pytest.approx(0.0, abs=1e-12)
    assert cal.count == [100] * 10 and sum(cal.count) == cal.n == 1000
    # sampled from its own probabilities, a model is calibrated up to sampling noise
    rng = np.random.default_rng(0)
    q = rng.random(200_000)
    cal = calibration(q, rng.random(200_000) < q)
    assert cal.ece < 0.005
    assert cal.brier == pytest.approx(1 / 6, abs=0.003)   # E[q(1-q)] for q ~ U(0, 1)


def test_overconfident_model_is_measured_as_such():
    y = np.array([1, 0] * 50)
    cal = calibration(np.full(100, 0.9), y)
    assert cal.ece == pytest.approx(0.4) and cal.mce == pytest.approx(0.4)
    assert cal.brier == pytest.approx(0.5 * 0.01 + 0.5 * 0.81)
    assert cal.count[9] == 100 and sum(cal.count) == 100
    assert np.isnan(cal.mean_prob[0]) and cal.to_dict()["mean_prob"][0] is None   # empty bins, JSON-safe


def test_ece_and_brier_match_a_plain_loop_and_sklearn():
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.random(5000), [0.0, 1.0, 0.1, 0.9, 0.5]])   # the edges fall in the right bins
    y = (rng.random(len(p)) < p ** 2).astype(int)
    for bins in (5, 10, 15):
        assert calibration(p, y, n_bins=bins).ece == pytest.approx(loop_ece(p, y, bins), abs=1e-12)
    assert brier_score(p, y) == pytest.approx(brier_score_loss(y, p), abs=1e-12)


def test_bad_input_is_one_line():
    with pytest.raises(PcamError, match="no rows"):
        calibration(np.array([]), np.array([]))
    with pytest.raises(PcamError, match="3 probabilities but 2 labels"):
        calibration(np.array([0.1, 0.2, 0.3]), np.array([0, 1]))
    with pytest.raises(PcamError, match=r"\[0, 1\]"):
        calibration(np.array([0.1, 1.2]), np.array([0, 1]))


def test_reliability_diagram_is_a_png_and_kept_unless_forced(tmp_path: Path):
    p, y = calibrated_exactly()
    out = plot_reliability(calibration(p, y), tmp_path / "rel.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (500, 600)
    before = out.read_bytes()
    with pytest.raises(ExistsError):
        plot_reliability(calibration(np.full(100, 0.9), np.array([1, 0] * 50)), out)
    assert out.read_bytes() == before
    plot_reliability(calibration(np.full(100, 0.9), np.array([1, 0] * 50)), out, force=True)
    assert out.read_bytes() != before


def test_evaluate_reports_calibration_and_says_youden(tmp_path: Path):
    rng = np.random.default_rng(1)
    q = rng.random(2000)
    y = (rng.random(2000) < q).astype(int)
    r = evaluate_arrays(q, y, reliability_png=tmp_path / "reliability.png")
    cal = calibration(q, y)
    assert isinstance(cal, Calibration)
    assert r.ece == pytest.approx(cal.ece) and r.brier == pytest.approx(cal.brier)
    assert (tmp_path / "reliability.png").is_file() and r.reliability_png == str(tmp_path / "reliability.png")
    text = r.format()
    assert f"ECE {cal.ece:.4f}" in text and f"Brier {cal.brier:.4f}" in text
    assert "Youden threshold" in text and "best" not in text
    d = json.loads(json.dumps(r.to_dict()))
    assert d["ece"] == pytest.approx(cal.ece) and d["brier"] == pytest.approx(cal.brier)


def test_evaluate_cli_prints_and_writes_calibration(tmp_path: Path):
    from pcamtool.cli import cli

    rng = np.random.default_rng(2)
    ids = [f"id{i}" for i in range(300)]
    q = rng.random(300)
    y = (rng.random(300) < q).astype(int)
    (tmp_path / "sub.csv").write_text("id,label\n" + "".join(f"{i},{v}\n" for i, v in zip(ids, q)))
    (tmp_path / "lab.csv").write_text("id,label\n" + "".join(f"{i},{v}\n" for i, v in zip(ids, y)))
    runner = CliRunner()
    args = ["evaluate", str(tmp_path / "sub.csv"), "--labels", str(tmp_path / "lab.csv"),
            "--roc", str(tmp_path / "roc.png"), "--reliability", str(tmp_path / "rel.png"), "--json"]
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["ece"] == pytest.approx(calibration(q, y).ece) and d["reliability_png"] == str(tmp_path / "rel.png")
    assert (tmp_path / "rel.png").is_file()
    again = runner.invoke(cli, args[:-1] + ["--roc", str(tmp_path / "roc2.png")])
    assert again.exit_code == 1 and "rel.png: already exists (use --force to overwrite)" in again.output
    assert not (tmp_path / "roc2.png").exists()        # refused before anything was written
    (tmp_path / "figs").mkdir()
    r = runner.invoke(cli, args[:4] + ["--roc", str(tmp_path / "figs" / "roc.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "figs" / "reliability.png").is_file()   # by default beside the ROC curve
