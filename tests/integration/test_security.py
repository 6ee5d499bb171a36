"""TLS and tokens on a real loopback federation: certificates from `flq certs init`, a master daemon
on a free port, synthetic workers through flq.worker.connection.run_connected.

Every refusal is checked four ways: the caller gets the right status, the master logs it (without
the token), the master counts it, and the global model is bit-for-bit what it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from structlog.testing import capture_logs

from flq import serde
from flq.certs import init_directory
from flq.codec import Reassembler, decode
from flq.config import Config, default_config, with_overrides
from flq.grpc_options import CLIENT_OPTIONS
from flq.master.daemon import MasterDaemon
from flq.master.results import read_rounds
from flq.pb import flq_pb2 as pb
from flq.pb import flq_pb2_grpc as pb_grpc
from flq.security import admin_metadata, channel_credentials, load_client_tls, worker_metadata
from flq.synthetic import SyntheticProblem, SyntheticTrainer
from flq.types import PROTOCOL_VERSION
from flq.worker.connection import Backoff, FatalConnectionError, run_connected
from flq.worker.session import SessionEnd, SessionOptions, WorkerState
from tests.loopback import final_status, start_synthetic_master

PROBLEM = SyntheticProblem(dim=24, samples_per_worker=48, seed=11)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA that also issued a certificate for "w0"."""
    directory = tmp_path_factory.mktemp("other-certs")
    init_directory(directory, "127.0.0.1", ["w0"])
    return directory


def admin_token(certs: Path) -> str:
    return (certs / "admin.token").read_text().strip()


def worker_token(certs: Path, worker: str) -> str:
    return (certs / f"{worker}.token").read_text().strip()


@pytest.fixture
def admin_env(certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The master holds only the digest (master.env), never the admin token itself.
    name, _, digest = (certs / "master.env").read_text().strip().partition("=")
    monkeypatch.setenv(name, digest)


def secure_config(certs: Path, **overrides: Any) -> Config:
    base = {
        "system.total_workers": 2,
        "system.min_workers": 2,
        "system.max_rounds": 4,
        "system.round_timeout_s": 5.0,
        "system.master_url": "http://127.0.0.1:0",
        "flq_algorithm.mode": "bbit",
        "flq_algorithm.b_down": 8,
        "lazy_selection.warmup": 1,
        "security.tls_cert": str(certs / "server.pem"),
        "security.tls_key": str(certs / "server.key"),
        "security.tls_ca": str(certs / "ca.pem"),
        "security.require_client_cert": True,
        "security.tokens_file": str(certs / "tokens.txt"),
    }
    base.update(overrides)
    return with_overrides(default_config(), base)


@asynccontextmanager
async def running_master(cfg: Config, run_dir: Path) -> AsyncIterator[MasterDaemon]:
    daemon, task = await start_synthetic_master(cfg, run_dir, PROBLEM)
    try:
        yield daemon
    finally:
        daemon.request_stop("test over")
        await asyncio.wait_for(task, 30)


def client_credentials(ca_dir: Path, name: str | None) -> grpc.ChannelCredentials:
    cert = None if name is None else ca_dir / f"{name}.pem"
    key = None if name is None else ca_dir / f"{name}.key"
    tls = load_client_tls(ca_dir / "ca.pem", cert, key)
    assert tls is not None
    return channel_credentials(tls)


async def run_worker(
    port: int,
    worker: str,
    *,
    token: str | None,
    credentials: grpc.ChannelCredentials,
    stop: asyncio.Event | None = None,
    index: int = 0,
) -> Any:
    return await run_connected(
        WorkerState(worker),
        SyntheticTrainer(PROBLEM, index),
        f"127.0.0.1:{port}",
        stop or asyncio.Event(),
        SessionOptions(heartbeat_interval_s=0.2),
        Backoff(base_s=0.05, cap_s=0.3),
        credentials=credentials,
        token=token,
    )


async def pull_model(port: int, credentials: grpc.ChannelCredentials, token: str) -> list[Any]:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, CLIENT_OPTIONS) as ch:
        call = pb_grpc.FLQStub(ch).GetGlobalModel(pb.ModelRequest(), metadata=admin_metadata(token))
        reassembler = Reassembler()
        async for message in call:
            for chunk in serde.model_chunk_from_proto(message).tensors:
                reassembler.add(chunk)
    return [decode(e) for e in reassembler.finish()]


def assert_same_model(before: list[Any], after: list[Any]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a, b)


def refusals(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "call refused"]


