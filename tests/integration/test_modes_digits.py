"""Each upload mode on real data with real TensorFlow training, over real gRPC on loopback.

One master (TF evaluation on the digits test split) and three workers training MLPs on their own
partitions, in this process, talking through grpc.aio streams on a free port.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flq.config import Config, default_config, with_overrides
from flq.master.daemon import MasterDaemon, MasterOptions
from flq.master.results import read_rounds
from tests.loopback import connect_workers

pytestmark = pytest.mark.slow

WORKERS = 3
ROUNDS = 5
HEADER_BITS = 16  # codec id + bit width, then 32 per dimension and 32 per scale


def config(mode: str, b_up: int, **overrides: Any) -> Config:
    values = {
        "system.total_workers": WORKERS,
        "system.min_workers": WORKERS,
        "system.max_rounds": ROUNDS,
        "system.round_timeout_s": 60.0,
        "system.master_url": "http://127.0.0.1:0",
        "dataset.name": "digits",
        "dataset.batch_size": 32,
        "model.name": "mlp",
        "model.local_steps": 0,
        "model.local_epochs": 1,
        "model.lr": 0.1,
        "flq_algorithm.mode": mode,
        "flq_algorithm.b_up": b_up,
        "flq_algorithm.b_down": 8,
        "lazy_selection.warmup": 2,
    }
    values.update(overrides)
    return with_overrides(default_config(), values)


@pytest.fixture(scope="module")
def trainers() -> list[Any]:
    from flq.worker.training import build_trainer

    cfg = config("fedavg", 4)
    return [build_trainer(cfg, f"w{i}")[0] for i in range(WORKERS)]


def run_federation(cfg: Config, run_dir: Path, trainers: list[Any]) -> list[dict[str, str]]:
    async def scenario() -> None:
        daemon = MasterDaemon(cfg, MasterOptions(port=0, run_dir=run_dir))
        master = asyncio.create_task(daemon.run())
        await asyncio.wait_for(daemon.ready.wait(), 120)
        stop = asyncio.Event()
        workers = connect_workers(daemon.port, trainers, stop, heartbeat_s=1.0)
        await asyncio.wait_for(master, 240)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 30)

    asyncio.run(scenario())
    return read_rounds(run_dir / "rounds.csv")


def payload_bits(shapes: list[tuple[int, ...]], bits: int, scales: int) -> int:
    """What one upload costs on the wire, computed from first principles."""
    total = 0
    for shape in shapes:
        values = int(np.prod(shape))
        total += 8 * math.ceil(values * bits / 8) + HEADER_BITS + 32 * len(shape) + 32 * scales
    return total


MLP_SHAPES = [(64, 64), (64,), (64, 10), (10,)]  # digits: 8x8 inputs, 64 hidden units


@pytest.mark.parametrize(
    ("mode", "b_up", "bits", "scales"),
    [("fedavg", 4, 32, 0), ("laq8", 8, 8, 1), ("bbit", 4, 4, 1), ("bin", 1, 1, 1)],
)
def test_mode_learns_digits_and_bills_exactly_the_payload(
    tmp_path: Path, trainers: list[Any], mode: str, b_up: int, bits: int, scales: int
) -> None:
    rows = run_federation(config(mode, b_up), tmp_path, trainers)
    assert [int(r["round"]) for r in rows] == list(range(1, ROUNDS + 1))
    accuracy = [float(r["accuracy"]) for r in rows]
    assert accuracy[-1] > 0.3, accuracy  # chance is 0.1 on 10 classes
    assert accuracy[-1] > accuracy[0], accuracy
    one_upload = payload_bits(MLP_SHAPES, bits, scales)
    billed = [(int(r["uplink_bits"]), int(r["selected"]) * one_upload) for r in rows]
    assert all(int(r["failed"]) == 0 for r in rows)
    if mode != "bbit":
        assert all(got == packed for got, packed in billed)
        return
    # bbit's grid indices go under bzip2 where that is smaller (flq/codec/lossless.py): the
    # bill is then what the compressed tensors cost, never more than packed, and less here.
    assert all(0 < got <= packed for got, packed in billed), billed
    assert sum(got for got, _ in billed) < sum(packed for _, packed in billed), billed


def test_lazy_uploads_skip_and_stale_reuse_keeps_accuracy_rising(
    tmp_path: Path, trainers: list[Any]
) -> None:
    cfg = config("bbit", 4, **{"lazy_selection.thr_scale": 1.0, "system.max_rounds": 8})
    rows = run_federation(cfg, tmp_path, trainers)
    assert sum(int(r["skipped"]) for r in rows) > 0
    accuracy = [float(r["accuracy"]) for r in rows]
    assert accuracy[-1] > 0.5 and accuracy[-1] > accuracy[0], accuracy


def test_stc_learns_digits_over_grpc_with_every_upload_accepted(
    tmp_path: Path, trainers: list[Any]
) -> None:
    # gap_code best: each tensor travels as the smaller of Golomb-Rice and gap classes, through
    # real protobuf and the master's upload check.
    cfg = config("stc", 4, **{"flq_algorithm.density": 0.05})
    rows = run_federation(cfg, tmp_path, trainers)
    assert all(int(r["failed"]) == 0 and int(r["selected"]) == WORKERS for r in rows), rows
    accuracy = [float(r["accuracy"]) for r in rows]
    assert accuracy[-1] > 0.3 and accuracy[-1] > accuracy[0], accuracy
    # k = ceil(0.05 n) values a tensor (205 + 4 + 32 + 1 = 242 an upload), each at most a
    # few bits for its position and sign: between 2 and 16 bits a kept value here.
    kept = sum(math.ceil(0.05 * math.prod(shape)) for shape in MLP_SHAPES)
    headers = sum(HEADER_BITS + 32 * len(shape) + 64 for shape in MLP_SHAPES)
    for row in rows:
        per_upload = int(row["uplink_bits"]) / WORKERS
        assert 2 * kept + headers <= per_upload <= 16 * kept + headers, row
