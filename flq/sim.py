"""`flq simulate`: the daemons' round engine with in-memory workers, in one process.

The workers run the same session code as `flq-worker` and talk to the same RoundEngine as
`flq-master`; only the transport differs (flq.memlink instead of gRPC streams). Bits and bytes
are measured the same way, so a simulation's results compare one to one with a real federation.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from flq.blas import limit_blas_threads
from flq.config import Config
from flq.link import LinkClosed, PayloadCache
from flq.master.bookkeeper import RoundBookkeeper
from flq.master.driver import RoundDriver, RoundFinished, StopRules
from flq.master.federation import Federation, build_federation
from flq.memlink import memory_link_pair, wire_size
from flq.types import Shutdown
from flq.worker.session import SessionOptions, Trainer, WorkerState, run_session

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
) -> SimResult:
    """Run `cfg.system.max_rounds` rounds (or until the target accuracy) and return the totals."""
    return asyncio.run(
        simulate_async(cfg, run_dir, on_round=on_round, trainers=trainers, federation=federation)
    )


async def simulate_async(
    cfg: Config,
    run_dir: Path,
    *,
    on_round: RowCallback | None = None,
    trainers: Sequence[Trainer] | None = None,
    federation: Federation | None = None,
) -> SimResult:
    limit_blas_threads()  # the workers and the master share this process's cores (flq.blas)
    fed = federation or build_federation(cfg)
    fed.engine.wait_for_every_offer()
    workers = list(trainers) if trainers is not None else build_trainers(cfg)
    books = RoundBookkeeper(fed, run_dir, checkpoints=False)
    rules = StopRules(max_rounds=cfg.system.max_rounds, target_accuracy=cfg.system.target_accuracy)
    driver = RoundDriver(fed.engine, books, rules, on_finish=_row_callback(on_round))
    sessions = await _connect(fed, workers, cfg.system.seed)
    try:
        await driver.run()
    finally:
        books.close()
        await _disconnect(fed, sessions)
        await fed.aclose()
    return SimResult(
        rounds=fed.state.round - 1,
        accuracy=books.last_accuracy,
        loss=books.last_loss,
        uplink_bits=books.totals["uplink_bits"],
        downlink_bits=books.totals["downlink_bits"],
        wire_bytes=books.totals["wire_bytes"],
        run_dir=run_dir,
    )


def _row_callback(on_round: RowCallback | None) -> RoundFinished | None:
    if on_round is None:
        return None
    return lambda _outcome, row: on_round(row)


async def _connect(
    fed: Federation, trainers: Sequence[Trainer], seed: int
) -> list[asyncio.Task[Any]]:
    # Heartbeats exist for real links that must stay warm; in memory they are noise.
    options = SessionOptions(heartbeat_interval_s=math.inf)
    sessions = []
    round_start_sizes = PayloadCache(wire_size)  # each round's payload measured once
    for index, trainer in enumerate(trainers):
        worker_id = f"w{index}"
        master_end, worker_end = memory_link_pair(worker_id, round_start_sizes)
        state = WorkerState(worker_id, seed=seed)
        sessions.append(asyncio.create_task(run_session(state, trainer, worker_end, options)))
        await fed.engine.accept(master_end)
    return sessions


async def _disconnect(fed: Federation, sessions: list[asyncio.Task[Any]]) -> None:
    goodbye = Shutdown(fed.state.round - 1, "simulation finished", reconnect=False)
    for record in fed.registry.connected():
        if record.link is not None:
            try:
                await record.link.send(goodbye)
            except LinkClosed:
                pass
    _, pending = await asyncio.wait(sessions, timeout=10.0)
    for task in pending:
        task.cancel()
    await asyncio.gather(*sessions, return_exceptions=True)
