"""A worker that drops out for a few rounds catches up by the chain of downlink deltas it
missed, not a float32 keyframe, and ends holding the master's reference bit for bit. Real gRPC on
a free loopback port, synthetic numpy workers, sparse ternary downlink (STC's update cache)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from flq.config import default_config, with_overrides
from flq.master.daemon import MasterDaemon
from flq.synthetic import SyntheticProblem, SyntheticTrainer
from flq.worker.session import WorkerState
from tests.loopback import connect_workers, start_synthetic_master

PROBLEM = SyntheticProblem(dim=40, samples_per_worker=48, seed=5)
TENSORS = 2  # the synthetic model: weights and bias


async def _until(condition: Any, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


def test_a_worker_back_after_missed_rounds_gets_the_missed_deltas(tmp_path: Path) -> None:
    cfg = with_overrides(
        default_config(),
        {
            "system.total_workers": 3,
            "system.min_workers": 2,
            "system.max_rounds": 40,
            "system.round_timeout_s": 10.0,
            "system.master_url": "http://127.0.0.1:0",
            "flq_algorithm.mode": "stc",
            "flq_algorithm.density": 0.25,
            "flq_algorithm.down_density": 0.25,
        },
    )
    states = [WorkerState(f"w{i}") for i in range(3)]
    late = states[2]
    applied: list[tuple[bool, int, int]] = []  # (keyframe, tensors, version) as w2 applied them
    real_apply = late.downlink.apply

    def recording(encoded: Any, is_keyframe: bool, version: int) -> Any:
        applied.append((is_keyframe, len(encoded), version))
        return real_apply(encoded, is_keyframe, version)

    late.downlink.apply = recording  # type: ignore[method-assign]

    async def scenario() -> MasterDaemon:
        daemon, master = await start_synthetic_master(cfg, tmp_path, PROBLEM)
        stop, stop_late = asyncio.Event(), asyncio.Event()
        trainers = [SyntheticTrainer(PROBLEM, i) for i in range(3)]
        steady = connect_workers(daemon.port, trainers[:2], stop, states=states[:2])
        first = connect_workers(daemon.port, trainers[2:], stop_late, states=[late])
        assert daemon.federation is not None
        sender = daemon.federation.state.downlink
        await _until(lambda: late.downlink.version >= 3)
        stop_late.set()  # w2 leaves ...
        await asyncio.wait_for(asyncio.gather(*first), 10)
        left_at = late.downlink.version
        await _until(lambda: sender.version >= left_at + 3)
        again = connect_workers(daemon.port, trainers[2:], stop, states=[late])  # ... and is back
        await asyncio.wait_for(master, 60)
        await asyncio.wait_for(asyncio.gather(*steady, *again), 10)
        return daemon

    daemon = asyncio.run(scenario())
    assert daemon.federation is not None
    sender = daemon.federation.state.downlink
    assert applied[0][:2] == (True, TENSORS)  # the first round it joins: a keyframe
    back = [a for a in applied if a[1] > TENSORS]
    assert back, applied  # one apply carried several rounds' deltas ...
    keyframe, tensors, _ = back[0]
    assert not keyframe and tensors % TENSORS == 0 and tensors // TENSORS >= 3
    assert [a for a in applied[1:] if a[0]] == []  # ... and no keyframe after the first
    assert late.downlink.version == sender.version
    assert sender.reference is not None
    for mine, theirs in zip(late.downlink.weights, sender.reference, strict=True):
        np.testing.assert_array_equal(mine, theirs)
