"""The ``pcamtool`` command line: thin click commands over the library.

Each command builds keyword arguments, makes one library call, and turns the
library's :class:`PcamError` into one line on stderr and a non-zero exit.
Data goes to stdout; logs and progress bars go to stderr.
"""
from __future__ import annotations

import logging
import sys

import click

from .. import __version__

log = logging.getLogger("pcamtool")


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


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


# The commands register themselves on ``cli``; their modules import only click
# at the top, so ``pcamtool --help`` loads no numba, h5py, torch or onnxruntime.
from . import data, interpret, predict, slide, train  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="pcamtool")


if __name__ == "__main__":
    main()
