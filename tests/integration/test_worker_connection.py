"""The worker's connection as an operator meets it: a real master daemon on a free loopback port
and the worker's own reconnecting loop (flq.worker.connection.run_connected).

What retrying can fix is retried, with jitter and without sleeping through a master that is back;
what it cannot fix ends the worker with a message that says what is wrong.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from flq.codec import EncodedTensor, encode_float32, encode_laq_grid, split_tensors
from flq.config import Config
from flq.demo import free_port
from flq.memlink import memory_link_pair
from flq.synthetic import SyntheticProblem, SyntheticTrainer
from flq.types import PROTOCOL_VERSION, RoundConfig, RoundStart, Welcome
from flq.worker import session as worker_session
from flq.worker.connection import Backoff, FatalConnectionError, run_connected
from flq.worker.session import SessionEnd, SessionOptions, WorkerState, run_session
from tests.configs import small_config
from tests.loopback import start_synthetic_master
from tests.waits import until

PROBLEM = SyntheticProblem(dim=16, samples_per_worker=32, seed=3)


def make_config(**overrides: Any) -> Config:
    settings = {
        "system.max_rounds": 1000,
        "flq_algorithm.mode": "bbit",
    }
    return small_config(settings, overrides)


def worker(port: int, stop: asyncio.Event, index: int = 0, **backoff: Any) -> Any:
    return run_connected(
        WorkerState(f"w{index}"),
        SyntheticTrainer(PROBLEM, index),
        f"127.0.0.1:{port}",
        stop,
        SessionOptions(heartbeat_interval_s=0.2),
        Backoff(**backoff) if backoff else Backoff(base_s=0.05, cap_s=0.3),
    )


def test_a_worker_of_another_protocol_version_ends_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_session, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)  # newer

    async def scenario() -> str:
        daemon, master = await start_synthetic_master(make_config(), tmp_path, PROBLEM)
        try:
            with pytest.raises(FatalConnectionError) as refused:
                await asyncio.wait_for(worker(daemon.port, asyncio.Event()), 10)
            return str(refused.value)
        finally:
            daemon.request_stop("test over")
            await asyncio.wait_for(master, 20)

    message = asyncio.run(scenario())
    assert message == (
        f"UNIMPLEMENTED: protocol version {PROTOCOL_VERSION + 1}, master speaks {PROTOCOL_VERSION}"
    )


def test_a_protocol_error_from_the_master_ends_the_session_not_the_worker() -> None:
    """A RoundStart the worker cannot apply (a delta for a reference it does not hold) ends that
    session with a reason, resets the downlink (a keyframe comes at the next Hello), and the
    worker's loop goes on to reconnect."""
    state = WorkerState("w0")
    state.downlink.apply([_float32(np.ones(3))], True, version=4)

    async def scenario() -> Any:
        master_end, worker_end = memory_link_pair("w0")
        session = asyncio.create_task(
            run_session(state, SyntheticTrainer(PROBLEM, 0), worker_end, SessionOptions())
        )
        await master_end.recv()  # Hello
        await master_end.send(Welcome("w0", 1, "s1", 7, False, 0, 4))
        delta = encode_laq_grid(np.full(3, 0.5, np.float32), 8)
        chunks = tuple(split_tensors([delta]))
        # A delta for version 9 builds on 8; this worker holds 4.
        await master_end.send(RoundStart(7, RoundConfig(), 0.0, 9, 0, 1, chunks))
        return await asyncio.wait_for(session, 5)

    with capture_logs() as logs:
        outcome = asyncio.run(scenario())
    assert outcome.end is SessionEnd.CLOSED
    assert outcome.reason.startswith("protocol error: round 7: cannot apply downlink")
    assert state.downlink.version == 0  # reset: the master sends a keyframe next time
    assert any(e["event"] == "protocol error: leaving the session" for e in logs)


def _float32(values: np.ndarray) -> EncodedTensor:
    return encode_float32(values.astype(np.float32))


def test_jitter_goes_on_top_of_the_masters_reconnect_delay(tmp_path: Path) -> None:
    """A stopping master asks its workers to come back after 2 s; they must not all redial at
    exactly 2 s."""

    async def scenario() -> None:
        daemon, master = await start_synthetic_master(make_config(), tmp_path, PROBLEM)
        stop = asyncio.Event()
        workers = [
            asyncio.create_task(
                worker(daemon.port, stop, i, base_s=0.5, rand=random.Random(i).random)
            )
            for i in range(3)
        ]
        await asyncio.wait_for(until(lambda: daemon_rounds(tmp_path) >= 1), 30)
        daemon.request_stop("test over")
        await asyncio.wait_for(master, 20)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 10)

    with capture_logs() as logs:
        asyncio.run(scenario())
    delays = [
        e["delay_s"]
        for e in logs
        if e["event"] == "reconnecting" and e["reason"] == "master stopping"
    ]
    assert len(delays) == 3, logs
    assert all(2.05 < d <= 2.5 for d in delays), delays  # draws of 0.84, 0.13 and 0.96 x 0.5
    assert len(set(delays)) == 3, delays


def daemon_rounds(run_dir: Path) -> int:
    path = run_dir / "rounds.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.exists() else 0


def test_a_worker_returns_within_seconds_of_the_master_serving_again(tmp_path: Path) -> None:
    """The master is away long enough for the worker's backoff to reach 20 s; once a master
    serves on that address the worker redials within a few seconds, not when its sleep ends."""
    port = free_port()

    async def scenario() -> float:
        stop = asyncio.Event()
        backoff = {"base_s": 20.0, "cap_s": 30.0, "rand": lambda: 0.99}
        waiting = asyncio.create_task(worker(port, stop, **backoff))
        await asyncio.sleep(1.5)  # connection refused; the worker now sleeps ~19.8 s
        cfg = make_config(**{"system.min_workers": 1})
        daemon, master = await start_synthetic_master(cfg, tmp_path, PROBLEM, port=port)
        serving = time.monotonic()
        try:
            await asyncio.wait_for(until(lambda: daemon_rounds(tmp_path) >= 1), 15)
            return time.monotonic() - serving
        finally:
            daemon.request_stop("test over")
            await asyncio.wait_for(master, 20)
            stop.set()
            await asyncio.wait_for(waiting, 10)

    with capture_logs() as logs:
        back_after = asyncio.run(scenario())
    # One health poll (1 s) plus at most 3 s of jitter (0.99 * 3), plus the round itself.
    assert back_after < 7.0, back_after
    assert any(e["event"] == "master serves again" for e in logs)
