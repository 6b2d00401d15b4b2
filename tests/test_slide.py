"""Whole slides (``pcamtool slide``) on synthetic pyramidal TIFFs painted by ``pcamtool.synth.slide``."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

openslide = pytest.importorskip("openslide", reason="the slides extra (openslide-python, openslide-bin)")

from pcamtool.cli import cli  # noqa: E402
from pcamtool.errors import ExistsError, PcamError  # noqa: E402
from pcamtool.slide import reader as rd  # noqa: E402
from pcamtool.slide.heatmap import map_extent  # noqa: E402
from pcamtool.slide.reader import MODEL_MPP, choose_level, open_slide, read_tiles, slide_geometry  # noqa: E402
from pcamtool.slide.run import COLUMNS, SlideOptions, list_slides, process_slide, run_slides, shard_of  # noqa: E402
from pcamtool.slide.tiles import tile_grid  # noqa: E402
from pcamtool.slide.tissue import find_tissue, otsu  # noqa: E402
from pcamtool.synth.slide import (GLASS, TUMOUR, cell_map, label_at, paint_cells, read_answer_key,  # noqa: E402
                                  write_pyramid, write_slide)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A small trained model (its quality does not matter here: only the plumbing is tested)."""
    from pcamtool.export import export_onnx
    from pcamtool.train.loop import fit
    from test_train import learnable_store, tiny

    root = tmp_path_factory.mktemp("slidemodel")
    store = learnable_store(root, n=32)
    res = fit(tiny(store, root / "run", epochs=1), progress=False)
    return export_onnx(res.run_dir).path


@pytest.fixture(scope="module")
def small_slides(tmp_path_factory) -> Path:
    """Five small 10x slides (deflate) in a folder."""
    root = tmp_path_factory.mktemp("cohort")
    for i in range(5):
        write_slide(root / f"s{i}.tif", cells=(10, 8), mpp=MODEL_MPP, seed=i, compression="deflate")
    return root


def mosaic(cells: np.ndarray, seed: int) -> np.ndarray:
    return np.concatenate(list(paint_cells(cells, seed)), 0)


# ------------------------------------------------------------- the synthetic slide

def test_synthetic_slide_is_a_pyramid_with_mpp_and_mask(tmp_path):
    s = write_slide(tmp_path / "a.tif", cells=(8, 6), mpp=MODEL_MPP / 4, compression="jpeg")
    with open_slide(s.path) as sl:
        assert sl.detect_format(str(s.path)) == "generic-tiff"
        assert sl.level_count >= 3
        assert [round(d) for d in sl.level_downsamples[:3]] == [1, 2, 4]
        assert float(sl.properties["openslide.mpp-x"]) == pytest.approx(MODEL_MPP / 4)
        assert sl.dimensions == (8 * 384, 6 * 384)
    cells, cell_px = read_answer_key(s.path)
    assert cell_px == pytest.approx(384)
    np.testing.assert_array_equal(cells, cell_map(8, 6))
    assert (cells == TUMOUR).any() and (cells == GLASS).any()
    with pytest.raises(ExistsError):
        write_slide(tmp_path / "a.tif", cells=(8, 6))


# ------------------------------------------------------------- level choice and resampling

def test_choose_level_prefers_the_coarsest_level_not_coarser_than_10x():
    forty = [0.243 * 2 ** k for k in range(6)]
    assert choose_level(forty) == 2                    # 0.972: exactly 10x
    assert choose_level([0.486 * 2 ** k for k in range(5)]) == 1
    assert choose_level([0.972 * 2 ** k for k in range(4)]) == 0
    assert choose_level([0.25 * 4 ** k for k in range(3)]) == 1   # Aperio 40x: 1.0 um, 3 % coarser, beats 0.25
    assert choose_level([0.23 * 4 ** k for k in range(3)]) == 1   # 0.92: shrink it 5 %
    assert choose_level([0.3 * 4 ** k for k in range(3)]) == 0    # 1.2 would be enlarged 23 %: shrink 0.3 instead
    assert choose_level([4.0, 8.0]) == 0                 # nothing finer than 10x: enlarge the finest


