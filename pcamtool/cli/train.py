"""Commands that train: train, demo."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from . import cli, log
from .options import force_option, handle_errors, progress_enabled


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

    from ..config import AugmentConfig
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
