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

from . import __version__
from .errors import PcamError

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
@skip_bad_option
@force_option
@handle_errors
def pack(src: Path, labels: Path | None, out: Path | None, workers: int | None, chunk: int,
         compression: str, skip_bad: bool, force: bool) -> None:
    """Pack a folder of .tif patches into one chunked HDF5 store."""
    from .pack import pack as pack_fn

    res = pack_fn(src, labels=labels, out=out, workers=workers, chunk=chunk, compression=compression,
                  skip_bad=skip_bad, force=force, progress=progress_enabled())
    lab = (f"{res.n_positive:,} positive" if res.n_unlabelled < res.count else "unlabelled")
    log.info("wrote %s: %s images (%s), %d skipped, %.1fs, %s img/s", res.path, f"{res.count:,}", lab,
             len(res.skipped), res.seconds, f"{res.images_per_second:,.0f}")


@cli.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
@handle_errors
def info(store: Path, as_json: bool) -> None:
    """Describe a store: counts, balance, statistics, layout, skipped files."""
    from .info import format_info, store_info

    data = store_info(store)
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="pcamtool")


if __name__ == "__main__":
    main()