@pytest.mark.parametrize("mpp,level", [(MODEL_MPP / 4, 2), (MODEL_MPP / 2, 1), (MODEL_MPP, 0)])
def test_40x_20x_10x_slides_read_the_painted_10x_pixels_exactly(tmp_path, mpp, level):
    cells = cell_map(6, 5)
    s = write_slide(tmp_path / "a.tif", cells=(6, 5), mpp=mpp, compression="deflate", min_level_px=128)
    painted = mosaic(cells, 0)
    with open_slide(s.path) as sl:
        geo = slide_geometry(sl, s.path)
        assert (geo.level, geo.resample) == (level, False)
        xy = [(96, 0), (0, 96), (2 * 96, 3 * 96), (50, 70)]
        got = read_tiles(sl, geo, xy)
    for (x, y), tile in zip(xy, got):
        np.testing.assert_array_equal(tile, painted[y:y + 96, x:x + 96])


def test_a_level_off_the_model_scale_is_resampled_to_it(tmp_path):
    # A 20x scanner at 0.45 um: its level 1 (0.9 um) is 8 % finer than the model's, so it is shrunk.
    cells = cell_map(6, 5)
    s = write_slide(tmp_path / "a.tif", cells=(6, 5), mpp=0.45, compression="deflate", min_level_px=128)
    painted = mosaic(cells, 0).astype(np.float32)
    with open_slide(s.path) as sl:
        geo = slide_geometry(sl, s.path)
        assert geo.level == 1 and geo.resample and geo.scale == pytest.approx(MODEL_MPP / 0.9, rel=1e-3)
        tile = read_tiles(sl, geo, [(192, 192)])[0].astype(np.float32)
        as_is = read_tiles(sl, dataclasses.replace(geo, resample=False, scale=1.0), [(192, 192)])[0]
    right = np.abs(tile - painted[192:288, 192:288]).mean()
    shifted = np.abs(tile - painted[192:288, 194:290]).mean()   # 2 px off
    # Resampled twice (painted -> 0.45 um -> 0.9 um -> 0.972 um) blurs the texture a little, but it lands
    # where the painted tile is; reading level 1 without resampling drifts 8 % across the tile.
    assert right < 0.6 * shifted and right < 0.4 * np.abs(as_is - painted[192:288, 192:288]).mean()


def test_mpp_missing_and_override(tmp_path):
    s = write_slide(tmp_path / "nompp.tif", cells=(4, 4), mpp=None, compression="deflate")
    with open_slide(s.path) as sl:
        with pytest.raises(PcamError, match=r"nompp\.tif: the slide does not record its microns per pixel; give --mpp"):
            slide_geometry(sl, s.path)
        geo = slide_geometry(sl, s.path, mpp=MODEL_MPP)
        assert geo.level == 0 and not geo.resample


# ------------------------------------------------------------- tissue and tiles

def test_otsu_splits_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 2000)]).clip(0, 1)
    t = otsu(values)
    assert (values[:5000] < t).mean() > 0.999 and (values[5000:] > t).mean() > 0.999
    overlapping = np.concatenate([rng.normal(0.3, 0.1, 5000), rng.normal(0.6, 0.1, 5000)]).clip(0, 1)
    assert otsu(overlapping) == pytest.approx(0.45, abs=0.03)   # equal classes, equal spread: the midpoint


