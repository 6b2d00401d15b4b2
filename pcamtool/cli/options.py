"""Options and decorators shared by the commands: error translation, --force, --skip-bad."""
from __future__ import annotations

import functools
from typing import Any, Callable

import click

from ..errors import PcamError


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


force_option = click.option("--force", is_flag=True, help="Overwrite an existing output.")
skip_bad_option = click.option("--skip-bad", is_flag=True,
                               help="Skip unreadable images (listed and reported) instead of failing.")
