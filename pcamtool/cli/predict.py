"""Commands that use a trained model (export, infer, merge, evaluate) and ``doctor``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import cli
from .options import force_option, handle_errors, progress_enabled, skip_bad_option
from ..constants import AVERAGES, DEFAULT_TTA, PROVIDERS, TTA_CHOICES
from ..errors import PcamError


def _parse_shard(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    from ..submission import parse_shard

    try:
        return parse_shard(value)
    except PcamError as exc:
        raise click.BadParameter(str(exc)) from None



provider_option = click.option(
    "--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True,
    help="onnxruntime provider (auto: TensorRT, CUDA, then CPU: the best that loads here).")


@cli.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="ONNX file to write (default: model.onnx, with --int8 model-int8.onnx, in the run folder).")
@click.option("--fp16", is_flag=True, help="Half-precision weights (for GPUs; looser parity bound 2e-2).")
@click.option("--int8", is_flag=True,
              help="Static int8 quantization for CPUs, calibrated on the training store and refused unless "
                   "its validation AUC is within 0.002 of fp32's.")
@click.option("--calibration-images", type=click.IntRange(64), default=2048, show_default=True,
              help="Training images that calibrate --int8.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--tta", "tta_default", type=click.Choice([str(k) for k in TTA_CHOICES]), default=None,
              help=f"TTA that 'infer' applies to this model when given no --tta (default {DEFAULT_TTA}).")
@click.option("--store", "store_path", type=click.Path(path_type=Path), default=None,
              help="Store whose images check (and calibrate --int8) the export "
                   "(default: the one the model was trained on).")
@provider_option
@force_option
@handle_errors
def export(source: Path | None, out: Path | None, fp16: bool, int8: bool, calibration_images: int, opset: int,
           tta_default: str | None, store_path: Path | None, provider: str, force: bool) -> None:
    """Export a run (default: the latest run's best.pt) to ONNX, checked against PyTorch.

    The parity check runs on --provider: the one 'infer' will use (the CPU for --int8).
    """
    from ..export import export_onnx

    # export_onnx logs its one line ("exported CKPT -> OUT (max |onnx - torch| ...)").
    export_onnx(source, out, fp16=fp16, opset=opset, store_path=store_path, force=force,
                provider=provider, int8=int8, calibration_images=calibration_images,
                tta_default=int(tta_default) if tta_default else None)


@cli.command()
@click.argument("src", required=False, type=click.Path(path_type=Path))
@click.option("-m", "--model", "models", multiple=True, type=click.Path(path_type=Path),
              help="ONNX model(s), or a 'pcamtool cv' folder (all its folds); several are averaged "
                   "(default: the latest run's model.onnx).")
@click.option("--average", type=click.Choice(AVERAGES), default="mean", show_default=True,
              help="How an ensemble is combined: mean probability, or mean normalized rank (not with --shard).")
@click.option("--tta", type=click.Choice([str(k) for k in TTA_CHOICES]), default=None,
              help=f"Dihedral test-time augmentations averaged per image (default: the model's tta_default, "
                   f"{DEFAULT_TTA} unless 'export --tta' set another).")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="Images per onnxruntime call (on the CPU each TTA copy is one more call).")
@provider_option
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Write the CSV here (atomically) instead of stdout.")
@click.option("--shard", callback=_parse_shard, default=None, metavar="I/N",
              help="Only the I-th (0-based) of N disjoint slices; join them with 'pcamtool merge' "
                   "(name them like sub.IofN.csv so merge can check none is missing).")
@click.option("--sample", type=click.Path(path_type=Path), default=None,
              help="sample_submission.csv giving row order (default: the one beside SRC, if any).")
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Decoding threads.")
@skip_bad_option
@force_option
@handle_errors
def infer(src: Path | None, models: tuple[Path, ...], average: str, tta: str | None, batch_size: int,
          provider: str, out: Path | None, shard, sample: Path | None, workers: int | None, skip_bad: bool,
          force: bool) -> None:
    """Predict tumour probabilities: writes a Kaggle submission (id,label) to stdout.

    SRC is a folder of .tif patches or a store made by 'pcamtool pack'
    (default: data/test if it exists, else data/test.h5; the one read is logged).
    """
    from ..infer import write_submission

    write_submission(src, list(models) or None, out, sample, tta=int(tta) if tta else None,
                     batch_size=batch_size, provider=provider, shard=shard, skip_bad=skip_bad,
                     workers=workers, force=force, progress=progress_enabled(), average=average)


@cli.command()
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--sample", type=click.Path(path_type=Path), default=None,
              help="sample_submission.csv: every id must be present, in its order.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Write here (atomically) instead of stdout.")
@force_option
@handle_errors
def merge(shards: tuple[Path, ...], sample: Path | None, out: Path | None, force: bool) -> None:
    """Join shard CSVs from 'infer --shard' into one submission, checking ids."""
    from ..io.csvio import format_rows
    from ..submission import merge_shards

    ids, probs = merge_shards(list(shards), out, sample_csv=sample, force=force)
    if out is None:
        sys.stdout.write(format_rows(ids, probs))


@cli.command()
@click.argument("submission", type=click.Path(path_type=Path))
@click.option("--labels", required=True, type=click.Path(path_type=Path),
              help="Answer key: id,label CSV, or a labelled store (e.g. a packed PCam test split).")
@click.option("--roc", type=click.Path(path_type=Path), default=Path("roc.png"), show_default=True,
              help="Where to draw the ROC curve.")
@click.option("--reliability", type=click.Path(path_type=Path), default=None,
              help="Where to draw the reliability diagram (calibration)  [default: reliability.png beside --roc].")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
@force_option
@handle_errors
def evaluate(submission: Path, labels: Path, roc: Path, reliability: Path | None, as_json: bool, force: bool) -> None:
    """Score a submission against labels: ROC AUC, accuracy, calibration (ECE, Brier), roc.png, reliability.png."""
    from ..evaluate import evaluate_submission

    report = evaluate_submission(submission, labels, roc_png=roc, force=force,
                                 reliability_png=reliability or roc.with_name("reliability.png"))
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
@handle_errors
def doctor(as_json: bool) -> None:
    """What this machine is and what pcamtool will do on it (GPUs, precision, providers)."""
    from ..doctor import diagnose, format_report

    report = diagnose()
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
