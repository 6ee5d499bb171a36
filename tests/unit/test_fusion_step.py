"""The fusion step in the round engine, over the in-memory transport with numpy workers.

The fusers here are numpy "teachers" of the synthetic regression problem (they know its optimum,
as a teacher knows more than the federated model); the TensorFlow fusers (distill,
param_attention) are tested on digits in tests/integration/test_fusion.py.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flq.config import ConfigError, config_from_dict
from flq.learning.data import ArrayData
from flq.learning.partition import split_server_share
from flq.master.federation import Federation, build_federation
from flq.master.fusion import FusionSchedule, FusionStep, fused_problem
from flq.master.startup import StartupError, check_fusion_teacher
from flq.sim import simulate_async
from flq.synthetic import SyntheticEvaluation, SyntheticProblem, SyntheticTrainer
from flq.types import TrainResult, TrainSpec
from tests.configs import small_config

PROBLEM = SyntheticProblem(dim=30, samples_per_worker=48, seed=3)


@dataclass(frozen=True)
class Fused:
    weights: list[np.ndarray]
    loss: float


@dataclass
class OptimumTeacher:
    """Moves the model `share` of the way to the problem's optimum; returns in some rounds (by
    call number, from 1) NaN weights or raises, as a broken teacher would."""

    share: float = 0.5
    nan_on: set[int] = field(default_factory=set)
    raise_on: set[int] = field(default_factory=set)
    calls: int = 0
    returned: list[list[np.ndarray]] = field(default_factory=list)

    def fuse(self, weights: list[np.ndarray]) -> Fused:
        self.calls += 1
        if self.calls in self.raise_on:
            raise RuntimeError("teacher exploded")
        target = [PROBLEM.true_weights(), np.zeros(1, np.float32)]
        fused = [w + self.share * (t - w) for w, t in zip(weights, target, strict=True)]
        loss = float(np.sum((fused[0] - target[0]) ** 2))
        if self.calls in self.nan_on:
            fused[0][3] = np.nan
        self.returned.append([w.copy() for w in fused])
        return Fused(fused, loss)


class RecordingTrainer:
    """A synthetic worker that keeps the weights it was sent each round."""

    def __init__(self, index: int) -> None:
        self.inner = SyntheticTrainer(PROBLEM, index)
        self.received: list[list[np.ndarray]] = []

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples

    def train(self, weights: list[np.ndarray], spec: TrainSpec) -> TrainResult:
        self.received.append([w.copy() for w in weights])
        return self.inner.train(weights, spec)


def run(
    tmp_path: Path, fuser: Any | None, schedule: FusionSchedule, **overrides: Any
) -> tuple[Federation, list[dict[str, Any]], list[RecordingTrainer]]:
    settings = {
        "system.max_rounds": 8,
        "model.lr": 0.05,
        "dataset.batch_size": 16,
        "flq_algorithm.b_down": 32,
        "lazy_selection.warmup": 0,
    }
    cfg = small_config(settings, overrides)
    federation = build_federation(cfg, SyntheticEvaluation(PROBLEM))
    if fuser is not None:
        federation.engine.fusion = FusionStep(fuser, schedule, "optimum")
    trainers = [RecordingTrainer(i) for i in range(cfg.system.total_workers)]
    rows: list[dict[str, Any]] = []
    asyncio.run(
        simulate_async(
            cfg, tmp_path, on_round=rows.append, trainers=trainers, federation=federation
        )
    )
    return federation, rows, trainers


def test_the_schedule_starts_at_start_round_and_repeats_every_n() -> None:
    schedule = FusionSchedule(start_round=3, every=2)
    assert [r for r in range(1, 10) if schedule.due(r)] == [3, 5, 7, 9]
    assert [r for r in range(1, 5) if FusionSchedule(2, 1).due(r)] == [2, 3, 4]


def test_fused_weights_go_down_to_the_workers_with_the_next_round(tmp_path: Path) -> None:
    teacher = OptimumTeacher()
    _, rows, trainers = run(tmp_path / "fused", teacher, FusionSchedule(2, 1))
    _, plain, _ = run(tmp_path / "plain", None, FusionSchedule(2, 1))
    assert [r["fusion"] for r in rows] == [""] + ["applied"] * 7
    assert rows[0]["fusion_loss"] == "" and math.isfinite(float(rows[1]["fusion_loss"]))
    assert all(float(r["fusion_seconds"]) >= 0 for r in rows[1:])
    # Round k's fused model is what every worker trains from in round k + 1 (float32 downlink),
    # and its bits are in that round's downlink count like any global update.
    for fused_round, fused in enumerate(teacher.returned[:-1], start=2):  # the last: no next
        for trainer in trainers:
            sent = trainer.received[fused_round]  # index = round - 1 of the next round
            for got, want in zip(sent, fused, strict=True):
                np.testing.assert_array_equal(got, want)
    assert all(r["downlink_bits"] > 0 for r in rows)
    assert float(rows[-1]["loss"]) < 0.5 * float(plain[-1]["loss"])


def test_a_failing_fusion_is_skipped_with_its_reason_and_the_model_stays_finite(
    tmp_path: Path,
) -> None:
    teacher = OptimumTeacher(nan_on={2}, raise_on={3})  # calls in rounds 2, 4, 6, 8
    federation, rows, trainers = run(tmp_path, teacher, FusionSchedule(2, 2))
    status = [r["fusion"] for r in rows]
    assert status[0::2] == ["", "", "", ""]  # rounds 1, 3, 5, 7: not due
    assert status[1] == "applied"
    assert status[3] == "skipped:non-finite weights in tensor 0"
    assert status[5] == "skipped:error: RuntimeError: teacher exploded"
    assert status[7] == "applied"
    assert rows[5]["fusion_loss"] == "nan"
    assert all(np.isfinite(w).all() for w in federation.state.weights)
    # The skipped rounds' models were the server step's: what the workers got next is finite.
    assert all(np.isfinite(w).all() for t in trainers for ws in t.received for w in ws)
    assert len(rows) == 8 and all(r["failed"] == 0 for r in rows)


@pytest.mark.parametrize(
    ("after", "loss", "problem"),
    [
        ([np.ones(3)], math.inf, "non-finite loss inf"),
        ([np.ones(3), np.ones(1)], 0.1, "2 tensors, the model has 1"),
        ([np.ones(4)], 0.1, "tensor 0 has shape (4,), the model's is (3,)"),
        ([np.array([1.0, np.inf, 0.0])], 0.1, "non-finite weights in tensor 0"),
        ([np.ones(3)], 0.1, None),
    ],
)
def test_fused_weights_are_checked_before_they_are_applied(
    after: list[np.ndarray], loss: float, problem: str | None
) -> None:
    assert fused_problem([np.zeros(3)], after, loss) == problem


def test_fusion_config_says_what_it_needs() -> None:
    with pytest.raises(ConfigError, match=r"fusion\.teacher"):
        config_from_dict({"fusion": {"method": "distill", "server_share": 0.1}})
    with pytest.raises(ConfigError, match=r"fusion\.server_share"):
        config_from_dict({"fusion": {"method": "distill", "teacher": "t.keras"}})
    with pytest.raises(ConfigError, match="synthetic has none"):
        config_from_dict(
            {
                "dataset": {"name": "synthetic"},
                "fusion": {"method": "distill", "teacher": "t.keras", "server_share": 0.1},
            }
        )
    with pytest.raises(ConfigError, match=r"multiple of fusion\.attention_heads"):
        config_from_dict(
            {
                "fusion": {
                    "method": "param_attention",
                    "teacher": "t.keras",
                    "server_share": 0.1,
                    "attention_dim": 30,
                    "attention_heads": 8,
                }
            }
        )
    with pytest.raises(ConfigError, match=r"fusion\.method"):
        config_from_dict({"fusion": {"method": "merge"}})
    cfg = config_from_dict(
        {"fusion": {"method": "distill", "teacher": "t.keras", "server_share": 0.1}}
    )
    assert (cfg.fusion.start_round, cfg.fusion.every) == (2, 1)


def test_the_server_share_is_stratified_disjoint_and_no_worker_gets_it() -> None:
    labels = np.repeat(np.arange(10), 100)
    train = ArrayData(np.arange(1000, dtype=np.float32)[:, None], labels)
    server, rest = split_server_share(train, 0.1, seed=5)
    assert len(server) == 100 and len(rest) == 900
    assert np.bincount(server.y).tolist() == [10] * 10
    assert not set(server.x[:, 0].tolist()) & set(rest.x[:, 0].tolist())
    again, _ = split_server_share(train, 0.1, seed=5)
    np.testing.assert_array_equal(server.x, again.x)  # every node computes the same split
    none, everything = split_server_share(train, 0.0, seed=5)
    assert len(none) == 0 and len(everything) == 1000
    with pytest.raises(ValueError, match=r"server_share: got 1\.0"):
        split_server_share(train, 1.0, seed=5)


def test_a_teacher_file_that_is_no_keras_file_is_refused_before_tensorflow(
    tmp_path: Path,
) -> None:
    cfg = config_from_dict(
        {"fusion": {"method": "distill", "teacher": str(tmp_path / "t.keras"), "server_share": 0.1}}
    )
    with pytest.raises(StartupError, match=r"t\.keras does not exist"):
        check_fusion_teacher(cfg)
    (tmp_path / "t.keras").write_text("weights, honestly")
    with pytest.raises(StartupError, match=r"t\.keras is not a Keras model file"):
        check_fusion_teacher(cfg)
    (tmp_path / "t.keras").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(8))
    check_fusion_teacher(cfg)  # HDF5: whether it fits is checked when the federation loads it
    check_fusion_teacher(config_from_dict({}))  # no fusion, nothing to check
