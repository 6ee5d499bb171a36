"""The round engine over the in-memory transport, with numpy workers (no TensorFlow).

Real engine, real worker sessions, real codec; only the sockets are replaced by queues.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from flq.config import Config
from flq.link import ProtocolViolation
from flq.master.engine import invited
from flq.master.federation import Federation, build_federation
from flq.master.registry import WorkerRecord
from flq.master.results import read_rounds
from flq.memlink import memory_link_pair
from flq.sim import simulate_async
from flq.synthetic import SyntheticEvaluation, SyntheticProblem, SyntheticTrainer
from flq.types import (
    PROTOCOL_VERSION,
    DeviceInfo,
    Hello,
    Location,
    ResetReference,
    Shutdown,
    TrainSpec,
    UpdateChunk,
    UploadOffer,
)
from flq.worker.session import SessionOptions, WorkerState, run_session
from tests.configs import small_config
from tests.waits import until

PROBLEM = SyntheticProblem(dim=30, samples_per_worker=48, seed=3)


def make_config(**overrides: Any) -> Config:
    settings = {
        "system.max_rounds": 12,
        "model.lr": 0.05,
        "model.local_steps": 1,
        "dataset.batch_size": 16,
        "flq_algorithm.b_down": 32,
        "lazy_selection.warmup": 0,
    }
    return small_config(settings, overrides)


def run(
    cfg: Config, tmp_path: Path, trainers: list[Any] | None = None
) -> tuple[Federation, list[dict[str, Any]]]:
    federation = build_federation(cfg, SyntheticEvaluation(PROBLEM))
    workers = trainers or [SyntheticTrainer(PROBLEM, i) for i in range(cfg.system.total_workers)]
    rows: list[dict[str, Any]] = []
    asyncio.run(
        simulate_async(cfg, tmp_path, on_round=rows.append, trainers=workers, federation=federation)
    )
    return federation, rows


@pytest.mark.parametrize(
    ("mode", "b_up", "bits_per_value", "block"),
    [
        ("fedavg", 4, 32, 0),
        ("laq8", 8, 8, 0),
        ("bbit", 4, 4, 0),
        ("bbit", 3, 3, 8),
        ("bin", 1, 1, 0),
    ],
)
def test_each_mode_learns_and_counts_exactly_the_bits_it_received(
    tmp_path: Path, mode: str, b_up: int, bits_per_value: int, block: int
) -> None:
    cfg = make_config(
        **{
            "flq_algorithm.mode": mode,
            "flq_algorithm.b_up": b_up,
            "flq_algorithm.bbit_block": block,
        }
    )
    _, rows = run(cfg, tmp_path)
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < 0.5 * losses[0], losses
    # Every round everyone uploads (lazy off): payload = ceil(n*b/8) bytes per tensor + headers.
    per_worker = 0
    for shape in ([PROBLEM.dim], [1]):
        n = int(np.prod(shape))
        scales = {"fedavg": 0, "laq8": 1, "bbit": 1, "bin": 1}[mode]
        radii = 4 * math.ceil(n / block) if block else 0  # block grid: float32 radius per block
        payload = radii + math.ceil(n * bits_per_value / 8)
        per_worker += 8 * payload + 16 + 32 * len(shape) + 32 * scales
    for row in rows:
        assert row["selected"] == 3 and row["failed"] == 0
        assert row["uplink_bits"] == 3 * per_worker
        assert row["wire_bytes"] > row["uplink_bits"] // 8


def test_stc_learns_both_ways_and_counts_exactly_the_bits_it_sent(tmp_path: Path) -> None:
    cfg = make_config(
        **{
            "flq_algorithm.mode": "stc",
            "flq_algorithm.density": 0.25,
            "flq_algorithm.down_density": 0.25,
            "system.max_rounds": 30,
        }
    )
    federation, rows = run(cfg, tmp_path)
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < 0.5 * losses[0], losses
    # 31 values, k = round(0.25 * 31) = 8 kept per upload; each tensor's header holds mu and nnz.
    for row in rows:
        assert row["selected"] == 3 and row["failed"] == 0
        headers = 3 * ((16 + 32 + 64) + (16 + 32 + 64))
        assert 3 * 8 * 2 + headers <= row["uplink_bits"] <= 3 * 8 * (2 + 31) + headers
    # after the first round's keyframes, every worker gets the one sparse delta
    assert all(row["downlink_bits"] < rows[0]["downlink_bits"] for row in rows[1:])
    held = federation.state.downlink.reference
    assert held is not None and not all(
        np.array_equal(h, w) for h, w in zip(held, federation.state.weights, strict=True)
    )  # the rest of the global step waits in theta - theta_ref for later rounds


def test_sti_learns_with_two_uploads_a_round_and_stale_reuse(tmp_path: Path) -> None:
    cfg = make_config(
        **{
            "flq_algorithm.mode": "sti",
            "flq_algorithm.density": 0.25,
            "budget_selection.sel_clients": 2,
            "system.max_rounds": 30,
        }
    )
    federation, rows = run(cfg, tmp_path)
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(row["selected"] == 2 and row["failed"] == 0 for row in rows)
    # every worker uploaded at some point and keeps counting while it does not (stale reuse)
    assert len(federation.state.store.contributors()) == 3


def test_fedavg_one_step_equals_fedsgd_computed_directly(tmp_path: Path) -> None:
    # Full-batch gradients make each worker's step deterministic, so the expected model is known.
    cfg = make_config(
        **{
            "flq_algorithm.mode": "fedavg",
            "system.max_rounds": 1,
            "dataset.batch_size": PROBLEM.samples_per_worker,
            "flq_algorithm.weighting": "samples",
        }
    )
    trainers = [SyntheticTrainer(PROBLEM, i) for i in range(3)]
    spec = TrainSpec(local_steps=1, batch_size=PROBLEM.samples_per_worker, lr=0.05)
    w0 = PROBLEM.initial_weights()
    reference = [SyntheticTrainer(PROBLEM, i).train(w0, spec).delta for i in range(3)]
    expected = [w + sum(d[k] for d in reference) / 3 for k, w in enumerate(w0)]
    federation, _ = run(cfg, tmp_path, trainers)
    for got, want in zip(federation.state.weights, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_lazy_workers_skip_and_stale_reuse_keeps_learning(tmp_path: Path) -> None:
    cfg = make_config(
        **{
            "flq_algorithm.mode": "bbit",
            "lazy_selection.thr_scale": 2.0,
            "lazy_selection.warmup": 2,
            "lazy_selection.C": 5,
            "system.max_rounds": 20,
        }
    )
    federation, rows = run(cfg, tmp_path)
    assert sum(r["skipped"] for r in rows) > 0
    assert all(r["skipped"] == 0 for r in rows[:2])  # warm-up forces uploads
    assert float(rows[-1]["loss"]) < 0.5 * float(rows[0]["loss"])
    # Skipped workers' stored contributions still counted: every round aggregates all three.
    assert set(federation.state.store.contributors()) == {"w0", "w1", "w2"}


def test_budget_caps_uplink_bits_per_round(tmp_path: Path) -> None:
    one_upload = 8 * math.ceil(PROBLEM.dim * 4 / 8) + 16 + 32 + 32 + 8 + 16 + 32 + 32
    cfg = make_config(
        **{"flq_algorithm.mode": "bbit", "budget_selection.up_budget_bits": 2 * one_upload + 1}
    )
    _, rows = run(cfg, tmp_path)
    assert all(r["uplink_bits"] <= 2 * one_upload + 1 for r in rows)
    assert all(r["selected"] == 2 and r["denied"] == 1 for r in rows)


class ClaimedSamples:
    """A synthetic trainer that reports another sample count (the master weighs by it)."""

    def __init__(self, inner: SyntheticTrainer, samples: int) -> None:
        self.inner, self.num_samples = inner, samples

    def train(self, weights: list[np.ndarray], spec: TrainSpec) -> Any:
        return dataclasses.replace(self.inner.train(weights, spec), num_samples=self.num_samples)


@pytest.mark.parametrize("by_share", [False, True])
def test_ranking_by_sample_share_refreshes_the_heavy_worker(tmp_path: Path, by_share: bool) -> None:
    cfg = make_config(
        **{
            "flq_algorithm.mode": "bbit",
            "budget_selection.sel_clients": 1,
            "budget_selection.by_sample_share": by_share,
        }
    )
    sizes = [1000, 10, 10]
    trainers = [ClaimedSamples(SyntheticTrainer(PROBLEM, i), n) for i, n in enumerate(sizes)]
    _, rows = run(cfg, tmp_path, trainers)
    fresh = [r["fresh"] for r in rows]
    # by energy alone the light workers win some rounds; weighted by share the heavy one wins all
    assert (set(fresh) == {"w0"}) is by_share, fresh


def test_master_and_worker_references_stay_identical(tmp_path: Path) -> None:
    cfg = make_config(
        **{
            "flq_algorithm.mode": "bbit",
            "lazy_selection.thr_scale": 1.0,
            "budget_selection.sel_clients": 2,
            "system.max_rounds": 8,
        }
    )

    async def scenario() -> tuple[Federation, list[WorkerState]]:
        federation = build_federation(cfg, SyntheticEvaluation(PROBLEM))
        states = [WorkerState(f"w{i}") for i in range(3)]
        tasks = []
        for i, state in enumerate(states):
            master_end, worker_end = memory_link_pair(state.worker_id)
            tasks.append(
                asyncio.create_task(
                    run_session(
                        state,
                        SyntheticTrainer(PROBLEM, i),
                        worker_end,
                        SessionOptions(heartbeat_interval_s=math.inf),
                    )
                )
            )
            await federation.engine.accept(master_end)
        for _ in range(cfg.system.max_rounds):
            await federation.engine.run_round()
        # A session handles its messages in order: once it has read the Shutdown and ended,
        # the last round's commits have landed worker-side.
        for record in federation.registry.connected():
            assert record.link is not None
            await record.link.send(Shutdown(cfg.system.max_rounds, "test over", reconnect=False))
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return federation, states

    federation, states = asyncio.run(scenario())
    store = federation.state.store
    for state in states:
        assert state.upload is not None
        assert store.version(state.worker_id) == state.upload.version
        stored = store.contribution(state.worker_id)
        if state.upload.version == 0:
            assert stored is None
            continue
        assert stored is not None
        for master_q, worker_q in zip(stored, state.upload.q_hat, strict=True):
            np.testing.assert_array_equal(master_q, worker_q)


def test_a_worker_past_the_deadline_fails_the_round_without_stalling_it(tmp_path: Path) -> None:
    cfg = make_config(**{"system.round_timeout_s": 0.5, "system.max_rounds": 3})
    trainers = [
        SyntheticTrainer(PROBLEM, 0),
        SyntheticTrainer(PROBLEM, 1),
        SyntheticTrainer(PROBLEM, 2, delay_s=2.0),
    ]
    _, rows = run(cfg, tmp_path, trainers)
    assert len(rows) == 3
    assert all(r["failed"] >= 1 and "w2:no offer by the cut-off" in r["failures"] for r in rows)
    assert all(float(r["seconds"]) < 1.5 for r in rows)
    assert all(r["selected"] == 2 for r in rows)


class _FreezesAfterOneRound:
    """Trains once, then blocks (a frozen board) until `thaw` is set."""

    def __init__(self, inner: SyntheticTrainer, thaw: threading.Event) -> None:
        self.inner, self.thaw, self.calls = inner, thaw, 0

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples

    def train(self, weights: list[np.ndarray], spec: TrainSpec) -> Any:
        self.calls += 1
        if self.calls > 1:
            self.thaw.wait(30)
        return self.inner.train(weights, spec)


def test_a_frozen_worker_stops_counting_is_not_sent_rounds_and_comes_back(tmp_path: Path) -> None:
    """Before: a departed worker's one upload was reused in every later round (issue 10 #4).
    Now its contribution stops counting after max_absent_rounds, it gets no models to pile up
    while silent, and once it thaws (its late offer is heard) it is back in the rounds."""
    cfg = make_config(
        **{
            "system.max_rounds": 10,
            "system.offer_grace_s": 0.5,
            "aggregation.max_absent_rounds": 2,
        }
    )
    thaw = threading.Event()
    trainers: list[Any] = [SyntheticTrainer(PROBLEM, i) for i in range(2)]
    trainers.append(_FreezesAfterOneRound(SyntheticTrainer(PROBLEM, 2), thaw))
    federation = build_federation(cfg, SyntheticEvaluation(PROBLEM))
    rows: list[dict[str, Any]] = []

    def on_round(row: dict[str, Any]) -> None:
        rows.append(row)
        if row["round"] == 5:
            thaw.set()

    asyncio.run(
        simulate_async(cfg, tmp_path, on_round=on_round, trainers=trainers, federation=federation)
    )
    holders = [set(w.split(":")[0] for w in r["weights_used"].split(";")) for r in rows]
    assert holders[0] == {"w0", "w1", "w2"}  # round 1: w2 uploads once
    assert all("w2" in h for h in holders[1:3])  # absent 1 and 2 rounds: still counts
    assert all(h == {"w0", "w1"} for h in holders[3:5]), holders  # then it stops counting
    # rounds 2-3 sent it the model; from round 4 (two silent rounds) it got none
    assert rows[3]["downlink_bits"] * 3 == rows[2]["downlink_bits"] * 2, rows[2:4]
    back = [r["round"] for r in rows[5:] if "w2" in r["fresh"].split(";")]
    assert back, [r["failures"] for r in rows]  # thawed after round 5: it uploads again
    assert federation.state.store.version("w2") == 1 + len(back)  # its reference was kept


async def _master_with_one_raw_worker(cfg: Config) -> tuple[Federation, Any, Any]:
    federation = build_federation(cfg, SyntheticEvaluation(PROBLEM))
    master_end, worker_end = memory_link_pair("w0")
    await worker_end.send(Hello("w0", PROTOCOL_VERSION, 10))
    await federation.engine.accept(master_end)
    await worker_end.recv()  # Welcome
    return federation, master_end, worker_end


@pytest.mark.parametrize("bad", ["future_round", "wrong_shape", "upload_unasked"])
def test_out_of_protocol_messages_are_rejected_and_change_nothing(bad: str) -> None:
    cfg = make_config(
        **{"system.total_workers": 1, "system.min_workers": 1, "system.round_timeout_s": 2.0}
    )

    async def scenario() -> tuple[Federation, Any, list[np.ndarray], Any]:
        federation, master_end, worker_end = await _master_with_one_raw_worker(cfg)
        before = [w.copy() for w in federation.state.weights]
        round_task = asyncio.create_task(federation.engine.run_round())
        await worker_end.recv()  # RoundStart
        trainer = SyntheticTrainer(PROBLEM, 0)
        prepared = _prepared_upload(cfg, trainer)
        if bad == "future_round":
            await worker_end.send(UploadOffer(5, True, prepared.cost_bits, 1.0, 0, False))
        elif bad == "upload_unasked":
            from flq.codec import split_tensors

            await worker_end.send(UpdateChunk(1, 0, tuple(split_tensors(prepared.encoded))))
        else:
            await worker_end.send(UploadOffer(1, True, prepared.cost_bits, 1.0, 0, False))
            await worker_end.recv()  # Decision: granted
            from flq.codec import encode_laq_grid, split_tensors

            encoded = list(prepared.encoded)
            encoded[0] = encode_laq_grid(np.ones(PROBLEM.dim + 1, np.float32), 4)
            await worker_end.send(UpdateChunk(1, 0, tuple(split_tensors(encoded))))
        outcome = await round_task
        return federation, outcome, before, master_end

    federation, outcome, before, master_end = asyncio.run(scenario())
    assert "w0" in outcome.failed and outcome.failed["w0"].startswith("rejected")
    assert master_end.violations, "the session must end with a status"
    assert outcome.uplink_bits == 0
    for got, want in zip(federation.state.weights, before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_an_upload_against_another_reference_version_resets_instead_of_rejecting() -> None:
    """Before: FAILED_PRECONDITION and the session aborted, though an honest worker that missed
    a reset gets here. Now: the upload is dropped, both references reset, the session lives."""
    cfg = make_config(
        **{"system.total_workers": 1, "system.min_workers": 1, "system.round_timeout_s": 2.0}
    )

    async def scenario() -> tuple[Federation, Any, list[np.ndarray], Any, Any]:
        federation, master_end, worker_end = await _master_with_one_raw_worker(cfg)
        before = [w.copy() for w in federation.state.weights]
        round_task = asyncio.create_task(federation.engine.run_round())
        await worker_end.recv()  # RoundStart
        prepared = _prepared_upload(cfg, SyntheticTrainer(PROBLEM, 0))
        await worker_end.send(UploadOffer(1, True, prepared.cost_bits, 1.0, 0, False))
        assert (await worker_end.recv()).message.granted
        from flq.codec import split_tensors

        await worker_end.send(UpdateChunk(1, 7, tuple(split_tensors(prepared.encoded))))
        outcome = await round_task
        reset = (await asyncio.wait_for(worker_end.recv(), 1.0)).message
        return federation, outcome, before, master_end, reset

    federation, outcome, before, master_end, reset = asyncio.run(scenario())
    assert outcome.failed["w0"].startswith("reference mismatch")
    assert not outcome.rejected and not master_end.violations
    assert isinstance(reset, ResetReference) and reset.upload_ref_version == 0
    assert federation.state.store.version("w0") == 0
    assert federation.registry.get("w0").connected  # type: ignore[union-attr]
    for got, want in zip(federation.state.weights, before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_an_offer_after_the_cut_off_is_denied_late_and_the_round_goes_on() -> None:
    """Quorum 1 of 2 and a short grace: w0's offer closes the offers, w1's comes after; w1 is
    told "late" (keeps its reference, fails nothing) while w0's granted upload is applied."""
    cfg = make_config(
        **{
            "system.total_workers": 2,
            "system.min_workers": 1,
            "system.offer_quorum": 0.5,
            "system.offer_grace_s": 0.05,
        }
    )

    async def scenario() -> tuple[Federation, Any, Any]:
        federation, _, w0 = await _master_with_one_raw_worker(cfg)
        master_end, w1 = memory_link_pair("w1")
        await w1.send(Hello("w1", PROTOCOL_VERSION, 10))
        await federation.engine.accept(master_end)
        await w1.recv()  # Welcome
        round_task = asyncio.create_task(federation.engine.run_round())
        await w0.recv()  # RoundStart
        await w1.recv()
        prepared = _prepared_upload(cfg, SyntheticTrainer(PROBLEM, 0))
        await w0.send(UploadOffer(1, True, prepared.cost_bits, 1.0, 0, False))
        assert (await w0.recv()).message.granted  # the cut-off has passed
        await w1.send(UploadOffer(1, True, prepared.cost_bits, 1.0, 0, False))
        late = (await asyncio.wait_for(w1.recv(), 2.0)).message
        from flq.codec import split_tensors

        await w0.send(UpdateChunk(1, 0, tuple(split_tensors(prepared.encoded))))
        return federation, await round_task, late

    federation, outcome, late = asyncio.run(scenario())
    assert not late.granted and late.reason == "late"
    assert outcome.denied == {"w1": "late"} and outcome.fresh == ["w0"]
    assert outcome.failed == {}
    assert federation.state.store.version("w1") == 0 and federation.state.store.version("w0") == 1


