"""`flq simulate`: the daemons' round engine with in-memory workers, in one process.

The workers run the same session code as `flq-worker` and talk to the same RoundEngine as
`flq-master`; only the transport differs (flq.memlink instead of gRPC streams). Bits and bytes
are measured the same way, so a simulation's results compare one to one with a real federation.
With `ray_address` the workers are Ray actors instead (flq/raysim.py), the engine stays here.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from flq.blas import limit_blas_threads
from flq.config import Config
from flq.link import LinkClosed, PayloadCache, SessionLink
from flq.master.bookkeeper import RoundBookkeeper
from flq.master.driver import RoundDriver, RoundFinished, StopRules
from flq.master.federation import Federation, build_federation
from flq.memlink import MemoryMasterLink, memory_link_pair, wire_size
from flq.types import Shutdown
from flq.worker.session import (
    SessionOptions,
    SessionOutcome,
    Trainer,
    WorkerState,
    run_session,
)

log = structlog.get_logger("flq.sim")
RowCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class SimResult:
    rounds: int
    accuracy: float
    loss: float
    uplink_bits: int
    downlink_bits: int
    wire_bytes: int
    run_dir: Path


def build_trainers(cfg: Config) -> list[Trainer]:
    from flq.worker.training import build_trainer

    return [build_trainer(cfg, f"w{i}", i)[0] for i in range(cfg.system.total_workers)]


def simulate(
    cfg: Config,
    run_dir: Path,
    *,
    on_round: RowCallback | None = None,
    trainers: Sequence[Trainer] | None = None,
    federation: Federation | None = None,
    ray_address: str | None = None,
) -> SimResult:
    """Run `cfg.system.max_rounds` rounds (or until the target accuracy) and return the totals.
    With `ray_address` ("auto" or host:port) the workers run as actors on that Ray cluster."""
    return asyncio.run(
        simulate_async(
            cfg,
            run_dir,
            on_round=on_round,
            trainers=trainers,
            federation=federation,
            ray_address=ray_address,
        )
    )


async def simulate_async(
    cfg: Config,
    run_dir: Path,
    *,
    on_round: RowCallback | None = None,
    trainers: Sequence[Trainer] | None = None,
    federation: Federation | None = None,
    ray_address: str | None = None,
) -> SimResult:
    limit_blas_threads()  # the workers and the master share this process's cores (flq.blas)
    began = time.monotonic()
    fed = federation or build_federation(cfg)
    fed.engine.wait_for_every_offer()
    workers = _simulated_workers(cfg, trainers, ray_address)
    books = RoundBookkeeper(fed, run_dir, checkpoints=False)
    rules = StopRules(max_rounds=cfg.system.max_rounds, target_accuracy=cfg.system.target_accuracy)
    driver = RoundDriver(fed.engine, books, rules, on_finish=_row_callback(on_round))
    watchers: list[asyncio.Task[None]] = []
    try:
        for link in await workers.start():
            await fed.engine.accept(link)
            watchers.append(asyncio.create_task(_detach_when_ended(fed, link)))
        await driver.run()
    finally:
        books.close()
        for watcher in watchers:  # before the goodbye: every session ends after it
            watcher.cancel()
        await _say_goodbye(fed)
        await workers.stop()
        await fed.aclose()
    books.write_summary("finished" if driver.finished else "stopped", time.monotonic() - began)
    await asyncio.to_thread(books.write_model)
    return SimResult(
        rounds=fed.state.round - 1,
        accuracy=books.last_accuracy,
        loss=books.last_loss,
        uplink_bits=books.totals["uplink_bits"],
        downlink_bits=books.totals["downlink_bits"],
        wire_bytes=books.totals["wire_bytes"],
        run_dir=run_dir,
    )


class SimulatedWorkers(Protocol):
    """Where a simulation's workers run: in this process, or as actors on a Ray cluster."""

    async def start(self) -> Sequence[SessionLink]:
        """Start every worker's session; the master's end of each, in worker order."""
        ...

    async def stop(self) -> None:
        """Wait briefly for the sessions to end (after the goodbye), then end the rest."""
        ...


def _simulated_workers(
    cfg: Config, trainers: Sequence[Trainer] | None, ray_address: str | None
) -> SimulatedWorkers:
    if ray_address is None:
        return InProcessWorkers(trainers if trainers is not None else build_trainers(cfg), cfg)
    if trainers is not None:
        raise ValueError("trainers are built inside the Ray actors: pass no trainers with --ray")
    from flq.raysim import RayWorkers  # Ray is imported only when asked for

    return RayWorkers(cfg, ray_address)


# Heartbeats exist for real links that must stay warm; in memory they are noise.
SESSION_OPTIONS = SessionOptions(heartbeat_interval_s=math.inf)
GOODBYE_WAIT_S = 10.0  # how long sessions may take to end after the goodbye


class InProcessWorkers:
    """Every worker's session as a task of this event loop, over in-memory links."""

    def __init__(self, trainers: Sequence[Trainer], cfg: Config) -> None:
        self._trainers = list(trainers)
        self._seed = cfg.system.seed
        self._sessions: list[asyncio.Task[Any]] = []

    async def start(self) -> list[SessionLink]:
        links: list[SessionLink] = []
        round_start_sizes = PayloadCache(wire_size)  # each round's payload measured once
        for index, trainer in enumerate(self._trainers):
            state = WorkerState(f"w{index}", seed=self._seed)
            master_end, worker_end = memory_link_pair(state.worker_id, round_start_sizes)
            session = run_simulated_session(state, trainer, worker_end)
            self._sessions.append(asyncio.create_task(session))
            links.append(master_end)
        return links

    async def stop(self) -> None:
        if not self._sessions:
            return
        _, pending = await asyncio.wait(self._sessions, timeout=GOODBYE_WAIT_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)


async def run_simulated_session(
    state: WorkerState, trainer: Trainer, link: MemoryMasterLink
) -> SessionOutcome:
    """One simulated worker's session. Its link closes when the session ends, however it ends
    (a crash in training included), so the master hears at once instead of waiting out each
    round's deadline for a worker that, in memory, never reconnects."""
    try:
        return await run_session(state, trainer, link, SESSION_OPTIONS)
    except Exception as error:
        log.error("simulated worker crashed", worker=state.worker_id, error=repr(error))
        raise
    finally:
        link.close()


async def _detach_when_ended(fed: Federation, link: SessionLink) -> None:
    """Forget a worker whose session ended before the simulation did, as the daemon forgets a
    dropped stream: it is no longer invited, sent models or waited for."""
    await link.wait_ended()
    fed.registry.detach(link)
    log.warning("simulated worker left", worker=link.worker_id, session=link.session_id)


def _row_callback(on_round: RowCallback | None) -> RoundFinished | None:
    if on_round is None:
        return None
    return lambda _outcome, row: on_round(row)


async def _say_goodbye(fed: Federation) -> None:
    goodbye = Shutdown(fed.state.round - 1, "simulation finished", reconnect=False)
    for record in fed.registry.connected():
        if record.link is not None:
            try:
                await record.link.send(goodbye)
            except LinkClosed:
                pass