def assert_no_secret_in(logs: list[dict[str, Any]], *secrets: str) -> None:
    text = repr(logs)
    for secret in secrets:
        assert secret not in text


# ---------------------------------------------------------------- the happy path


def test_tls_federation_with_tokens_runs_every_round(
    certs: Path, admin_env: None, tmp_path: Path
) -> None:
    cfg = secure_config(certs)

    async def scenario() -> MasterDaemon:
        daemon, master = await start_synthetic_master(cfg, tmp_path, PROBLEM)
        workers = [
            run_worker(
                daemon.port,
                w,
                token=worker_token(certs, w),
                credentials=client_credentials(certs, w),
                index=i,
            )
            for i, w in enumerate(("w0", "w1"))
        ]
        outcomes = await asyncio.wait_for(asyncio.gather(master, *workers), 60)
        assert all(o.end is SessionEnd.SHUTDOWN for o in outcomes[1:]), outcomes
        return daemon

    with capture_logs() as logs:
        daemon = asyncio.run(scenario())
    rows = read_rounds(tmp_path / "rounds.csv")
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4]
    assert all(int(r["failed"]) == 0 and int(r["participants"]) == 2 for r in rows)
    assert daemon.state_name == "finished"
    assert not refusals(logs)
    assert not any("unencrypted" in entry["event"] for entry in logs)
    assert_no_secret_in(logs, worker_token(certs, "w0"), worker_token(certs, "w1"))


def test_plaintext_master_warns_that_the_link_is_unencrypted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLQ_ADMIN_TOKEN", raising=False)
    cfg = with_overrides(default_config(), {"system.master_url": "http://127.0.0.1:0"})

    async def scenario() -> None:
        async with running_master(cfg, tmp_path):
            pass

    with capture_logs() as logs:
        asyncio.run(scenario())
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert any("unencrypted" in event for event in warnings), warnings
    assert any("admin RPCs" in event for event in warnings), warnings


# ---------------------------------------------------------------- refusals


@pytest.fixture
def secure_master(certs: Path, admin_env: None, tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """A TLS master with tokens, waiting for 2 workers; a loop to talk to it; its logs."""
    loop = asyncio.new_event_loop()
    cfg = secure_config(certs, **{"system.connect_timeout_s": 60.0})
    context = running_master(cfg, tmp_path)
    with capture_logs() as logs:
        daemon = loop.run_until_complete(context.__aenter__())
        yield loop, daemon, logs
        loop.run_until_complete(context.__aexit__(None, None, None))
    loop.close()


def _refused_worker(
    secure_master: Any, certs: Path, worker: str, token: str, cert_dir: Path, cert: str
) -> tuple[str, list[Any], list[Any]]:
    loop, daemon, _ = secure_master
    admin_creds = client_credentials(certs, "admin")
    before = loop.run_until_complete(pull_model(daemon.port, admin_creds, admin_token(certs)))

    async def attempt() -> str:
        with pytest.raises(FatalConnectionError) as refused:
            await asyncio.wait_for(
                run_worker(
                    daemon.port,
                    worker,
                    token=token,
                    credentials=client_credentials(cert_dir, cert),
                ),
                10,
            )
        return str(refused.value)

    message = loop.run_until_complete(attempt())
    after = loop.run_until_complete(pull_model(daemon.port, admin_creds, admin_token(certs)))
    assert daemon.federation.registry.get(worker) is None  # never registered
    return message, before, after


@pytest.mark.parametrize(
    ("worker", "token_of", "code", "counted"),
    [
        ("w0", None, "UNAUTHENTICATED", "unauthenticated"),  # a made-up token
        ("w1", "w0", "PERMISSION_DENIED", "permission_denied"),  # w0's token claiming w1
    ],
    ids=["wrong-token", "impersonation"],
)
def test_bad_worker_tokens_are_refused_logged_and_change_nothing(
    secure_master: Any, certs: Path, worker: str, token_of: str | None, code: str, counted: str
) -> None:
    _, daemon, logs = secure_master
    token = "not-a-real-token-0123456789" if token_of is None else worker_token(certs, token_of)
    # With mTLS the certificate must match the claimed id too; use the claimed worker's own cert
    # so the token check is what refuses.
    message, before, after = _refused_worker(secure_master, certs, worker, token, certs, worker)
    assert message.startswith(code), message
    assert_same_model(before, after)
    refused = refusals(logs)
    assert [r["code"] for r in refused] == [code]
    assert refused[0]["rpc"] == "Session"
    assert daemon.metrics.rejected_count(counted) == 1
    assert_no_secret_in(logs, token, worker_token(certs, "w0"))


def test_a_certificate_for_another_worker_is_refused(secure_master: Any, certs: Path) -> None:
    _, daemon, logs = secure_master
    token = worker_token(certs, "w0")
    message, before, after = _refused_worker(secure_master, certs, "w0", token, certs, "w1")
    assert daemon.metrics.rejected_count("permission_denied") == 1
    assert message.startswith("PERMISSION_DENIED") and "certificate" in message
    assert_same_model(before, after)
    assert [r["code"] for r in refusals(logs)] == ["PERMISSION_DENIED"]
    assert_no_secret_in(logs, token)


def test_a_hello_with_another_id_than_the_token_is_refused(secure_master: Any, certs: Path) -> None:
    """The metadata says w0 (matching token and certificate); the Hello claims w1."""
    loop, daemon, logs = secure_master
    admin_creds = client_credentials(certs, "admin")
    before = loop.run_until_complete(pull_model(daemon.port, admin_creds, admin_token(certs)))

    async def attempt() -> grpc.StatusCode:
        creds = client_credentials(certs, "w0")
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{daemon.port}", creds, CLIENT_OPTIONS
        ) as channel:
            call = pb_grpc.FLQStub(channel).Session(
                metadata=worker_metadata("w0", worker_token(certs, "w0"))
            )
            hello = pb.Hello(worker_id="w1", protocol_version=PROTOCOL_VERSION)
            await call.write(pb.WorkerMessage(hello=hello))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in call:
                    pass
            return refused.value.code()

    assert loop.run_until_complete(attempt()) == grpc.StatusCode.PERMISSION_DENIED
    after = loop.run_until_complete(pull_model(daemon.port, admin_creds, admin_token(certs)))
    assert_same_model(before, after)
    assert daemon.federation.registry.get("w1") is None
    assert daemon.metrics.rejected_count("permission_denied") == 1
    assert any(e["event"] == "session rejected" and e["code"] == "PERMISSION_DENIED" for e in logs)


