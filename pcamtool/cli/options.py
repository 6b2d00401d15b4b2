"""Options and decorators shared by the commands: error translation, --force, --skip-bad."""
from __future__ import annotations

import functools
from typing import Any, Callable

import click

from ..errors import PcamError

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd command


def handle_errors(fn: Callable) -> Callable:
    """Map library errors to one clear line and exit status 1, Ctrl-C to one line and 130 (no traceback).

    ``PCAMTOOL_DEBUG=1`` lets the traceback through, for bug reports. Every
    on/off variable (:mod:`pcamtool.envflags`) is checked first: a value
    that is not one is refused in one line before any work.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..envflags import check_env_flags, env_flag

        try:
            check_env_flags()
        except PcamError as exc:
            raise click.ClickException(str(exc)) from None
        if env_flag("PCAMTOOL_DEBUG"):
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except PcamError as exc:
            raise click.ClickException(one_line(str(exc))) from None
        except OSError as exc:  # disk full, permissions: the user's to fix, not a bug
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            raise click.ClickException(one_line(f"{where}{exc.strerror or exc}")) from None
        except KeyboardInterrupt as exc:
            # pcamtool.errors.Interrupted says what was kept; a bare Ctrl-C elsewhere says nothing.
            click.echo(f"Interrupted: {one_line(str(exc))}" if str(exc) else "Interrupted.", err=True)
            raise SystemExit(INTERRUPTED_EXIT) from None

    return wrapper


def one_line(text: str) -> str:
    """The first line of a message (a library's multi-line text would break the one-line promise)."""
    text = text.strip()
    return text.splitlines()[0] if text else text


def progress_enabled() -> bool:
    ctx = click.get_current_context()
    return not ctx.find_root().params.get("quiet", False)


# Bounds of numbers a user types, checked where they are parsed (click then names the option):
# a seed seeds numpy's generators, which take 0 .. 2**32 - 1 (a larger or negative one was a
# traceback); 10,000 epochs is weeks of training on the full Kaggle set, so more is a typo.
MAX_SEED = 2**32 - 1
MAX_EPOCHS = 10_000
MAX_SYNTH = 10_000_000   # patches per split for synth: 45x the Kaggle train set, ~280 GB of tifs
SEED = click.IntRange(0, MAX_SEED)
EPOCHS = click.IntRange(1, MAX_EPOCHS)
SYNTH_COUNT = click.IntRange(0, MAX_SYNTH)

force_option = click.option("--force", is_flag=True, help="Overwrite an existing output.")
skip_bad_option = click.option("--skip-bad", is_flag=True,
                               help="Skip unreadable images (listed and reported) instead of failing.")