def _prepared_upload(cfg: Config, trainer: SyntheticTrainer) -> Any:
    from flq.algorithm import UploadReference
    from flq.master.federation import round_config_from

    weights = PROBLEM.initial_weights()
    reference = UploadReference.from_round_config(
        [w.shape for w in weights], round_config_from(cfg)
    )
    delta = trainer.train(weights, TrainSpec(local_steps=1, batch_size=16, lr=0.05)).delta
    return reference.prepare(delta, 0, np.random.default_rng(0))


def test_a_first_message_other_than_hello_is_refused() -> None:
    async def scenario() -> None:
        federation = build_federation(make_config(), SyntheticEvaluation(PROBLEM))
        master_end, worker_end = memory_link_pair("w0")
        await worker_end.send(UploadOffer(1, True, 10, 1.0, 0, False))
        with pytest.raises(ProtocolViolation, match="first message must be Hello"):
            await federation.engine.accept(master_end)

    asyncio.run(scenario())


class _HeldTrainer:
    """A trainer that says when train() starts and returns only once released."""

    def __init__(self, inner: SyntheticTrainer) -> None:
        self.inner = inner
        self.started = threading.Event()
        self.release = threading.Event()

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples

    def train(self, weights: list[np.ndarray], spec: TrainSpec) -> Any:
        self.started.set()
        self.release.wait(10)
        return self.inner.train(weights, spec)


