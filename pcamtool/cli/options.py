"""Options and decorators shared by the commands: error translation, --force, --skip-bad."""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import click

from ..errors import PcamError

INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for a Ctrl-C'd command


def handle_errors(fn: Callable) -> Callable:
    """Map library errors to one clear line and exit status 1, Ctrl-C to one line and 130 (no traceback).

    ``PCAMTOOL_DEBUG=1`` lets the traceback through, for bug reports.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("PCAMTOOL_DEBUG"):
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


force_option = click.option("--force", is_flag=True, help="Overwrite an existing output.")
skip_bad_option = click.option("--skip-bad", is_flag=True,
                               help="Skip unreadable images (listed and reported) instead of failing.")