def test_a_certificate_from_another_ca_never_gets_through_the_handshake(
    secure_master: Any, certs: Path, other_ca: Path
) -> None:
    loop, daemon, logs = secure_master
    admin_creds = client_credentials(certs, "admin")
    before = loop.run_until_complete(pull_model(daemon.port, admin_creds, admin_token(certs)))
    # Trusts the right CA (so the master's certificate verifies) but presents w0's certificate
    # from the other CA: the master's TLS layer refuses it before any RPC exists.
    tls = load_client_tls(certs / "ca.pem", other_ca / "w0.pem", other_ca / "w0.key")
    assert tls is not None

    async def attempt() -> Any:
        stop = asyncio.Event()
        loop_ = asyncio.get_running_loop()
        loop_.call_later(1.0, stop.set)
        return await run_worker(
            daemon.port,
            "w0",
            token=worker_token(certs, "w0"),
            credentials=channel_credentials(tls),
            stop=stop,
        )

    with capture_logs() as worker_logs:
        outcome = loop.run_until_complete(attempt())
    assert outcome.reason == "worker stopping" or "stopped" in outcome.reason
    reconnects = [e for e in worker_logs if e["event"] == "reconnecting"]
    assert reconnects and all("UNAVAILABLE" in e["reason"] for e in reconnects), worker_logs
    assert daemon.federation.registry.get("w0") is None
    after = loop.run_until_complete(pull_model(daemon.port, admin_creds, admin_token(certs)))
    assert_same_model(before, after)
    assert not refusals(logs) and not refusals(worker_logs)  # TLS said no before our code ran


def test_a_client_without_a_certificate_is_refused_by_mutual_tls(
    secure_master: Any, certs: Path
) -> None:
    loop, daemon, _ = secure_master

    async def attempt() -> grpc.StatusCode:
        creds = client_credentials(certs, None)
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{daemon.port}", creds, CLIENT_OPTIONS
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.FLQStub(channel).Status(
                    pb.StatusRequest(), metadata=admin_metadata(admin_token(certs)), timeout=5
                )
            return refused.value.code()

    assert loop.run_until_complete(attempt()) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("token", [None, "wrong-admin-token"], ids=["missing", "wrong"])
