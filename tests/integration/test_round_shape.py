"""The round's shape over real gRPC on loopback: a silent worker costs only its own contribution,
a reference disagreement ends in a reset (never a rejection), huge updates are refused, and the
bytes in rounds.csv are the bytes the workers saw."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from flq import serde
from flq.algorithm import UploadReference
from flq.codec import Reassembler, decode, encode_float32, group_chunks, split_tensors
from flq.config import Config, default_config, with_overrides
from flq.grpc_options import CLIENT_OPTIONS
from flq.master.daemon import MasterDaemon
from flq.master.federation import round_config_from
from flq.master.results import read_rounds
from flq.pb import flq_pb2 as pb
from flq.pb import flq_pb2_grpc as pb_grpc
from flq.synthetic import SyntheticProblem, SyntheticTrainer
from flq.types import (
    PROTOCOL_VERSION,
    Hello,
    MasterMessage,
    TrainSpec,
    UpdateChunk,
    UploadOffer,
    WorkerMessage,
)
from tests.loopback import connect_workers, start_synthetic_master

PROBLEM = SyntheticProblem(dim=24, samples_per_worker=64, seed=11)
TIMEOUT_S = 4.0


def make_config(**overrides: Any) -> Config:
    base = {
        "system.total_workers": 4,
        "system.min_workers": 4,
        "system.max_rounds": 4,
        "system.round_timeout_s": TIMEOUT_S,
        "system.offer_grace_s": 0.3,
        "flq_algorithm.mode": "fedavg",
        "model.lr": 0.05,
        "system.master_url": "http://127.0.0.1:0",
    }
    base.update(overrides)
    return with_overrides(default_config(), base)


def _hello(worker_id: str) -> pb.WorkerMessage:
    return serde.worker_message_to_proto(Hello(worker_id, PROTOCOL_VERSION, 64))


@contextlib.asynccontextmanager
async def _raw_session(port: int, worker_id: str) -> AsyncIterator[Any]:
    """A hand-driven Session on 127.0.0.1:port, past its Welcome."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS) as channel:
        call = pb_grpc.FLQStub(channel).Session()
        await call.write(_hello(worker_id))
        assert (await call.read()).HasField("welcome")
        try:
            yield call
        finally:
            call.cancel()


async def _read(call: Any) -> MasterMessage:
    return serde.master_message_from_proto(await asyncio.wait_for(call.read(), 10))


async def _round_start(call: Any) -> tuple[int, list[np.ndarray]]:
    """The next RoundStart (all parts), decoded: (round, weights)."""
    first = await _read(call)
    while type(first).__name__ != "RoundStart":
        first = await _read(call)
    parts = [first]
    while len(parts) < first.parts:  # type: ignore[attr-defined]
        parts.append(await _read(call))
    reassembler = Reassembler()
    for part in parts:
        for chunk in part.tensors:  # type: ignore[attr-defined]
            reassembler.add(chunk)
    return first.round, [decode(e) for e in reassembler.finish()]  # type: ignore[attr-defined]


def test_a_silent_worker_costs_only_its_own_contribution(tmp_path: Path) -> None:
    """A client that sends Hello and then nothing. Before: the offer phase waited the whole
    deadline, every honest worker failed `deadline` and selected was 0 in every round. Now it
    costs the first two rounds the grace (1 s here), and later rounds nothing."""
    cfg = make_config(**{"system.offer_grace_s": 1.0})

    async def scenario() -> None:
        daemon, master = await start_synthetic_master(cfg, tmp_path, PROBLEM)
        async with _raw_session(daemon.port, "silent"):
            stop = asyncio.Event()
            trainers = [SyntheticTrainer(PROBLEM, i) for i in range(3)]
            workers = connect_workers(daemon.port, trainers, stop)
            await asyncio.wait_for(master, 60)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 10)

    asyncio.run(scenario())
    rows = read_rounds(tmp_path / "rounds.csv")
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert int(row["selected"]) == 3, row
        assert row["failures"] == "silent:no offer by the cut-off", row
    seconds = [float(row["seconds"]) for row in rows]
    assert all(1.0 <= s < TIMEOUT_S / 2 for s in seconds[:2]), seconds  # waited the grace
    assert all(s < 1.0 for s in seconds[2:]), seconds  # silent two rounds: no longer awaited
    # ... nor sent the model (nothing piles up for it to train through when it wakes)
    downlink = [int(row["downlink_bits"]) for row in rows]
    assert downlink[2] * 4 == downlink[1] * 3 and downlink[3] == downlink[2], downlink


def _prepared(cfg: Config, weights: list[np.ndarray]) -> Any:
    reference = UploadReference.from_round_config(
        [w.shape for w in weights], round_config_from(cfg)
    )
    delta = SyntheticTrainer(PROBLEM, 3).train(
        weights, TrainSpec(local_steps=1, batch_size=16, lr=0.05)
    )
    return reference.prepare(delta.delta, 10, np.random.default_rng(0))


async def _offer_and_upload(
    call: Any, cfg: Config, round_id: int, weights: list[np.ndarray], version: int
) -> MasterMessage:
    """Offer, read the Decision, upload against `version` if granted; returns the Decision."""
    prepared = _prepared(cfg, weights)
    offer = UploadOffer(round_id, True, prepared.cost_bits, prepared.energy, 0, True, 1.0, 64)
    await call.write(serde.worker_message_to_proto(offer))
    decision = await _read(call)
    if getattr(decision, "granted", False):
        for group in group_chunks(split_tensors(prepared.encoded)):
            chunk = UpdateChunk(round_id, version, tuple(group))
            await call.write(serde.worker_message_to_proto(chunk))
    return decision


