"""Turn FLQ's errors into one line on stderr and their exit code (flq/errors.py); library code
never calls sys.exit."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from flq.errors import FlqError

P = ParamSpec("P")
R = TypeVar("R")


_stderr = Console(stderr=True, highlight=False)


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Print a known error as one readable line and exit with its code; re-raise the unknown."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except Exception as error:
            if not isinstance(error, FlqError):
                raise
            # Escaped: messages quote config sections as [dataset], which rich reads as markup.
            _stderr.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)
            raise typer.Exit(error.exit_code) from None

    return wrapper
