"""Commands that make and inspect data: pack, info, synth, eda."""
from __future__ import annotations

import json
from pathlib import Path

import click

from . import cli, log
from ..constants import STAIN_METHODS
from .options import SEED, SYNTH_COUNT, force_option, handle_errors, progress_enabled, skip_bad_option


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--labels", type=click.Path(path_type=Path), default=None,
              help="id,label CSV (default: <SRC>_labels.csv beside SRC, if present).")
@click.option("--split", type=click.Choice(["train", "valid", "test"]), default=None,
              help="PCam benchmark files: which split of the folder SRC to pack (SRC may also be "
                   "one split's _x.h5 or _x.h5.gz; _y and _meta.csv are found beside it).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Store to write (default: <SRC>.h5 beside SRC; pcam_<split>.h5 for PCam files).")
@click.option("--workers", type=click.IntRange(1, 256), default=None, help="Decoding threads (default: all cores).")
@click.option("--chunk", type=click.IntRange(1, 65536), default=512, show_default=True, help="Images per HDF5 chunk.")
@click.option("--compression", type=click.Choice(["none", "lzf", "gzip"]), default="none", show_default=True,
              help="'none' keeps the store memory-mappable (fastest training).")
@click.option("--stain", type=click.Choice(STAIN_METHODS), default="none", show_default=True,
              help="Stain-normalize every patch toward a reference (recorded in the store and the model).")
@click.option("--stain-reference", type=click.Path(path_type=Path), default=None,
              help="Store to compute the stain reference from (default: a sample of SRC).")
@skip_bad_option
@force_option
@handle_errors
def pack(src: Path, labels: Path | None, split: str | None, out: Path | None, workers: int | None, chunk: int,
         compression: str, stain: str, stain_reference: Path | None, skip_bad: bool, force: bool) -> None:
    """Pack a folder of .tif patches, or a split of the PCam benchmark files, into one chunked HDF5 store."""
    from ..errors import PcamError
    from ..io.pcam import looks_like_pcam

    if split is not None or looks_like_pcam(src):
        from ..io.pack import pack_pcam

        for given, name in ((labels, "--labels"), (skip_bad or None, "--skip-bad")):
            if given is not None:
                raise PcamError(f"{name} does not apply to PCam files (labels come from the _y file)")
        res = pack_pcam(src, split=split, out=out, workers=workers, chunk=chunk, compression=compression,
                        force=force, stain=stain, stain_reference=stain_reference, progress=progress_enabled())
    else:
        from ..io.pack import pack as pack_fn

        res = pack_fn(src, labels=labels, out=out, workers=workers, chunk=chunk, compression=compression,
                      skip_bad=skip_bad, force=force, stain=stain, stain_reference=stain_reference,
                      progress=progress_enabled())
    lab = (f"{res.n_positive:,} positive" if res.n_unlabelled < res.count else "unlabelled")
    log.info("wrote %s: %s images (%s), %d skipped, %.1fs, %s img/s", res.path, f"{res.count:,}", lab,
             len(res.skipped), res.seconds, f"{res.images_per_second:,.0f}")


@cli.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
@click.option("--check", is_flag=True,
              help="Also read every pixel and verify the store fully (exit 1 naming the first problem).")
@handle_errors
def info(store: Path, as_json: bool, check: bool) -> None:
    """Describe a store: counts, balance, statistics, layout, skipped files."""
    from ..info import format_info, store_info

    data = store_info(store, check=check, progress=progress_enabled())
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--train", "n_train", type=SYNTH_COUNT, default=2000, show_default=True, help="Train patches.")
@click.option("--test", "n_test", type=SYNTH_COUNT, default=500, show_default=True, help="Test patches.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Random seed (same seed, same output).")
@force_option
@handle_errors
def synth(out: Path, n_train: int, n_test: int, seed: int, force: bool) -> None:
    """Generate realistic synthetic H&E patches in the Kaggle layout."""
    from ..synth import generate

    res = generate(out, n_train=n_train, n_test=n_test, seed=seed, force=force, progress=progress_enabled())
    log.info("wrote %s", res)


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=Path("eda"), show_default=True,
              help="Folder for the figures.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Look at a random N patches only.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Random seed for samples.")
@skip_bad_option
@click.option("--force", is_flag=True, help="Overwrite the figures and outliers.csv of an earlier run.")
@handle_errors
def eda(src: Path, out: Path, limit: int | None, seed: int, skip_bad: bool, force: bool) -> None:
    """Figures of a store or tif folder: balance, samples, histograms, outliers."""
    from ..eda import eda as eda_fn

    rep = eda_fn(src, out, limit=limit, seed=seed, force=force, skip_bad=skip_bad)
    for p in rep.figures:
        click.echo(str(p))
    log.info("%s; %d near-white and %d near-black outliers (listed in %s)",
             ", ".join(f"{k}: {v:,}" for k, v in rep.class_counts.items()), len(rep.outliers_white),
             len(rep.outliers_black), out / "outliers.csv")
