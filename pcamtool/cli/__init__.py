"""The ``pcamtool`` command line: thin click commands over the library.

Each command builds keyword arguments, makes one library call, and turns the
library's :class:`PcamError` into one line on stderr and a non-zero exit.
Data goes to stdout; logs and progress bars go to stderr.
"""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .. import __version__
from ..errors import PcamError

log = logging.getLogger("pcamtool")


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def handle_errors(fn: Callable) -> Callable:
    """Map library errors to one clear line and exit status 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PcamError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # disk full, permissions: the user's to fix, not a bug
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None

    return wrapper


def progress_enabled() -> bool:
    ctx = click.get_current_context()
    return not ctx.find_root().params.get("quiet", False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pcamtool")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or info logs on stderr.")
def cli(quiet: bool) -> None:
    """PatchCamelyon / Kaggle histopathologic cancer detection toolkit.

    \b
    pcamtool pack data/train              tifs -> data/train.h5
    pcamtool train                        CNN from data/train.h5 -> runs/<name>/
    pcamtool export                       latest run -> model.onnx
    pcamtool infer --tta 8 > submission.csv
    """
    _setup_logging(quiet)


force_option = click.option("--force", is_flag=True, help="Overwrite an existing output.")
skip_bad_option = click.option("--skip-bad", is_flag=True,
                               help="Skip unreadable images (listed and reported) instead of failing.")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--labels", type=click.Path(path_type=Path), default=None,
              help="id,label CSV (default: <SRC>_labels.csv beside SRC, if present).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Store to write (default: <SRC>.h5 beside SRC).")
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Decoding threads (default: all cores).")
@click.option("--chunk", type=click.IntRange(1, 65536), default=512, show_default=True, help="Images per HDF5 chunk.")
@click.option("--compression", type=click.Choice(["none", "lzf", "gzip"]), default="none", show_default=True,
              help="'none' keeps the store memory-mappable (fastest training).")
@click.option("--stain", type=click.Choice(["none", "reinhard", "macenko"]), default="none", show_default=True,
              help="Stain-normalize every patch toward a reference (recorded in the store and the model).")
@click.option("--stain-reference", type=click.Path(path_type=Path), default=None,
              help="Store to compute the stain reference from (default: a sample of SRC).")
@skip_bad_option
@force_option
@handle_errors
def pack(src: Path, labels: Path | None, out: Path | None, workers: int | None, chunk: int,
         compression: str, stain: str, stain_reference: Path | None, skip_bad: bool, force: bool) -> None:
    """Pack a folder of .tif patches into one chunked HDF5 store."""
    from ..pack import pack as pack_fn

    res = pack_fn(src, labels=labels, out=out, workers=workers, chunk=chunk, compression=compression,
                  skip_bad=skip_bad, force=force, stain=stain, stain_reference=stain_reference,
                  progress=progress_enabled())
    lab = (f"{res.n_positive:,} positive" if res.n_unlabelled < res.count else "unlabelled")
    log.info("wrote %s: %s images (%s), %d skipped, %.1fs, %s img/s", res.path, f"{res.count:,}", lab,
             len(res.skipped), res.seconds, f"{res.images_per_second:,.0f}")


@cli.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
@handle_errors
def info(store: Path, as_json: bool) -> None:
    """Describe a store: counts, balance, statistics, layout, skipped files."""
    from ..info import format_info, store_info

    data = store_info(store)
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))


def _model_args(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in values:
        key, sep, raw = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{v!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


@cli.command()
@click.argument("store", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Run folder (default: runs/<UTC time>-<arch>).")
@click.option("--arch", default=None, help="Model: plain4 (default, a plain 4-block CNN), pcamnet (compact residual CNN, 3.6x faster) or simple (the popular notebook CNN).")
@click.option("--model-arg", "model_kwargs", multiple=True, callback=_model_args, metavar="KEY=VALUE",
              help="Model keyword argument, e.g. width=48 (repeatable).")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Epochs (default: auto, 100,000 images' worth, between 10 and 40).")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Batch size (default 128).")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--weight-decay", type=float, default=None, help="Decoupled weight decay.")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default=None, help="Optimizer (default adamw).")
@click.option("--schedule", type=click.Choice(["onecycle", "cosine"]), default=None,
              help="Warm-up then cosine; onecycle starts and ends above zero.")
@click.option("--warmup", "warmup_frac", type=float, default=None, help="Fraction of steps spent warming up.")
@click.option("--label-smoothing", type=float, default=None, help="Label smoothing (0 = off).")
@click.option("--ema", type=float, default=None, help="EMA decay of the weights per step (0 = off).")
@click.option("--device", default=None, help="auto (CUDA if present), cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=None, help="Random seed (same seed on CPU, same metrics).")
@click.option("--cache", type=click.Choice(["auto", "gpu", "ram", "mmap"]), default=None,
              help="Where batches come from (auto: GPU if it fits, else RAM, else the memory map).")
@click.option("--val-frac", type=float, default=None, help="Stratified validation fraction (default 0.2).")
@click.option("--folds", type=click.IntRange(2), default=None, help="K-fold cross-validation: number of folds.")
@click.option("--fold", type=click.IntRange(0), default=None, help="Which fold (0-based) validates.")
@click.option("--val-store", type=click.Path(path_type=Path), default=None, help="Validate on this store instead.")
@click.option("--groups", type=click.Path(path_type=Path), default=None,
              help="id,group CSV (e.g. slide): split by group so slides do not leak.")
@click.option("--patience", type=click.IntRange(0), default=None, help="Early stop after N epochs without AUC gain.")
@click.option("--flip/--no-flip", default=None, help="Random flips and 90-degree rotations.")
@click.option("--color/--no-color", default=None, help="Brightness/contrast/saturation/hue jitter.")
@click.option("--color-strength", type=float, default=None, help="Scales all four colour jitters (1 = default).")
@click.option("--hed/--no-hed", default=None, help="HED stain augmentation (Tellez et al. 2019).")
@click.option("--hed-sigma", type=float, default=None, help="HED concentration scale jitter.")
@click.option("--shift/--no-shift", default=None, help="Random shift of a few pixels.")
@click.option("--shift-px", type=click.IntRange(0, 16), default=None, help="Largest shift in pixels.")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the model.")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads for torch.")
@click.option("--init-weights", type=click.Path(path_type=Path), default=None,
              help="Start from local weights (a checkpoint or state dict; nothing is downloaded).")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue a killed run from its last.pt.")
@click.option("--export", "export_", is_flag=True, default=None, help="Export best.pt to model.onnx at the end.")
@click.option("--max-train", type=click.IntRange(1), default=None, help="Train on at most N images (quick runs).")
@handle_errors
def train(store: Path | None, resume: Path | None, **opts: Any) -> None:
    """Train a CNN on a store (default data/train.h5); writes a run folder."""
    import dataclasses

    from ..augment import AugmentConfig
    from ..config import TrainConfig
    from ..train.loop import fit

    kw = {k: v for k, v in opts.items() if v is not None and v != {}}
    kw["compile"] = kw.pop("compile_", False)
    kw["export"] = kw.pop("export_", False)
    aug_names = {f.name for f in dataclasses.fields(AugmentConfig)}
    aug = {k: kw.pop(k) for k in list(kw) if k in aug_names}
    strength = kw.pop("color_strength", None)
    if strength is not None:
        base = AugmentConfig()
        aug.update({k: getattr(base, k) * strength for k in ("brightness", "contrast", "saturation", "hue")})
    for key in ("out", "val_store", "groups", "init_weights"):
        if key in kw:
            kw[key] = str(kw[key])
    if store is not None:
        kw["store"] = str(store)
    cfg = TrainConfig(**{**kw, "augment": AugmentConfig(**aug)})
    res = fit(cfg, resume=resume, progress=progress_enabled())
    log.info("best val AUC %.4f at epoch %d; run folder %s (%.0fs)", res.best_auc, res.best_epoch,
             res.run_dir, res.seconds)


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


def _parse_shard(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    from ..submission import parse_shard

    try:
        return parse_shard(value)
    except PcamError as exc:
        raise click.BadParameter(str(exc)) from None


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


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--train", "n_train", type=click.IntRange(0), default=2000, show_default=True, help="Train patches.")
@click.option("--test", "n_test", type=click.IntRange(0), default=500, show_default=True, help="Test patches.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same output).")
@force_option
@handle_errors
def synth(out: Path, n_train: int, n_test: int, seed: int, force: bool) -> None:
    """Generate realistic synthetic H&E patches in the Kaggle layout."""
    from ..synth import generate

    res = generate(out, n_train=n_train, n_test=n_test, seed=seed, force=force, progress=progress_enabled())
    log.info("wrote %s", res)


@cli.command()
@click.argument("folder", required=False, default="demo", type=click.Path(path_type=Path))
@click.option("--train", "n_train", type=click.IntRange(100), default=10000, show_default=True,
              help="Synthetic train patches.")
@click.option("--test", "n_test", type=click.IntRange(10), default=2000, show_default=True,
              help="Synthetic test patches (another staining centre).")
@click.option("--epochs", type=click.IntRange(1), default=4, show_default=True,
              help="Training epochs (a short run: the demo should finish in minutes on a laptop).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same output).")
@force_option
@handle_errors
def demo(folder: Path, n_train: int, n_test: int, epochs: int | None, seed: int, force: bool) -> None:
    """The whole job on synthetic data: generate, pack, train, export, infer, evaluate."""
    from dataclasses import replace

    from ..config import TrainConfig
    from ..demo import run_demo

    cfg = replace(TrainConfig(), epochs=epochs)
    res = run_demo(folder, n_train=n_train, n_test=n_test, seed=seed, train=cfg, force=force,
                   progress=progress_enabled())
    click.echo(f"validation AUC {res.val_auc:.4f}  |  test AUC (shifted stain, TTA x8) {res.test_auc:.4f}  "
               f"|  {res.seconds:.0f}s  |  submission {res.submission}")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=Path("eda"), show_default=True,
              help="Folder for the figures.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Look at a random N patches only.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed for samples.")
@handle_errors
def eda(src: Path, out: Path, limit: int | None, seed: int) -> None:
    """Figures of a store or tif folder: balance, samples, histograms, outliers."""
    from ..eda import load_for_eda, run_eda

    images, labels, ids = load_for_eda(src, limit, seed)
    rep = run_eda(images, labels, ids, out, seed=seed, title=src.name)
    for p in rep.figures:
        click.echo(str(p))
    log.info("%s; %d near-white and %d near-black outliers (listed in %s)",
             ", ".join(f"{k}: {v:,}" for k, v in rep.class_counts.items()), len(rep.outliers_white),
             len(rep.outliers_black), out / "outliers.csv")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="pcamtool")


if __name__ == "__main__":
    main()
