"""A worker's random stream (stochastic rounding) depends on its id and the run's seed only, in
every process: Python salts str hashes per process, so hash() must not feed it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from flq.worker.session import WorkerState

DRAWS = "import json; from flq.worker.session import WorkerState; " + (
    "print(json.dumps(WorkerState('board-17', seed=7).rng.random(4).tolist()))"
)


def draws_in_new_process(hash_seed: str) -> list[float]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    out = subprocess.run(
        [sys.executable, "-c", DRAWS], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_same_worker_draws_the_same_numbers_in_every_process() -> None:
    first, second = draws_in_new_process("1"), draws_in_new_process("2")
    assert first == second
    assert WorkerState("board-17", seed=7).rng.random(4).tolist() == first


def test_worker_id_and_run_seed_each_change_the_stream() -> None:
    base = WorkerState("board-17", seed=7).rng.random(4).tolist()
    assert WorkerState("board-18", seed=7).rng.random(4).tolist() != base
    assert WorkerState("board-17", seed=8).rng.random(4).tolist() != base
