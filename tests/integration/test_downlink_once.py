"""The downlink is converted to protobuf once per round, not once per worker (bench/bench_rounds.py
found the per-worker conversion among the master's largest costs), and workers still end every
round holding the master's model. Real gRPC on a free loopback port, synthetic numpy workers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from flq.config import default_config, with_overrides
from flq.master.checkpoint import load_checkpoint, save_checkpoint
from flq.master.daemon import MasterDaemon
from flq.master.results import read_rounds
from flq.synthetic import SyntheticProblem, SyntheticTrainer
from flq.worker.session import WorkerState
from tests.loopback import connect_workers, start_synthetic_master

PROBLEM = SyntheticProblem(dim=30, samples_per_worker=64, seed=9)
WORKERS = 4
ROUNDS = 4


def test_round_start_is_converted_once_per_round_for_all_workers(
    tmp_path: Path, round_start_conversions: list[int]
) -> None:
    converted = round_start_conversions
    cfg = with_overrides(
        default_config(),
        {
            "system.total_workers": WORKERS,
            "system.min_workers": WORKERS,
            "system.max_rounds": ROUNDS,
            "system.round_timeout_s": 10.0,
            "system.master_url": "http://127.0.0.1:0",
            "flq_algorithm.mode": "bbit",
            "flq_algorithm.b_down": 8,  # round 1 a keyframe, later rounds an 8-bit delta
            "lazy_selection.warmup": 1,
        },
    )
    states = [WorkerState(f"w{i}") for i in range(WORKERS)]

    async def scenario() -> MasterDaemon:
        daemon, master = await start_synthetic_master(cfg, tmp_path, PROBLEM)
        stop = asyncio.Event()
        trainers = [SyntheticTrainer(PROBLEM, i) for i in range(len(states))]
        workers = connect_workers(daemon.port, trainers, stop, states=states)
        await asyncio.wait_for(master, 60)
        await asyncio.wait_for(asyncio.gather(*workers), 10)
        return daemon

    daemon = asyncio.run(scenario())
    rows = read_rounds(tmp_path / "rounds.csv")
    assert [int(r["failed"]) for r in rows] == [0] * ROUNDS
    # Every round was sent to all four workers, yet each round's message was converted once
    # (the small synthetic model fits in one part).
    assert sorted(converted) == list(range(1, ROUNDS + 1))
    # ...and every worker ended holding the master's downlink reference, bit for bit.
    assert daemon.federation is not None
    reference = daemon.federation.state.downlink.reference
    assert reference is not None
    for state in states:
        assert state.downlink.version == daemon.federation.state.downlink.version
        held = state.downlink.weights
        for mine, theirs in zip(held, reference, strict=True):
            np.testing.assert_array_equal(mine, theirs)


def test_checkpoint_written_straight_to_disk_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "checkpoint.npz"
    rng = np.random.default_rng(0)
    state = {
        "round": 7,
        "weights": [rng.normal(size=(30, 4)).astype(np.float32), np.zeros(4, np.float32)],
        "store": {"ids": ["w0", "w1"], "contributions": {"0": [np.ones(3, np.float32)]}},
    }
    save_checkpoint(path, state)
    save_checkpoint(path, {**state, "round": 8})  # replaces the first atomically
    loaded = load_checkpoint(path)
    assert loaded["round"] == 8
    assert loaded["store"]["ids"] == ["w0", "w1"]
    np.testing.assert_array_equal(loaded["weights"][0], state["weights"][0])
    np.testing.assert_array_equal(loaded["store"]["contributions"]["0"][0], np.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.npz"]  # no temp file left