def test_heartbeats_keep_a_training_worker_seen() -> None:
    cfg = make_config(**{"system.total_workers": 1, "system.min_workers": 1})

    async def scenario() -> tuple[float, float, float]:
        federation = build_federation(cfg, SyntheticEvaluation(PROBLEM))
        master_end, worker_end = memory_link_pair("w0")
        trainer = _HeldTrainer(SyntheticTrainer(PROBLEM, 0))
        session = asyncio.create_task(
            run_session(
                WorkerState("w0"), trainer, worker_end, SessionOptions(heartbeat_interval_s=0.1)
            )
        )
        record = await federation.engine.accept(master_end)
        connected_at = record.last_seen
        round_task = asyncio.create_task(federation.engine.run_round())
        await asyncio.to_thread(trainer.started.wait, 10)
        started_at = record.last_seen
        # The worker is held inside train(): only its heartbeats can move last_seen now.
        await asyncio.wait_for(until(lambda: record.last_seen > started_at + 0.2), 10)
        mid_training = record.last_seen
        trainer.release.set()
        await round_task
        session.cancel()
        await asyncio.gather(session, return_exceptions=True)
        return connected_at, mid_training, record.last_seen

    connected_at, mid_training, after = asyncio.run(scenario())
    assert mid_training > connected_at + 0.2  # seen again while held inside train()
    assert after >= mid_training


