"""Commands that train: train, cv (every fold of a K-fold split), demo."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import click

from . import cli, log
from ..constants import CACHES
from .options import EPOCHS, SEED, force_option, handle_errors, progress_enabled


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


def _with_run_arch(opts: dict[str, Any], resume: Path | None, cv: bool) -> dict[str, Any]:
    """``opts`` with the continued run's ``--arch`` when none is given.

    The options given on resume are validated as a config before the run is
    read; without its arch they would be checked against the default model
    (``--img-size`` of a timm run refused as "not 'plain4'").

    Raises
    ------
    PcamError
        ``resume`` is not a run (cv: a cv run) folder to continue.
    """
    if resume is None or opts.get("arch") is not None:
        return opts
    if cv:
        from ..errors import PcamError
        from ..train.cv import CV_CONFIG

        try:
            arch = json.loads((Path(resume) / CV_CONFIG).read_text())["config"]["arch"]
        except FileNotFoundError:
            raise PcamError(f"{resume}: not a cv run to resume (no {CV_CONFIG})") from None
        except (OSError, ValueError, KeyError, TypeError):
            return opts   # run_cv names what is wrong with the file
    else:
        from ..train.runs import read_run_config

        arch = read_run_config(Path(resume)).get("arch")
    return {**opts, "arch": arch} if isinstance(arch, str) else opts


def _output_option(what: str) -> Callable:
    return click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None, help=what)


# The options of `pcamtool train`, shared with `pcamtool cv` (each fold is a training run).
_TRAIN_OPTIONS: list[Callable] = [
    click.option("--arch", default=None, help="Model: plain4 (default, a plain 4-block CNN), pcamnet (compact residual CNN, 3.6x faster, lower AUC), simple (the popular notebook CNN) or timm:NAME (any timm network, e.g. timm:resnet34)."),
    click.option("--model-arg", "model_kwargs", multiple=True, callback=_model_args, metavar="KEY=VALUE",
                  help="Model keyword argument, e.g. width=48 (repeatable)."),
    click.option("--epochs", type=EPOCHS, default=None, help="Epochs (default: auto, 100,000 images' worth, between 10 and 40)."),
    click.option("--batch-size", type=click.IntRange(1), default=None, help="Batch size (default 128)."),
    click.option("--lr", type=float, default=None, help="Peak learning rate."),
    click.option("--weight-decay", type=float, default=None, help="Decoupled weight decay."),
    click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default=None, help="Optimizer (default adamw)."),
    click.option("--schedule", type=click.Choice(["onecycle", "cosine"]), default=None,
                  help="Warm-up then cosine; onecycle starts and ends above zero."),
    click.option("--warmup", "warmup_frac", type=float, default=None, help="Fraction of steps spent warming up."),
    click.option("--label-smoothing", type=float, default=None, help="Label smoothing (0 = off)."),
    click.option("--ema", type=float, default=None, help="EMA decay of the weights per step (0 = off)."),
    click.option("--device", default=None, help="auto (CUDA if present), cpu, cuda or cuda:N."),
    click.option("--seed", type=SEED, default=None, help="Random seed (same seed on CPU, same metrics)."),
    click.option("--cache", type=click.Choice(CACHES), default=None,
                  help="Where batches come from (auto: GPU if it fits, else RAM, else the memory map)."),
    click.option("--val-frac", type=float, default=None, help="Stratified validation fraction (default 0.2)."),
    click.option("--folds", type=click.IntRange(2), default=None, help="K-fold cross-validation: number of folds."),
    click.option("--fold", type=click.IntRange(0), default=None, help="Which fold (0-based) validates (needs --folds)."),
    click.option("--val-store", type=click.Path(path_type=Path), default=None,
                  help="Validate on this store instead of splitting (not with --val-frac, --folds, --groups)."),
    click.option("--groups", type=click.Path(path_type=Path), default=None,
                  help="id,group CSV (e.g. slide): split by group so slides do not leak."),
    click.option("--patience", type=click.IntRange(0), default=None, help="Early stop after N epochs without AUC gain."),
    click.option("--flip/--no-flip", default=None, help="Random flips and 90-degree rotations."),
    click.option("--color/--no-color", default=None, help="Brightness/contrast/saturation/hue jitter."),
    click.option("--color-strength", type=float, default=None, help="Scales all four colour jitters (1 = default)."),
    click.option("--hed/--no-hed", default=None, help="HED stain augmentation (Tellez et al. 2019)."),
    click.option("--hed-sigma", type=float, default=None, help="HED concentration scale jitter."),
    click.option("--shift/--no-shift", default=None, help="Random shift of a few pixels."),
    click.option("--shift-px", type=click.IntRange(0, 16), default=None, help="Largest shift in pixels."),
    click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the model."),
    click.option("--threads", type=click.IntRange(1), default=None,
                  help="CPU threads for torch (default: every core this process may use; at most 4 per core)."),
    click.option("--init-weights", type=click.Path(path_type=Path), default=None,
                  help="Start from local weights (a checkpoint or state dict; nothing is downloaded)."),
    click.option("--max-train", type=click.IntRange(1), default=None, help="Train on at most N images (quick runs)."),
    click.option("--pretrained", is_flag=False, flag_value="hub", default=None, metavar="[PATH]",
                 help="timm networks: start from pretrained weights: timm's download (no value; needs internet) "
                      "or a local .pth/.safetensors/.bin file."),
    click.option("--img-size", type=click.IntRange(32, 1024), default=None,
                 help="timm networks: side the network sees; the 96x96 patch is upscaled inside the model (default 96)."),
    click.option("--freeze-epochs", type=click.IntRange(0), default=None,
                 help="Epochs training only the new head (default: 1 with --pretrained, else 0)."),
    click.option("--lr-backbone-mult", type=click.FloatRange(0, 1, min_open=True), default=None,
                 help="Learning rate of all but the head, relative to --lr (default: 0.1 with --pretrained, else 1)."),
    click.option("--tensorboard", type=click.Path(path_type=Path), default=None, metavar="DIR",
                 help="Log to TensorBoard under DIR/<run> (cv: DIR/<cv run>/fold<i>); needs pcamtool[tensorboard]."),
]


def train_options(fn: Callable) -> Callable:
    """Add every training option (``--arch`` ... ``--max-train``) to a command, in ``pcamtool train``'s order."""
    for option in reversed(_TRAIN_OPTIONS):
        fn = option(fn)
    return fn


