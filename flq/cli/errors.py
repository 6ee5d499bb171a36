"""Map FLQ's errors to exit codes in one place; library code never calls sys.exit."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer
from rich.console import Console

P = ParamSpec("P")
R = TypeVar("R")

EXIT_USAGE = 2  # bad config, bad option value: the user can fix the input
EXIT_DATA = 3  # missing or corrupt data files
EXIT_RUNTIME = 1  # anything else that went wrong while running
EXIT_UNREACHABLE = 4  # the master could not be reached (down, wrong address, TLS handshake)
EXIT_REFUSED = 5  # the master refused our token or certificate


class AdminError(RuntimeError):
    """An admin command failed; the message names the master's address."""

    exit_code = EXIT_RUNTIME


class MasterUnreachable(AdminError):
    exit_code = EXIT_UNREACHABLE


class AccessRefused(AdminError):
    exit_code = EXIT_REFUSED


_stderr = Console(stderr=True, highlight=False)


def _exit_code(error: Exception) -> int | None:
    # Imported here so `flq --help` does not pay for modules a command does not use.
    from flq.codec import CodecError
    from flq.config import ConfigError
    from flq.security import SecurityError

    if isinstance(error, AdminError):
        return error.exit_code
    if isinstance(error, ConfigError | CodecError | SecurityError):
        return EXIT_USAGE
    if type(error).__name__ == "DataError":
        return EXIT_DATA
    if type(error).__name__ == "CertsError":  # flq certs: bad ids, a file it will not overwrite
        return EXIT_USAGE
    # The master cannot start as asked (port in use, results directory, --resume's checkpoint).
    if type(error).__name__ in ("StartupError", "CheckpointError"):
        return EXIT_USAGE
    if type(error).__name__ == "FatalConnectionError":  # the master refused this worker
        return EXIT_REFUSED
    return None


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Print a known error as one readable line and exit with its code; re-raise the unknown."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except Exception as error:
            code = _exit_code(error)
            if code is None:
                raise
            _stderr.print(f"[bold red]error:[/] {error}", soft_wrap=True)
            raise typer.Exit(code) from None

    return wrapper