class _CrashesInRound:
    """Trains until round `crash_at`, then raises there: a board whose training process dies."""

    def __init__(self, inner: SyntheticTrainer, crash_at: int) -> None:
        self.inner, self.crash_at, self.calls = inner, crash_at, 0

    @property
    def num_samples(self) -> int:
        return self.inner.num_samples

    def train(self, weights: list[np.ndarray], spec: TrainSpec) -> Any:
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("out of memory in train()")
        return self.inner.train(weights, spec)


def test_a_simulated_worker_that_crashes_is_let_go_not_waited_for(tmp_path: Path) -> None:
    # A simulation waits for every offer; a worker whose session died would be waited for to
    # each round's deadline (here 120 s) and invited again every round. Its closed link fails
    # the round it died in, and the registry forgets it, as the daemon forgets a lost stream.
    cfg = make_config(**{"system.max_rounds": 5, "system.round_timeout_s": 120.0})
    trainers: list[Any] = [SyntheticTrainer(PROBLEM, i) for i in range(2)]
    trainers.append(_CrashesInRound(SyntheticTrainer(PROBLEM, 2), crash_at=2))
    with capture_logs() as logs:
        federation, rows = run(cfg, tmp_path, trainers)
    assert len(rows) == 5
    assert "w2" in rows[0]["fresh"].split(";")
    assert rows[1]["failures"] == "w2:disconnected", rows[1]
    for row in rows[2:]:  # no longer invited, so neither failed nor waited for
        assert int(row["failed"]) == 0 and "w2" not in row["fresh"], row
        assert int(row["participants"]) == 2, row
    assert all(float(row["seconds"]) < 60 for row in rows)  # not the 120 s deadline
    assert [r.worker_id for r in federation.registry.connected()] == ["w0", "w1"]
    crashed = [e for e in logs if e["event"] == "simulated worker crashed"]
    assert [e["worker"] for e in crashed] == ["w2"]
    assert "out of memory" in crashed[0]["error"]
    left = [e["worker"] for e in logs if e["event"] == "simulated worker left"]
    assert left == ["w2"]