def test_a_reference_disagreement_ends_in_a_reset_not_a_rejection(tmp_path: Path) -> None:
    """A worker uploads against a version the master does not hold (it missed a reset, or the
    master lost a round). Before: FAILED_PRECONDITION and the session aborted."""
    cfg = make_config(**{"system.min_workers": 1, "system.max_rounds": 2})

    async def scenario() -> list[MasterMessage]:
        daemon, master = await start_synthetic_master(cfg, tmp_path, PROBLEM)
        async with _raw_session(daemon.port, "w3") as call:
            round_id, weights = await _round_start(call)
            first = await _offer_and_upload(call, cfg, round_id, weights, version=5)
            reset = await _read(call)
            round_id, weights = await _round_start(call)
            second = await _offer_and_upload(call, cfg, round_id, weights, version=0)
            await asyncio.wait_for(master, 30)
            return [first, reset, second]

    first, reset, second = asyncio.run(scenario())
    assert first.granted and second.granted  # type: ignore[attr-defined]
    assert type(reset).__name__ == "ResetReference" and reset.upload_ref_version == 0  # type: ignore[attr-defined]
    rows = read_rounds(tmp_path / "rounds.csv")
    assert rows[0]["failures"].startswith("w3:reference mismatch"), rows[0]
    assert rows[0]["rejected"] == "" and int(rows[0]["selected"]) == 0
    assert rows[1]["fresh"] == "w3" and rows[1]["failed"] == "0", rows[1]


def test_a_huge_finite_update_is_refused_and_the_model_stays_finite(tmp_path: Path) -> None:
    """3e38 passes the NaN/Inf check. Before: the step overflowed, every weight became Inf and
    the checkpoint held it."""
    cfg = make_config(**{"system.max_rounds": 2})

    async def scenario() -> MasterDaemon:
        daemon, master = await start_synthetic_master(cfg, tmp_path, PROBLEM)
        stop = asyncio.Event()
        workers = connect_workers(
            daemon.port, [SyntheticTrainer(PROBLEM, i) for i in range(3)], stop
        )
        async with _raw_session(daemon.port, "huge") as call:
            round_id, weights = await _round_start(call)
            huge = [encode_float32(np.full(w.shape, 3e38, np.float32)) for w in weights]
            offer = UploadOffer(round_id, True, sum(e.cost_bits() for e in huge), 1.0, 0, True)
            await call.write(serde.worker_message_to_proto(offer))
            assert (await _read(call)).granted  # type: ignore[attr-defined]
            for group in group_chunks(split_tensors(huge)):
                await call.write(
                    serde.worker_message_to_proto(UpdateChunk(round_id, 0, tuple(group)))
                )
            await asyncio.wait_for(master, 60)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 10)
        return daemon

    daemon = asyncio.run(scenario())
    rows = read_rounds(tmp_path / "rounds.csv")
    assert rows[0]["rejected"].startswith("huge:update norm"), rows[0]
    assert "huge:refused" in rows[0]["failures"] and int(rows[0]["selected"]) == 3
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    weights = daemon.federation.state.weights  # type: ignore[union-attr]
    assert all(np.all(np.isfinite(w)) for w in weights)
    assert daemon.metrics.worker_outcomes.labels("refused")._value.get() == 1  # type: ignore[attr-defined]


class _CountingObserver:
    """Bytes of every round message a worker sent or received, by round id."""

    def __init__(self, totals: dict[int, int]) -> None:
        self.totals = totals

    def on_sent(self, message: WorkerMessage, wire_bytes: int) -> None:
        self._count(message, wire_bytes)

    def on_received(self, message: MasterMessage, wire_bytes: int) -> None:
        self._count(message, wire_bytes)

    def on_closed(self) -> None:
        pass

    def _count(self, message: object, wire_bytes: int) -> None:
        round_id = getattr(message, "round", None)
        if type(message).__name__ in {"RoundStart", "UploadOffer", "Decision", "UpdateChunk"}:
            self.totals[int(round_id or 0)] += wire_bytes


def test_wire_bytes_are_every_byte_the_workers_saw(tmp_path: Path) -> None:
    """Before: `outcome.wire_bytes += await link.send(...)` in concurrent coroutines lost the
    additions made while each send was suspended (97,008 B reported vs 156,035 B measured)."""
    cfg = make_config(**{"flq_algorithm.mode": "bbit", "flq_algorithm.b_down": 8})
    totals: dict[int, int] = defaultdict(int)

    async def scenario() -> None:
        daemon, master = await start_synthetic_master(cfg, tmp_path, PROBLEM)
        stop = asyncio.Event()
        trainers = [SyntheticTrainer(PROBLEM, i) for i in range(4)]
        observer = _CountingObserver(totals)
        workers = connect_workers(
            daemon.port, trainers, stop, heartbeat_s=float("inf"), observer=observer
        )
        await asyncio.wait_for(master, 60)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 10)

    asyncio.run(scenario())
    rows = read_rounds(tmp_path / "rounds.csv")
    assert all(r["failed"] == "0" for r in rows)
    assert [int(r["wire_bytes"]) for r in rows] == [totals[int(r["round"])] for r in rows]
