"""Shared start-up for the daemons: quiet environment, logging, event loop (uvloop if present)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from flq.config import Config
from flq.log import configure_logging, quiet_third_party_env

T = TypeVar("T")


def start(cfg: Config, log_level: str | None = None, log_format: str | None = None) -> None:
    quiet_third_party_env()
    configure_logging(log_level or cfg.logging.log_level, log_format or cfg.logging.log_format)  # type: ignore[arg-type]


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (Linux boards), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