def test_a_simulation_waits_for_every_offer_however_slow_its_workers_are(tmp_path: Path) -> None:
    # Half the workers train far past the offer grace: the daemons' cut-off would deny them
    # 'late' every round; in memory nobody is silent, so the simulation waits for them.
    cfg = make_config(**{"system.offer_quorum": 0.5, "system.offer_grace_s": 0.0})
    slow = {2, 3}
    trainers = [
        SyntheticTrainer(PROBLEM, i, delay_s=0.3 if i in slow else 0.0)
        for i in range(cfg.system.total_workers)
    ]
    _, rows = run(cfg, tmp_path, trainers)
    assert rows
    for row in rows:
        assert int(row["failed"]) == 0, row
        assert not row.get("denied"), row


def test_rounds_csv_records_the_median_and_slowest_training_time(tmp_path: Path) -> None:
    # The workers measure their own training (sent in the offer); w1's board is slow.
    workers = {"system.total_workers": 3, "system.min_workers": 3, "system.max_rounds": 2}
    cfg = make_config(**workers)
    trainers = [SyntheticTrainer(PROBLEM, i, delay_s=0.5 if i == 1 else 0.0) for i in range(3)]
    _, rows = run(cfg, tmp_path, trainers)
    for row in rows:
        assert row["slowest"] == "w1"
        assert float(row["train_s_max"]) >= 0.5 > float(row["train_s_median"]) > 0
    on_disk = read_rounds(tmp_path / "rounds.csv")
    assert [r["slowest"] for r in on_disk] == ["w1", "w1"]


