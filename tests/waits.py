"""Waiting for a condition instead of sleeping for a guessed time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool], poll_s: float = 0.01) -> None:
    """Return once `condition()` holds; bound it with asyncio.wait_for."""
    while not condition():
        await asyncio.sleep(poll_s)
