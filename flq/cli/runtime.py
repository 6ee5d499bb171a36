"""Shared start-up for the daemons: quiet environment, logging, event loop (uvloop if present)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from flq.config import Config
from flq.log import configure_logging, quiet_third_party_env

T = TypeVar("T")


def start(cfg: Config, log_level: str | None = None, log_format: str | None = None) -> None:
    quiet_third_party_env()
    configure_logging(log_level or cfg.logging.log_level, log_format or cfg.logging.log_format)  # type: ignore[arg-type]


def exit_now_if_training(code: int = 0) -> None:
    """End the process now if a local training step is still running in its thread: the daemon
    has shut down in order, and the step's result has nobody left to take it. os._exit skips
    interpreter teardown, which would otherwise run beside TensorFlow's thread."""
    from flq.worker.session import TRAINING_THREAD

    if any(t.name == TRAINING_THREAD and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed (Linux boards), else asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