def test_admin_rpcs_need_the_admin_token(
    secure_master: Any, certs: Path, token: str | None
) -> None:
    loop, daemon, logs = secure_master
    creds = client_credentials(certs, "admin")
    before = loop.run_until_complete(pull_model(daemon.port, creds, admin_token(certs)))

    async def attempts() -> list[grpc.StatusCode]:
        codes = []
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{daemon.port}", creds, CLIENT_OPTIONS
        ) as channel:
            stub = pb_grpc.FLQStub(channel)
            metadata = admin_metadata(token)
            calls = [
                lambda: stub.Status(pb.StatusRequest(), metadata=metadata),
                lambda: stub.Stop(pb.StopRequest(reason="x"), metadata=metadata),
                lambda: _drain(stub.GetGlobalModel(pb.ModelRequest(), metadata=metadata)),
            ]
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call()
                codes.append(refused.value.code())
        return codes

    codes = loop.run_until_complete(attempts())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert not daemon.control.stop_requested.is_set()  # the refused Stop did nothing
    after = loop.run_until_complete(pull_model(daemon.port, creds, admin_token(certs)))
    assert_same_model(before, after)
    refused = refusals(logs)
    assert [r["rpc"] for r in refused] == ["Status", "Stop", "GetGlobalModel"]
    assert daemon.metrics.rejected_count("unauthenticated") == 3
    assert_no_secret_in(logs, admin_token(certs), *([token] if token else []))


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


def _bad_token_attempt(stub: pb_grpc.FLQStub, token: str, extra: int) -> Any:
    """A client that sends its Hello (and `extra` ~256 KB messages after it), then listens."""

    async def attempt() -> grpc.StatusCode:
        call = stub.Session(metadata=worker_metadata("w0", token))
        hello = pb.Hello(worker_id="w0", protocol_version=PROTOCOL_VERSION)
        bulky = pb.Hello(worker_id="w0", device=pb.DeviceInfo(platform="p" * 256_000))
        try:
            await call.write(pb.WorkerMessage(hello=hello))
            for _ in range(extra):
                await call.write(pb.WorkerMessage(hello=bulky))
            await call.done_writing()
        except grpc.aio.AioRpcError:
            pass  # the refusal arrived first; its status is read below
        return await final_status(call)

    return attempt()


def test_two_hundred_rapid_bad_token_attempts_are_all_unauthenticated(
    secure_master: Any, certs: Path
) -> None:
    """gRPC's client turns a write racing with the refusal into INTERNAL; the master reads what
    a refused caller already sent before answering, so every caller reads UNAUTHENTICATED."""
    loop, daemon, _ = secure_master

    async def attempts() -> list[grpc.StatusCode]:
        creds = client_credentials(certs, "w0")
        codes: list[grpc.StatusCode] = []
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{daemon.port}", creds, CLIENT_OPTIONS
        ) as channel:
            stub = pb_grpc.FLQStub(channel)
            for batch in range(40):
                codes += await asyncio.gather(
                    *(_bad_token_attempt(stub, f"bad-{batch}-{i}", extra=4) for i in range(5))
                )
        return codes

    codes = loop.run_until_complete(attempts())
    assert len(codes) == 200
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}, sorted(c.name for c in codes)
    assert daemon.metrics.rejected_count("unauthenticated") == 200


def test_an_overlong_worker_id_header_is_refused_without_being_echoed(
    secure_master: Any, certs: Path
) -> None:
    loop, daemon, logs = secure_master
    long_id = "w" + "x" * 4999

    async def attempt() -> grpc.aio.AioRpcError:
        creds = client_credentials(certs, "w0")
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{daemon.port}", creds, CLIENT_OPTIONS
        ) as channel:
            call = pb_grpc.FLQStub(channel).Session(
                metadata=worker_metadata(long_id, worker_token(certs, "w0"))
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in call:
                    pass
            return refused.value

    refused = loop.run_until_complete(attempt())
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "5000 bytes" in (refused.details() or "")
    assert "x" * 100 not in (refused.details() or "") and "x" * 100 not in repr(logs)
    assert [r["code"] for r in refusals(logs)] == ["UNAUTHENTICATED"]


def test_a_master_certificate_the_worker_does_not_trust_ends_the_worker(
    secure_master: Any, certs: Path, other_ca: Path
) -> None:
    """Our side of the handshake fails: no retry can fix that, so the worker ends and says so."""
    loop, daemon, _ = secure_master

    async def attempt() -> str:
        with pytest.raises(FatalConnectionError) as refused:
            await asyncio.wait_for(
                run_worker(
                    daemon.port,
                    "w0",
                    token=worker_token(certs, "w0"),
                    credentials=client_credentials(other_ca, "w0"),  # trusts the other CA
                ),
                10,
            )
        return str(refused.value)

    message = loop.run_until_complete(attempt())
    assert message.startswith("TLS handshake with the master failed (check --tls-ca"), message
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert daemon.federation.registry.get("w0") is None
