"""Whole-slide throughput, in one run on the same slide: int8 vs fp32 graph vs a per-tile PyTorch loop.

* ``run_slides`` end to end (open, thumbnail, tissue, tiles read on worker
  threads, model, tiles.csv + heatmaps written), TTA 1 on the CPU, with the
  int8 and the fp32 graph of the same model: tissue tiles per second;
* the loop the other tools' simplest recipe runs: for each tile
  ``read_region`` then the PyTorch model on that one tile (on a sample of the
  tiles, same slide), tiles per second;
* the ratios, and the minutes a 100,000-tile slide would take at the int8
  rate (the target: under 6 minutes on 2 cores).

The slide is a synthetic 10x JPEG pyramid (``pcamtool.synth.slide``) whose
tissue covers about ``PCAMTOOL_BENCH_SLIDE_TILES`` tiles (default 10,000;
100000 for the full-size claim), built by repeating one painted block so that
painting does not dominate the set-up. The model is the default architecture,
untrained (speed does not depend on the weights).

Run: ``.venv/bin/python -m pytest benchmarks/bench_slide.py -q -s``.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

openslide = pytest.importorskip("openslide", reason="the slides extra (openslide-python, openslide-bin)")

from pcamtool.slide.reader import TILE, open_slide, read_tiles, slide_geometry  # noqa: E402
from pcamtool.slide.run import SlideOptions, run_slides  # noqa: E402
from pcamtool.synth.slide import write_repeated_slide  # noqa: E402

N_TILES = int(os.environ.get("PCAMTOOL_BENCH_SLIDE_TILES", "10000"))
N_TORCH = 100          # tiles of the per-tile PyTorch loop (it is the slow one)
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, untrained_model):
    import tifffile

    from pcamtool import pack
    from pcamtool.io.store import open_store
    from pcamtool.quantize import quantize_graph

    root = tmp_path_factory.mktemp("slide")
    slide = write_repeated_slide(root / "bench.tif", N_TILES)
    net, fp32 = untrained_model
    (root / "calib").mkdir()   # calibration images: tiles of the slide itself
    with open_slide(slide) as sl:
        geo = slide_geometry(sl, slide)
        mid = geo.width // 2 // TILE * TILE
        for i in range(256):
            r, c = divmod(i, 16)
            tile = read_tiles(sl, geo, [(mid + (c - 8) * TILE, mid + (r - 8) * TILE)])[0]
            tifffile.imwrite(root / "calib" / f"{i:040x}.tif", tile, photometric="rgb")
    store = pack(root / "calib", progress=False).path
    int8 = root / "m-int8.onnx"
    quantize_graph(fp32, int8, open_store(store), np.arange(256))
    return root, slide, net, fp32, int8


def _cpu_line() -> str:
    flags = set()
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return f"{os.cpu_count()} cores; CPU flags: {' '.join(have) or 'none of avx2/avx512'}"


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_slide_end_to_end(benchmark, setup, precision):
    root, slide, net, fp32, int8 = setup
    model = int8 if precision == "int8" else fp32
    out = root / f"out-{precision}"

    def run():
        return run_slides([slide], [model], out, SlideOptions(tta=1), provider="cpu", force=True, progress=False)

    res = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    s = res.done[0]
    RESULTS[precision] = s.tiles / s.seconds
    benchmark.extra_info.update(tiles=s.tiles, seconds=s.seconds, tiles_per_s=RESULTS[precision])
    print(f"\n{precision}: {s.tiles} tissue tiles in {s.seconds:.1f} s = {RESULTS[precision]:.0f} tiles/s "
          f"end to end; 100,000 tiles: {100000 / RESULTS[precision] / 60:.1f} min ({_cpu_line()})")


def test_per_tile_torch_loop(benchmark, setup):
    """read_region + PyTorch per tile, as a plain loop does (a sample of the slide's tissue tiles)."""
    from pcamtool.contract import ProbabilityModel
    from pcamtool.slide.tiles import tile_grid
    from pcamtool.slide.tissue import find_tissue

    root, slide, net, fp32, int8 = setup
    prob = ProbabilityModel(net).eval()
    with open_slide(slide) as sl:
        geo = slide_geometry(sl, slide)
        grid = tile_grid(find_tissue(sl, geo), geo)
        xy = grid.xy[np.linspace(0, len(grid) - 1, N_TORCH).astype(int)]

        def run():
            with torch.no_grad():
                for x, y in xy:
                    prob(torch.from_numpy(read_tiles(sl, geo, [(x, y)])))

        benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    RESULTS["torch_per_tile"] = N_TORCH / benchmark.stats.stats.median
    benchmark.extra_info["tiles_per_s"] = RESULTS["torch_per_tile"]
    print(f"\nper-tile PyTorch loop: {RESULTS['torch_per_tile']:.0f} tiles/s")
    if {"int8", "fp32"} <= set(RESULTS):
        print(f"ratios ({_cpu_line()}): int8/fp32 {RESULTS['int8'] / RESULTS['fp32']:.2f}x, "
              f"int8/per-tile torch {RESULTS['int8'] / RESULTS['torch_per_tile']:.1f}x, "
              f"fp32/per-tile torch {RESULTS['fp32'] / RESULTS['torch_per_tile']:.1f}x")
