"""The worker's gRPC side: one Session stream to the master, and reconnecting when it drops.

Reconnects use exponential backoff with full jitter (sleep a uniform draw from [0, min(cap,
base * 2^attempt)]) so a hundred boards that lost the master at once do not come back in lockstep.
The attempt counter resets once a session got as far as the master's Welcome. Non-transient status
codes (wrong credentials, a protocol version the master does not speak) end the worker instead:
retrying cannot fix them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import structlog

from flq import serde
from flq.grpc_options import CLIENT_OPTIONS
from flq.link import LinkClosed, MasterLink, ReceivedByWorker
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


class FatalConnectionError(RuntimeError):
    """The master refused us for a reason retrying cannot fix."""


@dataclass(frozen=True)
class Backoff:
    base_s: float = 0.5
    cap_s: float = 30.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        return rand() * min(self.cap_s, self.base_s * (2.0**attempt))


class GrpcMasterLink:
    """The worker's end of a Session call: one reader task, serialized writes."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call
        self._inbox: asyncio.Queue[ReceivedByWorker | BaseException | None] = asyncio.Queue()
        self._write_lock = asyncio.Lock()
        self._reader = asyncio.create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                response = await self._call.read()
                if response is grpc.aio.EOF:
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
        if code in FATAL_CODES:
            raise FatalConnectionError(f"{code.name}: {await self._call.details()}")

    async def recv(self) -> ReceivedByWorker:
        item = await self._inbox.get()
        if isinstance(item, ReceivedByWorker):
            return item
        await self._inbox.put(item)  # keep later readers failing the same way
        if isinstance(item, grpc.aio.AioRpcError):
            if item.code() in FATAL_CODES:
                raise FatalConnectionError(f"{item.code().name}: {item.details()}")
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
    on_connected: Callable[[], None] | None = None,
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
        delay = max(outcome.reconnect_after_s, policy.delay(attempt))
        attempt += 1
        log.info("reconnecting", reason=outcome.reason, delay_s=round(delay, 2), attempt=attempt)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass
    return SessionOutcome(SessionEnd.SHUTDOWN, "stopped")


async def _one_session(
    state: WorkerState,
    trainer: Trainer,
    address: str,
    stop: asyncio.Event,
    options: SessionOptions | None,
    credentials: grpc.ChannelCredentials | None,
    on_connected: Callable[[], None] | None,
    metadata: Sequence[tuple[str, str]] = (),
    observer: LinkObserver | None = None,
) -> SessionOutcome:
    channel = (
        grpc.aio.secure_channel(address, credentials, options=CLIENT_OPTIONS)
        if credentials is not None
        else grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS)
    )
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


def _observed(link: MasterLink, observer: LinkObserver) -> MasterLink:
    from flq.metrics import ObservedMasterLink  # prometheus_client: only when metrics are on

    return ObservedMasterLink(link, observer)
