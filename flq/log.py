"""structlog, configured once at an entry point (never at import).

On a terminal people get the console renderer; anywhere else (journald under systemd, a pipe, a
file) one JSON object per line, so `journalctl -o cat | jq` works. `merge_contextvars` comes first
so a `round` bound with `bind_contextvars` lands on every line logged during that round.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console"]
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Quiet third-party noise for every process we start (TensorFlow and gRPC's C core log to stderr).
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0", "GRPC_VERBOSITY": "ERROR"}


def quiet_third_party_env() -> None:
    """Set the quiet defaults unless the user chose otherwise."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def configure_logging(
    level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None
) -> None:
    out = stream if stream is not None else sys.stderr
    # Without an explicit stream, look sys.stderr up at every write: a stream captured now may be
    # replaced or closed later (test runners, daemonisation), and logging must follow it.
    factory = (
        structlog.PrintLoggerFactory(file=stream)
        if stream is not None
        else (lambda *_: structlog.PrintLogger(file=sys.stderr))
    )
    if level not in LEVELS:
        raise ValueError(f"log level: got {level!r}, expected one of {sorted(LEVELS)}")
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
