"""eda: figures are written as PNGs, outliers are found, unlabelled data works."""
from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from pcamtool.cli import cli
from pcamtool.eda import find_outliers, run_eda

from helpers import write_kaggle

PNG = b"\x89PNG\r\n\x1a\n"


def tissue(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (n, 96, 96, 3), dtype=np.uint8)
    return base


def test_find_outliers_white_black_not_tissue():
    x = tissue(10)
    x[2] = 243
    x[2, :3, :3] = 150  # a speck on glass is still glass
    x[7] = 5
    white, black = find_outliers(x)
    assert list(np.flatnonzero(white)) == [2] and list(np.flatnonzero(black)) == [7]


def test_run_eda_writes_figures(tmp_path):
    x = tissue(40)
    x[3] = 245
    y = (np.arange(40) % 3 == 0).astype(np.int8)
    ids = [f"{i:040x}" for i in range(40)]
    rep = run_eda(x, y, ids, tmp_path / "eda")
    names = sorted(p.name for p in rep.figures)
    assert names == ["channel_histograms.png", "class_balance.png", "outliers.png", "samples.png"]
    for p in rep.figures:
        data = p.read_bytes()
        assert data[:8] == PNG and len(data) > 5000
    assert rep.outliers_white == [ids[3]]
    assert rep.class_counts == {"normal (0)": 26, "tumour (1)": 14}
    assert ids[3] in (tmp_path / "eda" / "outliers.csv").read_text()


def test_eda_cli_on_unlabelled_folder(tmp_path):
    write_kaggle(tmp_path, n=12, split="test", labels=False)
    r = CliRunner().invoke(cli, ["-q", "eda", str(tmp_path / "test"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "samples.png").read_bytes()[:8] == PNG
    r = CliRunner().invoke(cli, ["-q", "eda", str(tmp_path / "nope")])
    assert r.exit_code == 1


def test_outlier_figure_shows_every_kind_it_counts(tmp_path, monkeypatch):
    """30 glass patches listed before 2 near-black ones: the figure still shows the near-black ones."""
    import pcamtool.eda as eda

    x = tissue(40)
    x[:30] = 245
    x[35:37] = 5
    ids = [f"{i:040x}" for i in range(40)]
    drawn = {}
    real_save = eda._save

    def keep(fig, path, force):
        drawn[path.name] = [ax.get_title() for ax in fig.axes]
        return real_save(fig, path, force)

    monkeypatch.setattr(eda, "_save", keep)
    run_eda(x, None, ids, tmp_path / "eda")
    titles = drawn["outliers.png"]
    assert len(titles) == 24
    assert sum("black" in t for t in titles) == 2 and sum("white" in t for t in titles) == 22
