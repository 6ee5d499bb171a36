"""The worker's gRPC side: one Session stream to the master, and reconnecting when it drops.

Reconnects use exponential backoff with full jitter (sleep a uniform draw from [0, min(cap,
base * 2^attempt)]) so a hundred boards that lost the master at once do not come back in lockstep;
a master's "come back in N s" is honoured with that jitter on top. The attempt counter resets once
a session got as far as the master's Welcome. While it waits, the worker asks the master's health
service once a second: as soon as a master serves again it redials within a few (jittered)
seconds instead of sleeping out a backoff grown to 30 s while the master was down.

Failures retrying cannot fix end the worker with FatalConnectionError: wrong credentials
(UNAUTHENTICATED, PERMISSION_DENIED), a protocol version the master does not speak
(UNIMPLEMENTED), and a TLS handshake our side failed (the master's certificate does not verify,
or it speaks plaintext). A master that refuses *our* certificate just closes the socket, which
looks like a master going down, so that case keeps retrying (logged each time).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flq import serde
from flq.errors import Refused
from flq.grpc_options import CLIENT_OPTIONS, SERVICE_NAME
from flq.link import MODEL_MISMATCH, LinkClosed, MasterLink, ReceivedByWorker
from flq.pb import flq_pb2 as pb
from flq.pb import flq_pb2_grpc as pb_grpc
from flq.security import worker_metadata
from flq.types import WorkerMessage
from flq.worker.session import (
    SessionEnd,
    SessionOptions,
    SessionOutcome,
    Trainer,
    WorkerState,
    run_session,
)

if TYPE_CHECKING:
    from flq.metrics import LinkObserver

log = structlog.get_logger("flq.worker.connection")

FATAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


STATUS_WAIT_S = 2.0  # how long a failed write waits for the call's final status
HEALTH_POLL_S = 1.0  # how often a waiting worker asks whether the master serves again
SERVING_JITTER_S = 3.0  # once it does, redial after a uniform draw from [0, this]


class FatalConnectionError(Refused, RuntimeError):
    """The master refused us for a reason retrying cannot fix."""


def final_error(code: grpc.StatusCode, details: str) -> FatalConnectionError | None:
    """The error that ends the worker for a call that ended with `code`; None if retrying may
    help."""
    if code in FATAL_CODES or (
        code is grpc.StatusCode.FAILED_PRECONDITION and details.startswith(MODEL_MISMATCH)
    ):
        return FatalConnectionError(f"{code.name}: {details}")
    if code is grpc.StatusCode.UNAVAILABLE and "handshake failed" in details.lower():
        return FatalConnectionError(
            "TLS handshake with the master failed (check --tls-ca against the master's "
            f"certificate, and that the master has TLS on): {details}"
        )
    return None


@dataclass(frozen=True)
class Backoff:
    base_s: float = 0.5
    cap_s: float = 30.0
    rand: Callable[[], float] = random.random  # a uniform draw from [0, 1)

    def delay(self, attempt: int) -> float:
        return self.rand() * min(self.cap_s, self.base_s * (2.0**attempt))

    def after_serving(self) -> float:
        """The delay once the master answers health checks again: a few seconds of jitter."""
        return self.rand() * SERVING_JITTER_S


class GrpcMasterLink:
    """The worker's end of a Session call: one reader task, serialized writes."""

    def __init__(self, call: grpc.aio.StreamStreamCall[pb.WorkerMessage, pb.MasterMessage]) -> None:
        self._call = call
        self._inbox: asyncio.Queue[ReceivedByWorker | BaseException | None] = asyncio.Queue()
        self._write_lock = asyncio.Lock()
        self._reader = asyncio.create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if not isinstance(response, pb.MasterMessage):  # grpc.aio.EOF: the stream ended
                    break
                try:
                    message = serde.master_message_from_proto(response)
                except serde.WireError as error:
                    await self._inbox.put(error)
                    break
                await self._inbox.put(ReceivedByWorker(message, response.ByteSize()))
        except grpc.aio.AioRpcError as error:
            await self._inbox.put(error)
        except asyncio.CancelledError:
            pass
        finally:
            await self._inbox.put(None)

    async def send(self, message: WorkerMessage) -> int:
        proto = serde.worker_message_to_proto(message)
        try:
            async with self._write_lock:
                await self._call.write(proto)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as error:
            await self._raise_if_refused()
            raise LinkClosed(f"write failed: {error}") from error
        return proto.ByteSize()

    async def _raise_if_refused(self) -> None:
        """A write fails when the master ended the call; say so if it refused us. The status may
        trail the failed write by a moment, so wait for it briefly rather than guess "transient"
        and reconnect just to be refused again."""
        try:
            code = await asyncio.wait_for(self._call.code(), STATUS_WAIT_S)
        except asyncio.TimeoutError:
            return
        fatal = final_error(code, await self._call.details() or "")
        if fatal is not None:
            raise fatal

    async def recv(self) -> ReceivedByWorker:
        item = await self._inbox.get()
        if isinstance(item, ReceivedByWorker):
            return item
        await self._inbox.put(item)  # keep later readers failing the same way
        if isinstance(item, grpc.aio.AioRpcError):
            fatal = final_error(item.code(), item.details() or "")
            if fatal is not None:
                raise fatal
            raise LinkClosed(f"{item.code().name}: {item.details()}")
        if isinstance(item, serde.WireError):
            raise LinkClosed(f"master sent a malformed message: {item}")
        raise LinkClosed("stream ended")

    async def close(self) -> None:
        try:
            await self._call.done_writing()
        except Exception:
            pass
        self._call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