def test_partial_participation_invites_a_seeded_share_and_sitting_out_is_not_absence(
    tmp_path: Path,
) -> None:
    cfg = make_config(
        **{
            "system.total_workers": 6,
            "system.min_workers": 6,
            "system.participation": 0.5,
            "system.max_rounds": 16,
            "flq_algorithm.mode": "sti",
            "flq_algorithm.density": 0.25,
            "flq_algorithm.b_down": 8,
            "aggregation.max_absent_rounds": 1,
        }
    )
    federation, rows = run(cfg, tmp_path)
    assert all(r["participants"] == 3 and r["failed"] == 0 for r in rows)
    assert float(rows[-1]["loss"]) < 0.5 * float(rows[0]["loss"])
    # In 16 rounds of 3 of 6, some worker sat out 2+ rounds in a row (max_absent_rounds = 1);
    # still every worker's contribution counts: not invited is not absent.
    store = federation.state.store
    assert set(store.contributors()) == {f"w{i}" for i in range(6)}
    assert all(store.absent(f"w{i}") == 0 for i in range(6))
    # Same seed, same invitations: a rerun's rows name the same workers each round.
    _, again = run(cfg, tmp_path / "again")
    assert [r["uplink_bits"] for r in again] == [r["uplink_bits"] for r in rows]