def test_tissue_mask_and_tiles_match_the_painted_cells(tmp_path):
    s = write_slide(tmp_path / "a.tif", cells=(20, 14), mpp=MODEL_MPP / 2, compression="jpeg")
    cells, cell_px = read_answer_key(s.path)
    with open_slide(s.path) as sl:
        geo = slide_geometry(sl, s.path)
        tissue = find_tissue(sl, geo)
    # The mask against the painted tissue, at the thumbnail's pixels.
    h, w = tissue.mask.shape
    ys, xs = np.mgrid[0:h, 0:w]
    truth = label_at(cells, cell_px, (xs + 0.5) * tissue.px_x, (ys + 0.5) * tissue.px_y) != GLASS
    iou = (truth & tissue.mask).sum() / (truth | tissue.mask).sum()
    assert iou > 0.85, iou
    grid = tile_grid(tissue, geo, stride=96)
    centres = grid.level0(geo) + 48 * geo.f0
    labels = label_at(cells, cell_px, centres[:, 0], centres[:, 1])
    assert (labels != GLASS).mean() > 0.97                       # tiles lie on tissue
    assert len(grid) >= 0.93 * (cells != GLASS).sum()            # and cover it
    assert len(grid) <= (cells != GLASS).sum() + cells.shape[0] + cells.shape[1]
    fine = tile_grid(tissue, geo, stride=32)
    assert 7 * len(grid) < len(fine) < 10 * len(grid)            # ~9x the tiles at a third of the stride


def test_bare_glass_has_no_tissue(tmp_path):
    s = write_slide(tmp_path / "glass.tif", cells=(6, 6), mpp=MODEL_MPP, tissue=(), tumours=(), compression="deflate")
    with open_slide(s.path) as sl:
        geo = slide_geometry(sl, s.path)
        tissue = find_tissue(sl, geo)
    assert not tissue.mask.any()
    assert len(tile_grid(tissue, geo)) == 0


# ------------------------------------------------------------- heatmap orientation

class RedModel:
    """A stand-in model: the probability is how red the tile is (tumour painted red below)."""

    batch_size = 64
    tta = 1
    provider = "stand-in"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        f = images.astype(np.float64)
        return np.clip((f[..., 0] - f[..., 2]).mean((1, 2)) / 100, 0, 1)


@pytest.mark.parametrize("stride", [96, 32])
def test_heatmap_orientation_red_top_left_shows_top_left(tmp_path, stride):
    import tifffile
    from PIL import Image

    from pcamtool.slide.tiles import TileGrid

    h, w, m = 2400, 3200, 100                              # level-0 pixels (20x), a glass margin m
    img = np.full((h, w, 3), 245, np.uint8)
    img[m:h - m, m:w - m] = (120, 60, 170)                 # purple "tissue"
    rx, ry = w // 3, h // 3
    img[m:ry, m:rx] = (200, 60, 80)                        # red top-left: what the stand-in model calls tumour
    write_pyramid(tmp_path / "red.tif", img, MODEL_MPP / 2, "deflate", min_level_px=128)
    s = process_slide(tmp_path / "red.tif", RedModel(), SlideOptions(stride=stride), tmp_path / "out",
                      replace=False, progress=False)
    assert s.tiles > 0 and s.max_probability > 0.9
    folder = tmp_path / "out" / "red"
    pmap = tifffile.imread(folder / "heatmap.tif")
    with open_slide(tmp_path / "red.tif") as sl:
        geo = slide_geometry(sl, tmp_path / "red.tif")
    ox, oy, px = map_extent(TileGrid(np.zeros(0, int), np.zeros(0, int), stride, pmap.shape), geo)
    # Map pixels whose tile lies wholly inside / outside the red rectangle (level-0 pixels).
    rows, cols = np.mgrid[0:pmap.shape[0], 0:pmap.shape[1]]
    tx, ty, t = cols * stride * geo.f0, rows * stride * geo.f0, 96 * geo.f0
    inside = (tx >= m) & (ty >= m) & (tx + t <= rx) & (ty + t <= ry)
    outside = (tx >= rx) | (ty >= ry)
    ok = np.isfinite(pmap)
    assert (inside & ok).sum() >= 2 and (outside & ok).sum() >= 10
    assert pmap[inside & ok].min() > 0.9 and pmap[outside & ok].max() < 0.2
    assert (ox, oy, px) == pytest.approx(((96 - stride) / 2 * geo.f0,) * 2 + (stride * geo.f0,))
    # tiles.csv: level-0 corners, the red ones top-left.
    tiles = read_csv(folder / "tiles.csv")
    high = np.array([(int(r["x"]), int(r["y"])) for r in tiles if float(r["probability"]) > 0.9])
    assert len(high) and (high + t / 2 < (rx, ry)).all()        # their centres on the red
    # The PNG: inferno's light yellow (high) sits top-left of the drawn slide (the colour bar, right, left out).
    png = np.asarray(Image.open(folder / "heatmap.png").convert("RGB"), np.int32)
    drawn = png[:, : int(png.shape[1] * 0.75)]
    yellow = (drawn[..., 0] > 200) & (drawn[..., 1] > 140) & (drawn[..., 2] < 160)
    ys, xs = np.nonzero(yellow)
    assert len(ys) > 200
    assert xs.mean() < 0.5 * drawn.shape[1] and ys.mean() < 0.5 * drawn.shape[0]


