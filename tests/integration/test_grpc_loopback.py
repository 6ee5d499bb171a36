"""Real gRPC on a free loopback port: the master daemon, worker connections and raw clients.

Workers here train the numpy synthetic problem so the tests exercise the network path without
TensorFlow's start-up cost; tests/integration/test_processes.py runs the real thing.
"""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from flq import serde
from flq.admin import AdminTarget, admin_client
from flq.codec import decode
from flq.config import Config
from flq.grpc_options import CLIENT_OPTIONS
from flq.master.checkpoint import load_checkpoint
from flq.master.daemon import MasterDaemon, MasterOptions
from flq.master.federation import build_federation
from flq.master.results import read_rounds
from flq.pb import flq_pb2 as pb
from flq.pb import flq_pb2_grpc as pb_grpc
from flq.synthetic import SyntheticEvaluation, SyntheticProblem, SyntheticTrainer
from flq.types import PROTOCOL_VERSION, StatusReply
from tests.configs import small_config
from tests.loopback import connect_workers, final_status, start_synthetic_master
from tests.waits import until

PROBLEM = SyntheticProblem(dim=40, samples_per_worker=64, seed=5)


def make_config(**overrides: Any) -> Config:
    settings = {
        "system.max_rounds": 6,
        "flq_algorithm.mode": "bbit",
        "flq_algorithm.b_up": 4,
        "flq_algorithm.b_down": 8,
        "model.lr": 0.05,
        "lazy_selection.warmup": 1,
    }
    return small_config(settings, overrides)


async def start_master(cfg: Config, run_dir: Path) -> tuple[MasterDaemon, asyncio.Task[None]]:
    return await start_synthetic_master(cfg, run_dir, PROBLEM)


async def start_workers(port: int, count: int, stop: asyncio.Event) -> list[asyncio.Task[Any]]:
    return connect_workers(port, [SyntheticTrainer(PROBLEM, i) for i in range(count)], stop)


def test_federation_over_grpc_runs_every_round_and_ends_cleanly(tmp_path: Path) -> None:
    cfg = make_config()

    async def scenario() -> MasterDaemon:
        daemon, master = await start_master(cfg, tmp_path)
        stop = asyncio.Event()
        workers = await start_workers(daemon.port, 3, stop)
        await asyncio.wait_for(master, 60)
        outcomes = await asyncio.wait_for(asyncio.gather(*workers), 10)
        assert all(o.reason == "training finished" for o in outcomes), outcomes
        return daemon

    daemon = asyncio.run(scenario())
    rows = read_rounds(tmp_path / "rounds.csv")
    assert [int(r["round"]) for r in rows] == list(range(1, 7))
    assert all(int(r["failed"]) == 0 for r in rows)
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    # Uplink bits are what the master decoded; bytes on the wire add protobuf framing.
    assert all(
        int(r["wire_bytes"]) * 8 > int(r["uplink_bits"]) + int(r["downlink_bits"]) for r in rows
    )
    assert (tmp_path / "checkpoint.npz").exists() and (tmp_path / "summary.json").exists()
    assert daemon.state_name == "finished"
    # The final model: the numpy problem has no Keras form, so model.npz alone, of round 6.
    assert daemon.federation is not None
    final = load_checkpoint(tmp_path / "model.npz")
    assert final["round"] == 6 and not (tmp_path / "model.keras").exists()
    for saved, weights in zip(final["weights"], daemon.federation.state.weights, strict=True):
        np.testing.assert_array_equal(saved, weights)


@pytest.fixture
def serving_master(tmp_path: Path) -> Any:
    """A master waiting for workers (min_workers 5 never arrive), plus a loop to talk to it."""
    loop = asyncio.new_event_loop()
    cfg = make_config(**{"system.min_workers": 3})
    daemon, task = loop.run_until_complete(start_master(cfg, tmp_path))
    yield loop, daemon
    daemon.request_stop("test over")
    loop.run_until_complete(asyncio.wait_for(task, 20))
    loop.close()


