"""The round driver: wait for workers -> round -> finish -> stop rules, for daemon and simulator.

`MasterDaemon` and `flq simulate` run the same loop; only the links differ. The driver binds the
round id into the log context for the whole of a round (engine and bookkeeping) and unbinds it
even when the round raises.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from flq.errors import EXIT_NO_WORKERS, FlqError
from flq.master.bookkeeper import RoundBookkeeper
from flq.master.engine import RoundEngine
from flq.master.outcome import RoundOutcome
from flq.master.registry import WorkerRecord

log = structlog.get_logger("flq.master")
RoundStarting = Callable[[int], None]
RoundFinished = Callable[[RoundOutcome, dict[str, Any]], None]


@dataclass(frozen=True)
class StopRules:
    """When the driver stops starting rounds (besides a stop request)."""

    max_rounds: int
    target_accuracy: float = 0.0  # 0: no target
    min_workers: int = 0  # a round starts once this many workers are connected
    connect_timeout_s: float = 0.0  # give up waiting for them after this long; 0 = never


WAITING_LOG_S = 60.0  # how often a wait for workers says that it still waits


class WorkersMissing(FlqError):
    """The master gave up waiting for min_workers (system.connect_timeout_s)."""

    exit_code = EXIT_NO_WORKERS


class RoundDriver:
    def __init__(
        self,
        engine: RoundEngine,
        books: RoundBookkeeper,
        rules: StopRules,
        *,
        stop: asyncio.Event | None = None,
        on_start: RoundStarting | None = None,
        on_finish: RoundFinished | None = None,
    ) -> None:
        self.engine = engine
        self.books = books
        self.rules = rules
        self.stop = stop if stop is not None else asyncio.Event()
        self._on_start = on_start
        self._on_finish = on_finish

    @property
    def finished(self) -> bool:
        """Every round of the run is done (as opposed to stopped early or by the target)."""
        return self.engine.state.round > self.rules.max_rounds

    async def run(self) -> None:
        """Run rounds until max_rounds, the target accuracy or a stop request."""
        while not self.stop.is_set() and not self.finished:
            if not await self._wait_for_workers():
                return
            await self.run_one()
            target = self.rules.target_accuracy
            if 0 < target <= self.books.last_accuracy:
                log.info("target accuracy reached", accuracy=self.books.last_accuracy)
                return

    async def run_one(self) -> dict[str, Any]:
        """One round and its bookkeeping, with `round` bound in the log context throughout."""
        round_id = self.engine.state.round
        with structlog.contextvars.bound_contextvars(round=round_id):
            if self._on_start is not None:
                self._on_start(round_id)
            outcome = await self.engine.run_round()
            row = await self.books.finish_round(outcome)
            if self._on_finish is not None:
                self._on_finish(outcome, row)
        return row

    async def _wait_for_workers(self) -> bool:
        """True once `min_workers` are connected; False if a stop came first. Raises
        WorkersMissing once connect_timeout_s (if set) has passed without them."""
        registry, needed = self.engine.registry, self.rules.min_workers
        limit = self.rules.connect_timeout_s
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + limit if limit > 0 else math.inf
        while not self.stop.is_set():
            left = give_up_at - loop.time()
            if left <= 0:
                missing = _missing(registry.all(), needed, limit)
                log.error("gave up waiting for workers", reason=missing)
                raise WorkersMissing(missing)
            waiter = asyncio.create_task(
                registry.wait_for_workers(needed, min(WAITING_LOG_S, left))
            )
            stopper = asyncio.create_task(self.stop.wait())
            try:
                done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the wait itself is cancelled (a forced exit)
                stopper.cancel()
                if not waiter.done():
                    waiter.cancel()
            if waiter not in done:
                return False
            if waiter.result():
                return True
            log.warning(
                "still waiting for workers", connected=len(registry.connected()), needed=needed
            )
        return False


def _missing(records: Sequence[WorkerRecord], needed: int, waited_s: float) -> str:
    """What an operator needs when the master gives up: who is there, who was there."""
    connected = [r.worker_id for r in records if r.connected]
    gone = [r.worker_id for r in records if not r.connected]
    return (
        f"gave up after {waited_s:g} s (system.connect_timeout_s) waiting for {needed} workers: "
        f"{len(connected)} connected ({', '.join(connected) or 'none'})"
        + (f", seen before but gone: {', '.join(gone)}" if gone else "")
    )
