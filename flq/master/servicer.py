"""The master's gRPC face: the Session stream and the admin RPCs.

Only this module (with serde and the worker's connection) touches gRPC objects. Each Session call
becomes a `GrpcWorkerLink`: one reader task per stream (grpc aio allows one reader per call), a
lock around writes, and the handler coroutine owns the stream's end — a rejection or close is
signalled to it, and it ends the call with the right status.

Authentication runs before any handler here, in the server's AuthInterceptor (flq/master/auth.py):
a Session whose token is wrong ends UNAUTHENTICATED, one whose token belongs to another worker
PERMISSION_DENIED, and an admin RPC without the admin token UNAUTHENTICATED. A Session bound to a
worker id rejects a Hello that claims any other id.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeAlias

import grpc
import structlog
from google.protobuf.message import DecodeError

from flq import serde
from flq.codec import EncodedTensor, group_chunks, split_tensors
from flq.link import (
    DownlinkPayload,
    LinkClosed,
    PayloadCache,
    ProtocolViolation,
    Received,
    ViolationCode,
)
from flq.master.auth import authenticated_worker
from flq.pb import flq_pb2 as pb
from flq.pb import flq_pb2_grpc as pb_grpc
from flq.types import MasterMessage, ModelChunk, StatusReply

# Requests and replies differ by RPC; strings, as grpc's runtime classes are not generic.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

log = structlog.get_logger("flq.master.servicer")
_sessions = itertools.count(1)


# A RoundStart's protobuf form and its size on the wire.
WireForm = tuple[pb.MasterMessage, int]


def _wire_form(message: MasterMessage) -> WireForm:
    proto = serde.master_message_to_proto(message)
    return proto, proto.ByteSize()


class MasterControl(Protocol):
    """What the servicer needs from the daemon."""

    async def serve_session(self, link: GrpcWorkerLink) -> None: ...

    def status(self) -> StatusReply: ...

    def request_stop(self, reason: str) -> int: ...

    def global_model(self) -> tuple[int, list[EncodedTensor]]: ...

    def count_rejected(self, reason: str) -> None: ...


class GrpcWorkerLink:
    """The master's end of one worker's Session stream."""

    def __init__(
        self,
        context: Context,
        control: MasterControl,
        identity: str | None = None,
        round_starts: PayloadCache[WireForm] | None = None,
    ) -> None:
        self._context = context
        self._control = control
        # Shared by the server's links: a round's payload is converted once for all workers.
        self._round_starts = round_starts or PayloadCache(_wire_form)
        self._session_id = f"s{next(_sessions)}"
        self._identity = identity  # the worker id the call authenticated as, if any
        self._worker_id = identity or ""
        self._inbox: asyncio.Queue[Received | None] = asyncio.Queue()
        self._write_lock = asyncio.Lock()
        self._ended = asyncio.Event()
        self.violation: ProtocolViolation | None = None
        self.peer = context.peer()

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def session_id(self) -> str:
        return self._session_id

    async def read_loop(self) -> None:
        """The stream's only reader: parse, check structure, queue."""
        try:
            while True:
                try:
                    request = await self._context.read()
                    if request is grpc.aio.EOF:
                        break
                    message = serde.worker_message_from_proto(request)
                except (serde.WireError, DecodeError) as error:
                    # DecodeError: grpc's aio server parses in read(); bytes that are no
                    # WorkerMessage at all raise there.
                    self._control.count_rejected("malformed")
                    await self.reject(
                        ProtocolViolation(ViolationCode.INVALID_ARGUMENT, _malformed(error))
                    )
                    break
                claimed = getattr(message, "worker_id", None)
                if self._identity is not None and claimed not in (None, self._identity):
                    self._control.count_rejected("permission_denied")
                    reason = f"authenticated as {self._identity!r}, Hello claims {claimed!r}"
                    await self.reject(ProtocolViolation(ViolationCode.PERMISSION_DENIED, reason))
                    break
                if not self._worker_id and hasattr(message, "worker_id"):
                    self._worker_id = message.worker_id
                await self._inbox.put(Received(message, request.ByteSize()))
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            await self._inbox.put(None)
            self._ended.set()

    async def send(self, message: MasterMessage) -> int:
        return await self._write([_wire_form(message)])

    async def send_payload(self, payload: DownlinkPayload) -> int:
        return await self._write(self._round_starts.get(payload))

    async def _write(self, forms: list[WireForm]) -> int:
        if self._ended.is_set():
            raise LinkClosed(f"session {self._session_id} ended")
        try:
            async with self._write_lock:  # a payload's parts go out back to back
                for proto, _ in forms:
                    await self._context.write(proto)
        except Exception as error:  # grpc raises several types once the peer is gone
            self._ended.set()
            raise LinkClosed(f"session {self._session_id}: write failed: {error}") from error
        return sum(size for _, size in forms)

    async def recv(self) -> Received:
        item = await self._inbox.get()
        if item is None:
            await self._inbox.put(None)
            raise LinkClosed(f"session {self._session_id} ended")
        return item

    async def reject(self, violation: ProtocolViolation) -> None:
        if self.violation is None:
            self.violation = violation
        self._ended.set()

    async def close(self) -> None:
        self._ended.set()

    async def wait_ended(self) -> None:
        await self._ended.wait()


def _malformed(error: Exception) -> str:
    if isinstance(error, DecodeError):
        return "message: the bytes are not a WorkerMessage protobuf"
    return str(error)


class FLQServicer(pb_grpc.FLQServicer):
    """The FLQ service. Every call reaching a method here passed the AuthInterceptor
    (flq/master/auth.py); a Session is bound to the worker id it authenticated as, if any."""

    def __init__(self, control: MasterControl) -> None:
        self._control = control
        # One cache for the server: every session of a round shares the payloads' conversion.
        self._round_starts: PayloadCache[WireForm] = PayloadCache(_wire_form)

    async def Session(
        self,
        request_iterator: object,
        context: Context,
    ) -> None:
        link = GrpcWorkerLink(context, self._control, authenticated_worker(), self._round_starts)
        reader = asyncio.create_task(link.read_loop())
        try:
            await self._control.serve_session(link)
        except ProtocolViolation as violation:
            await link.reject(violation)
        except LinkClosed:
            pass  # the peer left, or the reader rejected a malformed message (status below)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if link.violation is not None:
            log.error(
                "session rejected",
                peer=link.peer,
                worker=link.worker_id or "?",
                code=link.violation.code.value,
                reason=link.violation.reason,
            )
            await context.abort(grpc.StatusCode[link.violation.code.name], link.violation.reason)

    async def Status(
        self,
        request: pb.StatusRequest,
        context: Context,
    ) -> pb.StatusReply:
        return serde.status_reply_to_proto(self._control.status())

    async def Stop(
        self,
        request: pb.StopRequest,
        context: Context,
    ) -> pb.StopReply:
        round_id = self._control.request_stop(request.reason or "admin Stop RPC")
        return serde.stop_reply_to_proto(True, round_id)

    async def GetGlobalModel(
        self,
        request: pb.ModelRequest,
        context: Context,
    ) -> AsyncIterator[pb.ModelChunk]:
        round_id, encoded = self._control.global_model()
        for group in group_chunks(split_tensors(encoded)):
            yield serde.model_chunk_to_proto(ModelChunk(round_id, tuple(group)))