async def _channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS)


async def _model(port: int) -> list[np.ndarray]:
    async with await _channel(port) as channel:
        stub = pb_grpc.FLQStub(channel)
        chunks = [c async for c in stub.GetGlobalModel(pb.ModelRequest())]
    from flq.codec import Reassembler

    reassembler = Reassembler()
    for message in chunks:
        for chunk in serde.model_chunk_from_proto(message).tensors:
            reassembler.add(chunk)
    return [decode(e) for e in reassembler.finish()]


async def _session_status(port: int, *messages: pb.WorkerMessage) -> grpc.StatusCode:
    async with await _channel(port) as channel:
        call = pb_grpc.FLQStub(channel).Session()
        for message in messages:
            await call.write(message)
        return await final_status(call)


def _hello(**fields: Any) -> pb.WorkerMessage:
    values = {"worker_id": "raw", "protocol_version": PROTOCOL_VERSION, "num_samples": 1}
    values.update(fields)
    return pb.WorkerMessage(hello=pb.Hello(**values))


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        ((pb.WorkerMessage(),), grpc.StatusCode.INVALID_ARGUMENT),
        ((pb.WorkerMessage(offer=pb.UploadOffer(round=1)),), grpc.StatusCode.FAILED_PRECONDITION),
        ((_hello(protocol_version=99),), grpc.StatusCode.UNIMPLEMENTED),
        ((_hello(worker_id=""),), grpc.StatusCode.INVALID_ARGUMENT),
        (
            (pb.WorkerMessage(update=pb.UpdateChunk(tensors=[pb.TensorChunk(codec=42)])),),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            (pb.WorkerMessage(offer=pb.UploadOffer(energy=math.nan)),),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
    ids=["empty", "offer-first", "protocol-version", "empty-id", "bad-codec", "nan-energy"],
)
def test_malformed_sessions_get_a_clear_status_and_change_nothing(
    serving_master: Any, messages: tuple[pb.WorkerMessage, ...], code: grpc.StatusCode
) -> None:
    loop, daemon = serving_master
    before = loop.run_until_complete(_model(daemon.port))
    assert loop.run_until_complete(_session_status(daemon.port, *messages)) == code
    after = loop.run_until_complete(_model(daemon.port))
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)
    status = loop.run_until_complete(_status(daemon.port))
    assert status.state == "waiting"


async def _status(port: int) -> StatusReply:
    async with admin_client(AdminTarget(f"127.0.0.1:{port}")) as client:
        return await client.status()


def test_health_and_admin_rpcs(serving_master: Any) -> None:
    loop, daemon = serving_master

    async def check() -> None:
        async with await _channel(daemon.port) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="flq.v1.FLQ"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            status = await _status(daemon.port)
            assert status.mode == "bbit" and status.max_rounds == 6 and status.round == 0
            model = await _model(daemon.port)
            assert [m.shape for m in model] == [(PROBLEM.dim,), (1,)]
            stop = await pb_grpc.FLQStub(channel).Stop(pb.StopRequest(reason="test"))
            assert stop.accepted

    loop.run_until_complete(check())
    assert daemon.control.stop_requested.is_set()


def test_a_second_connection_with_a_live_id_replaces_the_first(tmp_path: Path) -> None:
    cfg = make_config(**{"system.min_workers": 2})

    async def scenario() -> None:
        daemon, master = await start_master(cfg, tmp_path)
        async with await _channel(daemon.port) as channel:
            first = pb_grpc.FLQStub(channel).Session()
            await first.write(_hello(worker_id="w9"))
            assert (await first.read()).HasField("welcome")
            second = pb_grpc.FLQStub(channel).Session()
            await second.write(_hello(worker_id="w9"))
            assert (await second.read()).HasField("welcome")
            goodbye = await first.read()
            assert goodbye.HasField("shutdown") and "replaced" in goodbye.shutdown.reason
            record = daemon.federation.registry.get("w9")  # type: ignore[union-attr]
            assert record is not None and record.connected
            second.cancel()
        daemon.request_stop("test over")
        await asyncio.wait_for(master, 20)

    asyncio.run(scenario())


