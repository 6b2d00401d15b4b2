"""``pcamtool interpret``: galleries of a model's surest mistakes and hits, with saliency."""
from __future__ import annotations

from pathlib import Path

import click

from . import cli, log
from .options import force_option, handle_errors
from .predict import provider_option


@cli.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("-n", "--n", "n", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Patches per gallery (each kind).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Folder for the PNGs and gallery.csv (default: interpret/ in the run or cv folder, "
                   "<csv stem>-interpret/ beside a submission).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="With a submission CSV: its images, a tif folder or a store.")
@click.option("--labels", type=click.Path(path_type=Path), default=None,
              help="With a submission CSV: id,label answer key (default: the labels of --images).")
@click.option("-m", "--model", "models", multiple=True, type=click.Path(path_type=Path),
              help="With a submission CSV: the model(s) that made it, for the saliency maps "
                   "(ONNX files or a cv folder: occlusion; a run folder or .pt: Grad-CAM).")
@click.option("--saliency", type=click.Choice(["auto", "gradcam", "occlusion", "none"]), default="auto",
              show_default=True,
              help="Overlay: Grad-CAM (PyTorch checkpoint) or occlusion (ONNX); auto: Grad-CAM for a run, "
                   "occlusion for a cv folder.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Probability from which a patch counts as predicted tumour.")
@provider_option
@force_option
@handle_errors
def interpret(source: Path | None, n: int, out: Path | None, images: Path | None, labels: Path | None,
              models: tuple[Path, ...], saliency: str, threshold: float, provider: str, force: bool) -> None:
    """Galleries of the most confident false positives/negatives and true ones, with saliency.

    SOURCE is a run folder (its validation rows; default: the latest run), a
    'pcamtool cv' folder (its out-of-fold rows) or a submission CSV (with
    --images and labels).
    """
    from ..interpret import interpret as interpret_fn

    res = interpret_fn(source, out, images=images, labels=labels, model=list(models) or None, n=n,
                       saliency=saliency, threshold=threshold, provider=provider, force=force)
    log.info("wrote %s (%s)", res.out_dir,
             ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in res.counts.items()))
