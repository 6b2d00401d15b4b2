"""``pcamtool slide``: whole-slide images through the exported model into heatmaps and slide scores."""
from __future__ import annotations

from pathlib import Path

import click

from . import cli
from .options import force_option, handle_errors, progress_enabled, skip_bad_option
from .predict import _parse_shard, provider_option


@cli.command()
@click.argument("slides", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-m", "--model", "models", multiple=True, type=click.Path(path_type=Path),
              help="ONNX model(s), or a 'pcamtool cv' folder (all its folds), averaged as in 'infer' "
                   "(default: the latest run's model.onnx). For CPUs, the --int8 export is the fast one.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=Path("heatmaps"),
              show_default=True, help="Folder of results: OUT/<slide>/ per slide and OUT/slides.csv.")
@click.option("--tta", type=click.Choice(["1", "2", "4", "8"]), default="1", show_default=True,
              help="Dihedral test-time augmentations averaged per tile.")
@click.option("--stride", type=click.IntRange(1, 96), default=96, show_default=True,
              help="Tile step in model pixels (~0.97 um); 32 makes the decisive central 32x32 squares abut.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Microns per pixel of level 0, for slides that do not record it (overrides theirs).")
@click.option("--shard", callback=_parse_shard, default=None, metavar="I/N",
              help="Only the I-th (0-based) of N slices of the sorted cohort (job arrays; same -o for all).")
@click.option("--min-tissue", type=click.FloatRange(0, 1, min_open=True), default=0.25, show_default=True,
              help="Fraction of a tile that must be tissue for it to be run.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Tumour area in slides.csv counts tiles at or above this probability.")
@click.option("--top-k", type=click.IntRange(1), default=10, show_default=True,
              help="slides.csv's top_k_mean averages this many highest tiles.")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="Tiles per onnxruntime call.")
@provider_option
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Tile-reading threads (default: all cores).")
@skip_bad_option
@force_option
@handle_errors
def slide(slides: tuple[Path, ...], models: tuple[Path, ...], out: Path, tta: str, stride: int,
          mpp: float | None, shard, min_tissue: float, threshold: float, top_k: int, batch_size: int,
          provider: str, workers: int | None, skip_bad: bool, force: bool) -> None:
    """Run the model over whole-slide images (folders, files, .txt lists): heatmaps and slide scores.

    \b
    Per slide, OUT/<stem>/: tiles.csv (x, y at level 0, probability),
    heatmap.png (over a thumbnail, with a colour bar), heatmap.tif (the
    probability map), and a row in OUT/slides.csv. Rerunning skips finished
    slides and redoes interrupted ones. Needs: pip install 'pcamtool[slides]'.
    """
    from ..infer import default_models
    from ..slide.run import SlideOptions, run_slides

    opts = SlideOptions(stride=stride, mpp=mpp, min_tissue=min_tissue, threshold=threshold, top_k=top_k,
                        tta=int(tta))
    run_slides(list(slides), list(models) or default_models(), out, opts, shard=shard, provider=provider,
               batch_size=batch_size, workers=workers, skip_bad=skip_bad, force=force,
               progress=progress_enabled())