def test_bytes_that_are_no_protobuf_are_refused_logged_and_counted(serving_master: Any) -> None:
    loop, daemon = serving_master
    before = loop.run_until_complete(_model(daemon.port))

    async def send_garbage() -> tuple[grpc.StatusCode, str]:
        async with await _channel(daemon.port) as channel:
            raw = channel.stream_stream("/flq.v1.FLQ/Session", None, None)  # bytes as they are
            call = raw()
            await call.write(b"\xff\xfe\xfd not a protobuf \x00\x01")
            return await _refusal(call)

    with capture_logs() as logs:
        code, details = loop.run_until_complete(send_garbage())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "not a WorkerMessage" in details
    assert daemon.metrics.rejected_count("malformed") == 1
    rejected = [e for e in logs if e["event"] == "session rejected"]
    assert [e["code"] for e in rejected] == ["INVALID_ARGUMENT"]
    after = loop.run_until_complete(_model(daemon.port))
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_overlong_worker_id_is_refused_without_being_echoed(serving_master: Any) -> None:
    loop, daemon = serving_master
    long_id = "w" + "x" * 4999

    async def hello() -> tuple[grpc.StatusCode, str]:
        async with await _channel(daemon.port) as channel:
            call = pb_grpc.FLQStub(channel).Session()
            await call.write(_hello(worker_id=long_id))
            return await _refusal(call)

    with capture_logs() as logs:
        code, details = loop.run_until_complete(hello())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "5000 bytes" in details and "expected 1..128 bytes" in details
    assert len(details) < 200
    assert "x" * 100 not in repr(logs)
    assert daemon.federation.registry.get(long_id) is None
    assert daemon.metrics.rejected_count("malformed") == 1


async def _refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status and details a Session call the master refuses ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in call:
            pass
    return refused.value.code(), refused.value.details() or ""


def test_the_master_serves_health_and_holds_sessions_while_its_model_loads(
    tmp_path: Path,
) -> None:
    """The port answers before the federation exists: health NOT_SERVING, Status "starting",
    a worker's session accepted and held at its Hello. Once the model is built: SERVING, the
    held worker is welcomed and rounds run (never before: no round without its evaluator)."""
    cfg = make_config(**{"system.total_workers": 1, "system.min_workers": 1})
    loaded = threading.Event()

    def slow_factory(c: Config) -> Any:
        assert loaded.wait(30), "the test never let the model load"
        return build_federation(c, SyntheticEvaluation(PROBLEM))

    async def health(port: int) -> Any:
        async with await _channel(port) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="flq.v1.FLQ")
            )
            return reply.status

    async def scenario() -> tuple[list[Any], list[str]]:
        options = MasterOptions(run_dir=tmp_path, port=0, federation_factory=slow_factory)
        daemon = MasterDaemon(cfg, options)
        master = asyncio.create_task(daemon.run())
        await asyncio.wait_for(daemon.listening.wait(), 30)
        stop = asyncio.Event()
        workers = await start_workers(daemon.port, 1, stop)
        await asyncio.wait_for(until(lambda: daemon.control.held_sessions == 1), 10)
        during = [await health(daemon.port), (await _status(daemon.port)).state]
        assert not daemon.ready.is_set() and daemon.federation is None
        loaded.set()
        await asyncio.wait_for(master, 60)  # every round ran: the held worker was welcomed
        stop.set()
        await asyncio.gather(*workers, return_exceptions=True)
        return during, [r["round"] for r in read_rounds(tmp_path / "rounds.csv")]

    during, rounds = asyncio.run(scenario())
    assert during == [health_pb2.HealthCheckResponse.NOT_SERVING, "starting"]
    assert rounds == [str(r) for r in range(1, cfg.system.max_rounds + 1)]