async def run_connected(
    state: WorkerState,
    trainer: Trainer,
    address: str,
    stop: asyncio.Event,
    options: SessionOptions | None = None,
    backoff: Backoff | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    on_connected: Callable[[], object] | None = None,
    token: str | None = None,
    observer: LinkObserver | None = None,
) -> SessionOutcome:
    """Keep a session with the master alive until it says goodbye or `stop` is set.

    `credentials` turn on TLS; `token` is sent as `authorization: Bearer ...` with the worker id;
    `observer` (flq.metrics.WorkerMetrics) sees every message. A refusal (wrong token, another
    worker's id) raises FatalConnectionError: retrying cannot fix it.
    """
    policy = backoff or Backoff()
    attempt = 0
    metadata = worker_metadata(state.worker_id, token)
    while not stop.is_set():
        outcome = await _one_session(
            state, trainer, address, stop, options, credentials, on_connected, metadata, observer
        )
        if outcome.end is SessionEnd.SHUTDOWN or stop.is_set():
            return outcome
        if state.connected_once:
            attempt = 0
            state.connected_once = False
        # A master's "come back after N s" is the same for every worker: jitter goes on top.
        delay = outcome.reconnect_after_s + policy.delay(attempt)
        attempt += 1
        log.info("reconnecting", reason=outcome.reason, delay_s=round(delay, 2), attempt=attempt)
        await _wait_to_redial(delay, policy, address, credentials, stop)
    return SessionOutcome(SessionEnd.SHUTDOWN, "stopped")


async def _wait_to_redial(
    delay: float,
    policy: Backoff,
    address: str,
    credentials: grpc.ChannelCredentials | None,
    stop: asyncio.Event,
) -> None:
    """Sleep `delay` (or until `stop`), cut short once the master serves again: then redial
    within policy.after_serving() seconds, however long the backoff had grown."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + delay
    while not stop.is_set() and loop.time() < deadline:
        if loop.time() + HEALTH_POLL_S < deadline and await master_serving(address, credentials):
            deadline = min(deadline, loop.time() + policy.after_serving())
            log.info("master serves again", redial_in_s=round(deadline - loop.time(), 2))
            await _sleep_unless(stop, deadline - loop.time())
            return
        await _sleep_unless(stop, min(HEALTH_POLL_S, deadline - loop.time()))


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))
    except asyncio.TimeoutError:
        pass


async def master_serving(
    address: str, credentials: grpc.ChannelCredentials | None, timeout_s: float = HEALTH_POLL_S
) -> bool:
    """Whether the master at `address` answers its health check with SERVING. A fresh channel
    each time: a long-lived one would wait out grpc's own reconnect backoff (up to 120 s)."""
    channel = _channel(address, credentials)
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s
        )
    except (grpc.aio.AioRpcError, asyncio.TimeoutError):
        return False
    finally:
        await channel.close()
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def _one_session(
    state: WorkerState,
    trainer: Trainer,
    address: str,
    stop: asyncio.Event,
    options: SessionOptions | None,
    credentials: grpc.ChannelCredentials | None,
    on_connected: Callable[[], object] | None,
    metadata: Sequence[tuple[str, str]] = (),
    observer: LinkObserver | None = None,
) -> SessionOutcome:
    channel = _channel(address, credentials)
    link: GrpcMasterLink | None = None
    try:
        call = pb_grpc.FLQStub(channel).Session(metadata=tuple(metadata))
        link = GrpcMasterLink(call)
        session_link: MasterLink = link if observer is None else _observed(link, observer)
        session = asyncio.create_task(
            run_session(state, trainer, session_link, options, on_connected)
        )
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if session in done:
            stopper.cancel()
            return session.result()
        session.cancel()
        await asyncio.gather(session, return_exceptions=True)
        return SessionOutcome(SessionEnd.SHUTDOWN, "worker stopping")
    finally:
        if observer is not None:
            observer.on_closed()
        if link is not None:
            await link.close()
        await channel.close()


def _channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS)
    return grpc.aio.secure_channel(address, credentials, options=CLIENT_OPTIONS)


def _observed(link: MasterLink, observer: LinkObserver) -> MasterLink:
    from flq.metrics import ObservedMasterLink  # prometheus_client: only when metrics are on

    return ObservedMasterLink(link, observer)
