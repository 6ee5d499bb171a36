"""A real master daemon on a free loopback port, training the numpy synthetic problem.

Shared by the integration tests that need the gRPC path without TensorFlow's start-up cost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from flq.config import Config
from flq.master.daemon import MasterDaemon, MasterOptions
from flq.master.federation import build_federation
from flq.synthetic import SyntheticEvaluation, SyntheticProblem
from flq.worker.connection import Backoff, run_connected
from flq.worker.session import SessionOptions, WorkerState


async def start_synthetic_master(
    cfg: Config, run_dir: Path, problem: SyntheticProblem, **options: Any
) -> tuple[MasterDaemon, asyncio.Task[None]]:
    """Start the daemon and return once it serves; the task ends when the run does.
    `options` are further MasterOptions (a fixed port, metrics port, ...)."""
    options.setdefault("port", 0)
    daemon = MasterDaemon(
        cfg,
        MasterOptions(
            run_dir=run_dir,
            federation_factory=lambda c: build_federation(c, SyntheticEvaluation(problem)),
            **options,
        ),
    )
    task = asyncio.create_task(daemon.run())
    await asyncio.wait_for(daemon.ready.wait(), 30)
    return daemon, task


def connect_workers(
    port: int,
    trainers: Sequence[Any],
    stop: asyncio.Event,
    *,
    heartbeat_s: float = 0.2,
    backoff_cap_s: float = 0.5,
    states: Sequence[WorkerState] | None = None,
    observer: Any = None,
) -> list[asyncio.Task[Any]]:
    """One reconnecting worker task per trainer on 127.0.0.1:port, ids w0, w1, ... unless
    `states` are given; they end when `stop` is set or the master shuts them down. `observer`
    (a flq.metrics.LinkObserver) sees every worker's messages."""
    states = states or [WorkerState(f"w{i}") for i in range(len(trainers))]
    return [
        asyncio.create_task(
            run_connected(
                state,
                trainer,
                f"127.0.0.1:{port}",
                stop,
                SessionOptions(heartbeat_interval_s=heartbeat_s),
                Backoff(base_s=0.05, cap_s=backoff_cap_s),
                observer=observer,
            )
        )
        for state, trainer in zip(states, trainers, strict=True)
    ]


async def final_status(call: Any) -> grpc.StatusCode:
    """Read a Session call to its end and return the status it ended with."""
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error.code()
    code: grpc.StatusCode = await call.code()
    return code