@cli.command()
@click.argument("store", required=False, type=click.Path(path_type=Path))
@_output_option("Run folder (default: runs/<UTC time>-<arch>).")
@train_options
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue a killed run from its last.pt.")
@click.option("--export", "export_", is_flag=True, default=None, help="Export best.pt to model.onnx at the end.")
@handle_errors
def train(store: Path | None, resume: Path | None, **opts: Any) -> None:
    """Train a CNN on a store (default data/train.h5); writes a run folder."""
    from ..config import TrainConfig
    from ..train.loop import fit

    cfg, overrides = TrainConfig.from_options(store=store, **_with_run_arch(opts, resume, cv=False))
    res = fit(cfg, resume=resume, progress=progress_enabled(), overrides=overrides)
    log.info("best val AUC %.4f at epoch %d; run folder %s (%.0fs)", res.best_auc, res.best_epoch,
             res.run_dir, res.seconds)


@cli.command()
@click.argument("store", required=False, type=click.Path(path_type=Path))
@_output_option("CV folder (default: runs/<UTC time>-cv-<arch>); the same command again continues a killed run.")
@train_options
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue the cv run in this folder with its saved options.")
@click.option("--export/--no-export", "export_folds", default=True, show_default=True,
              help="Export each fold's best.pt to fold<i>/model.onnx.")
@handle_errors
def cv(store: Path | None, resume: Path | None, export_folds: bool, **opts: Any) -> None:
    """Train every fold of a K-fold split (--folds, default 5); report each fold's and the out-of-fold AUC.

    Writes CV_DIR/fold<i>/ (a run folder and model.onnx per fold), cv.json,
    cv.csv and oof.csv. Every training option applies to each fold.
    """
    from ..config import TrainConfig
    from ..train.cv import run_cv

    cfg, overrides = TrainConfig.from_options(store=store, **_with_run_arch(opts, resume, cv=True))
    res = run_cv(cfg, out=resume if resume is not None else opts.get("out"), resume=resume is not None,
                 export=export_folds, progress=progress_enabled(), overrides=overrides)
    for f in res.folds:
        click.echo(f"fold {f.fold}  val AUC {f.val_auc:.4f}  (best epoch {f.best_epoch}, {f.val_rows} rows)  "
                   f"{f.onnx or f.run_dir}")
    click.echo(f"out-of-fold AUC {res.oof_auc:.4f}  |  fold AUC {res.mean_auc:.4f} +- {res.std_auc:.4f}  |  "
               f"{res.seconds:.0f}s  |  {res.cv_dir / 'cv.json'}")


@cli.command()
@click.argument("folder", required=False, default="demo", type=click.Path(path_type=Path))
@click.option("--train", "n_train", type=click.IntRange(100), default=None,
              help="Synthetic train patches (default 5,000).")
@click.option("--test", "n_test", type=click.IntRange(10), default=None,
              help="Synthetic test patches, from another staining centre (default 1,000).")
@click.option("--epochs", type=EPOCHS, default=None,
              help="Training epochs (default 4: the demo should finish in minutes on a 2-core laptop).")
@click.option("--arch", default=None, help="Model (default pcamnet: the fastest to train on a CPU).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Random seed (same seed, same output).")
@force_option
@handle_errors
def demo(folder: Path, n_train: int | None, n_test: int | None, epochs: int | None, arch: str | None, seed: int,
         force: bool) -> None:
    """The whole job on synthetic data: generate, pack, train, export, infer, evaluate (each stage timed)."""
    from ..demo import run_demo

    res = run_demo(folder, n_train=n_train, n_test=n_test, epochs=epochs, arch=arch, seed=seed, force=force,
                   progress=progress_enabled())
    click.echo(f"validation AUC {res.val_auc:.4f}  |  test AUC (shifted stain, TTA x{res.tta}) {res.test_auc:.4f}  "
               f"|  {res.seconds:.0f}s  |  submission {res.submission}")
