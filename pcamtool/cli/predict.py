"""Commands that use a trained model: export, infer, merge, evaluate."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import cli, log
from .options import force_option, handle_errors, progress_enabled, skip_bad_option
from ..errors import PcamError


def _parse_shard(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    from ..submission import parse_shard

    try:
        return parse_shard(value)
    except PcamError as exc:
        raise click.BadParameter(str(exc)) from None



@cli.command()
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="ONNX file to write (default: model.onnx in the run folder).")
@click.option("--fp16", is_flag=True, help="Half-precision weights (for GPUs; looser parity bound 2e-2).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset.")
@click.option("--store", "store_path", type=click.Path(path_type=Path), default=None,
              help="Store whose images check the export (default: the one the model was trained on).")
@force_option
@handle_errors
def export(source: Path | None, out: Path | None, fp16: bool, opset: int, store_path: Path | None,
           force: bool) -> None:
    """Export a run (default: the latest run's best.pt) to ONNX, checked against PyTorch."""
    from ..export import export_onnx

    res = export_onnx(source, out, fp16=fp16, opset=opset, store_path=store_path, force=force)
    log.info("wrote %s (parity %.1e on %d images)", res.path, res.max_abs_diff, res.checked_images)


@cli.command()
@click.argument("src", required=False, type=click.Path(path_type=Path))
@click.option("-m", "--model", "models", multiple=True, type=click.Path(path_type=Path),
              help="ONNX model(s); several are averaged (default: the latest run's model.onnx).")
@click.option("--tta", type=click.Choice(["1", "2", "4", "8"]), default="8", show_default=True,
              help="Dihedral test-time augmentations averaged per image.")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="Images per onnxruntime call (each TTA copy counts once more).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto",
              show_default=True, help="onnxruntime provider (auto: TensorRT, CUDA, then CPU, as usable).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Write the CSV here (atomically) instead of stdout.")
@click.option("--shard", callback=_parse_shard, default=None, metavar="I/N",
              help="Only the I-th (0-based) of N disjoint slices; join them with 'pcamtool merge'.")
@click.option("--sample", type=click.Path(path_type=Path), default=None,
              help="sample_submission.csv giving row order (default: the one beside SRC, if any).")
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Decoding threads.")
@skip_bad_option
@force_option
@handle_errors
def infer(src: Path | None, models: tuple[Path, ...], tta: str, batch_size: int, provider: str,
          out: Path | None, shard, sample: Path | None, workers: int | None, skip_bad: bool, force: bool) -> None:
    """Predict tumour probabilities: writes a Kaggle submission (id,label) to stdout."""
    from ..io.csvio import format_rows, write_rows
    from ..io.fsutil import check_writable
    from ..infer import default_source, predict, sample_beside
    from ..submission import order_like_sample

    if out is not None:
        check_writable(out, force)
    src = src if src is not None else default_source()
    pred = predict(src, list(models) or None, tta=int(tta), batch_size=batch_size, provider=provider,
                   shard=shard, skip_bad=skip_bad, workers=workers, progress=progress_enabled())
    sample = sample if sample is not None else (None if shard else sample_beside(src))
    ids, probs = order_like_sample(pred.ids, pred.probs, sample,
                                   allow_missing={Path(p).stem for p, _ in pred.skipped})
    log.info("%d predictions (tta %s, %s)%s", len(ids), tta, pred.providers[0],
             f", {len(pred.skipped)} skipped" if pred.skipped else "")
    if out is None:
        sys.stdout.write(format_rows(ids, probs))  # whole text at once: no partial CSV on failure
        sys.stdout.flush()
    else:
        write_rows(out, ids, probs, force=force)


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
@click.option("--labels", required=True, type=click.Path(path_type=Path), help="Answer key: id,label CSV.")
@click.option("--roc", type=click.Path(path_type=Path), default=Path("roc.png"), show_default=True,
              help="Where to draw the ROC curve.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
@handle_errors
def evaluate(submission: Path, labels: Path, roc: Path, as_json: bool) -> None:
    """Score a submission against labels: ROC AUC, accuracy, confusion matrix, roc.png."""
    from ..evaluate import evaluate_submission

    report = evaluate_submission(submission, labels, roc_png=roc)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