def test_invitations_are_seeded_by_round_and_cover_the_share() -> None:
    records = [WorkerRecord(f"w{i}", 1, DeviceInfo(), Location()) for i in range(10)]
    drawn = {r: [x.worker_id for x in invited(records, 0.25, 7, r)] for r in range(40)}
    assert all(len(ids) == 3 and len(set(ids)) == 3 for ids in drawn.values())  # ceil(2.5)
    assert drawn == {r: [x.worker_id for x in invited(records, 0.25, 7, r)] for r in range(40)}
    assert len({tuple(ids) for ids in drawn.values()}) > 10  # it varies by round
    assert {w for ids in drawn.values() for w in ids} == {f"w{i}" for i in range(10)}
    assert invited(records, 1.0, 7, 3) == records
    assert [x.worker_id for x in invited(records, 0.01, 7, 3)] != []  # at least one


class RecordsLr:
    """A synthetic trainer that keeps the learning rate each round told it."""

    def __init__(self, inner: SyntheticTrainer) -> None:
        self.inner, self.num_samples = inner, inner.num_samples
        self.lrs: list[float] = []

    def train(self, weights: list[np.ndarray], spec: TrainSpec) -> Any:
        self.lrs.append(spec.lr)
        return self.inner.train(weights, spec)


def test_lr_steps_down_every_n_rounds_on_the_wire(tmp_path: Path) -> None:
    cfg = make_config(
        **{
            "system.max_rounds": 7,
            "model.lr": 0.08,
            "model.lr_decay_every": 3,
            "model.lr_decay_factor": 0.5,
        }
    )
    workers = [RecordsLr(SyntheticTrainer(PROBLEM, i)) for i in range(cfg.system.total_workers)]
    run(cfg, tmp_path, trainers=workers)
    expected = [0.08] * 3 + [0.04] * 3 + [0.02]
    for worker in workers:
        assert worker.lrs == pytest.approx(expected)


def test_lr_decay_factor_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="lr_decay_factor"):
        make_config(**{"model.lr_decay_factor": 1.5})