# ------------------------------------------------------------- the cohort

def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_cohort_outputs_rerun_skips_and_other_settings_refused(small_slides, tiny_model, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["-q", "slide", str(small_slides), "-m", str(tiny_model), "-o", str(out)])
    assert r.exit_code == 0, r.output
    rows = read_csv(out / "slides.csv")
    assert [row["slide"] for row in rows] == [f"s{i}.tif" for i in range(5)]
    assert list(rows[0]) == list(COLUMNS)
    for i, row in enumerate(rows):
        folder = out / f"s{i}"
        assert sorted(p.name for p in folder.iterdir()) == ["heatmap.png", "heatmap.tif", "slide.json", "tiles.csv"]
        probs = [float(t["probability"]) for t in read_csv(folder / "tiles.csv")]
        assert int(row["tiles"]) == len(probs) > 20
        assert float(row["max_probability"]) == pytest.approx(max(probs), abs=1e-5)
        assert float(row["top_k_mean"]) == pytest.approx(np.mean(sorted(probs)[-10:]), abs=1e-5)
        assert float(row["tissue_mm2"]) > 0 and row["problem"] == ""
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/slide.json")}
    r = CliRunner().invoke(cli, ["slide", str(small_slides), "-m", str(tiny_model), "-o", str(out)])
    assert r.exit_code == 0 and "5 already finished" in r.output
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*/slide.json")}
    r = CliRunner().invoke(cli, ["-q", "slide", str(small_slides), "-m", str(tiny_model), "-o", str(out),
                                 "--stride", "48"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == (f"Error: {out}: holds heatmaps made with stride 96 (now 48) "
                                                 "(use --force to overwrite)")
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*/slide.json")}
    r = CliRunner().invoke(cli, ["-q", "slide", str(small_slides / "s1.tif"), "-m", str(tiny_model), "-o",
                                 str(out), "--stride", "48", "--force"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "s1" / "slide.json").read_text())["stride"] == 48


def test_output_folder_of_something_else_needs_force(small_slides, tiny_model, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = CliRunner().invoke(cli, ["-q", "slide", str(small_slides / "s0.tif"), "-m", str(tiny_model), "-o", str(out)])
    assert r.exit_code == 1 and "is not a 'pcamtool slide' output folder" in r.output
    assert (out / "notes.txt").read_text() == "mine" and not (out / "s0").exists()


def test_shards_are_disjoint_and_complete(small_slides, tiny_model, tmp_path):
    slides = list_slides([small_slides])
    parts = [shard_of(slides, (i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(slides) and sum(map(len, parts)) == len(slides)
    out = tmp_path / "out"
    for i in range(3):
        res = run_slides([small_slides], [tiny_model], out, shard=(i, 3), progress=False)
        assert [s.slide for s in res.done] == [p.name for p in parts[i]] and not res.skipped
    rows = read_csv(out / "slides.csv")
    assert sorted(r["slide"] for r in rows) == sorted(p.name for p in slides)


KILLER = """
import os, signal, sys
import pcamtool.slide.heatmap as hm
calls = []
real = hm.write_heatmap_tif
def dies_on_second_slide(*a, **k):
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)   # mid-slide: tiles.csv of slide 2 already written (in its temporary)
    return real(*a, **k)
hm.write_heatmap_tif = dies_on_second_slide
from pcamtool.cli import main
sys.argv = ["pcamtool", "-q", "slide", *sys.argv[1:]]
main()
"""


def test_kill_mid_slide_leaves_nothing_final_and_rerun_finishes(small_slides, tiny_model, tmp_path):
    out = tmp_path / "out"
    cmd = [str(small_slides), "-m", str(tiny_model), "-o", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", KILLER, *cmd], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (out / "s0" / "slide.json").is_file()
    assert not (out / "s1").exists()
    temps = [p for p in out.iterdir() if p.name.startswith(".s1.") and p.name.endswith(".partial")]
    assert len(temps) == 1 and (temps[0] / "tiles.csv").is_file()   # the half-written slide, under a temporary name
    first = (out / "s0" / "slide.json").stat().st_mtime_ns
    r = CliRunner().invoke(cli, ["-q", "slide", *cmd])
    assert r.exit_code == 0, r.output
    assert (out / "s0" / "slide.json").stat().st_mtime_ns == first     # not redone
    assert not temps[0].exists()
    assert len(read_csv(out / "slides.csv")) == 5
    assert all((out / f"s{i}" / "heatmap.png").is_file() for i in range(5))


# ------------------------------------------------------------- bad input

def test_bad_slides_are_one_line(tmp_path, small_slides, tiny_model):
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    nompp = write_slide(tmp_path / "nompp.tif", cells=(6, 6), mpp=None, compression="deflate").path
    run = CliRunner().invoke
    r = run(cli, ["-q", "slide", str(text), "-m", str(tiny_model), "-o", str(tmp_path / "o1")])
    assert r.exit_code == 1 and r.output.strip() == f"Error: {text}: OpenSlide cannot open it (not a slide format it knows)"
    assert not (tmp_path / "o1").exists()
    r = run(cli, ["-q", "slide", str(nompp), "-m", str(tiny_model), "-o", str(tmp_path / "o2")])
    assert r.exit_code == 1
    assert r.output.strip() == f"Error: {nompp}: the slide does not record its microns per pixel; give --mpp"
    r = run(cli, ["-q", "slide", str(nompp), "--mpp", str(MODEL_MPP), "-m", str(tiny_model), "-o", str(tmp_path / "o2")])
    assert r.exit_code == 0, r.output
    r = run(cli, ["-q", "slide", str(tmp_path / "missing.svs"), "-m", str(tiny_model)])
    assert r.exit_code == 1 and "missing.svs: no such slide, folder or list" in r.output
    # --skip-bad: a line with the problem in slides.csv, the others done.
    out = tmp_path / "o3"
    r = run(cli, ["-q", "slide", str(text), str(small_slides / "s0.tif"), "-m", str(tiny_model), "-o", str(out),
                  "--skip-bad"])
    assert r.exit_code == 0, r.output
    rows = {row["slide"]: row for row in read_csv(out / "slides.csv")}
    assert "OpenSlide cannot open it" in rows["notes.svs"]["problem"] and rows["s0.tif"]["problem"] == ""


def test_no_tissue_is_a_line_not_a_failure(tmp_path, small_slides, tiny_model):
    glass = write_slide(tmp_path / "glass.tif", cells=(6, 6), mpp=MODEL_MPP, tissue=(), tumours=(),
                        compression="deflate").path
    res = run_slides([glass, small_slides / "s2.tif"], [tiny_model], tmp_path / "out", progress=False)
    rows = {row["slide"]: row for row in read_csv(tmp_path / "out" / "slides.csv")}
    assert rows["glass.tif"]["problem"] == "no tissue found" and rows["glass.tif"]["tiles"] == "0"
    assert rows["s2.tif"]["problem"] == "" and int(rows["s2.tif"]["tiles"]) > 0
    assert len(res.done) == 2 and (tmp_path / "out" / "glass" / "heatmap.png").is_file()


def test_unreadable_region_is_skipped_counted_and_reported(tmp_path, tiny_model, caplog):
    import tifffile

    s = write_slide(tmp_path / "bad.tif", cells=(8, 8), mpp=MODEL_MPP, compression="jpeg", tile=256,
                    tissue=((0.5, 0.5, 0.6, 0.6),), tumours=())
    with tifffile.TiffFile(s.path) as tf:
        page = tf.pages[0]
        off, count = page.dataoffsets[4], page.databytecounts[4]   # tile (1, 1): pixels 256..511 both ways
    with open(s.path, "r+b") as fh:
        fh.seek(off)
        fh.write(b"\xff" * count)
    with caplog.at_level("WARNING", logger="pcamtool"):
        res = run_slides([s.path], [tiny_model], tmp_path / "out", progress=False)
    summary = res.done[0]
    # The 96-px tiles overlapping the broken 256x256 one start at 192, 288, 384 and 480 on both axes: 4 x 4.
    assert summary.unreadable_tiles == 16 and summary.tiles > 30
    said = [r.getMessage() for r in caplog.records]
    assert any(f"16 of {summary.tiles + 16} tiles unreadable, skipped (Not a JPEG file" in m for m in said), said
    row = read_csv(tmp_path / "out" / "slides.csv")[0]
    assert row["unreadable_tiles"] == "16"
    xy = {(int(t["x"]), int(t["y"])) for t in read_csv(tmp_path / "out" / "bad" / "tiles.csv")}
    assert (288, 288) not in xy and (96, 384) in xy


def test_missing_openslide_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(PcamError, match=r"^reading whole slides needs OpenSlide: pip install 'pcamtool\[slides\]'$"):
        rd.open_slide(tmp_path / "x.svs")


def test_slide_command_has_help():
    r = CliRunner().invoke(cli, ["slide", "--help"])
    assert r.exit_code == 0 and "--shard" in r.output and "pcamtool[slides]" in r.output


# ------------------------------------------------------------- the model finds the painted tumour

@pytest.mark.slow
def test_demo_model_finds_the_painted_tumour(tmp_path):
    """Trained as the demo trains (synthetic patches, pcamnet), int8 export: tile AUC against the mask >= 0.9.

    One slide is one staining style, drawn from the slide's seed; the default
    seed 0 is used. The demo model's AUC on the painted cells themselves varies
    with the style (0.92-0.99 for seeds 0, 1, 2, 4, 5; 0.80 and 0.49 for 7 and
    3), so the slide path is also held to that: it must lose nothing.
    """
    from sklearn.metrics import roc_auc_score

    from pcamtool.slide.demo import tile_auc, train_demo_model
    from pcamtool.slide.predict import SlideModel

    model = train_demo_model(tmp_path / "m", progress=False)
    tumours = ((0.3, 0.3, 0.13), (0.7, 0.65, 0.08))
    s = write_slide(tmp_path / "t.tif", cells=(24, 18), mpp=MODEL_MPP / 4, seed=0, tumours=tumours)
    res = run_slides([s.path], [model], tmp_path / "out", progress=False)
    rows = read_csv(tmp_path / "out" / "t" / "tiles.csv")
    assert sum(1 for r in rows) > 150
    auc = tile_auc(s.path, tmp_path / "out" / "t" / "tiles.csv")
    assert auc is not None and auc >= 0.9
    assert res.done[0].max_probability > 0.9
    cells = cell_map(24, 18, tumours=tumours)   # the same cells fed straight to the model, no slide in between
    painted = mosaic(cells, 0)
    idx = np.argwhere(cells != GLASS)
    tiles = np.stack([painted[r * 96:(r + 1) * 96, c * 96:(c + 1) * 96] for r, c in idx])
    direct = roc_auc_score(cells[idx[:, 0], idx[:, 1]] == TUMOUR, SlideModel([model], tta=1)(tiles))
    assert auc > direct - 0.03, (auc, direct)
