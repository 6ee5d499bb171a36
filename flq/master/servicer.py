"""The master's gRPC face: the Session stream and the admin RPCs.

Only this module (with serde and the worker's connection) touches gRPC objects. Each Session call
becomes a `GrpcWorkerLink`: one reader task per stream (grpc aio allows one reader per call), a
lock around writes, and the handler coroutine owns the stream's end — a rejection or close is
signalled to it, and it ends the call with the right status.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Protocol

import grpc
import structlog

from flq import serde
from flq.codec import EncodedTensor, group_chunks, split_tensors
from flq.link import LinkClosed, ProtocolViolation, Received
from flq.pb import flq_pb2 as pb
from flq.pb import flq_pb2_grpc as pb_grpc
from flq.types import MasterMessage, ModelChunk, StatusReply

log = structlog.get_logger("flq.master.servicer")
_sessions = itertools.count(1)


class MasterControl(Protocol):
    """What the servicer needs from the daemon."""

    async def serve_session(self, link: GrpcWorkerLink) -> None: ...

    def status(self) -> StatusReply: ...

    def request_stop(self, reason: str) -> int: ...

    def global_model(self) -> tuple[int, list[EncodedTensor]]: ...

    def count_rejected(self, reason: str) -> None: ...


class GrpcWorkerLink:
    """The master's end of one worker's Session stream."""

    def __init__(self, context: grpc.aio.ServicerContext, control: MasterControl) -> None:
        self._context = context
        self._control = control
        self._session_id = f"s{next(_sessions)}"
        self._worker_id = ""
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
                request = await self._context.read()
                if request is grpc.aio.EOF:
                    break
                try:
                    message = serde.worker_message_from_proto(request)
                except serde.WireError as error:
                    self._control.count_rejected("malformed")
                    await self.reject(ProtocolViolation("INVALID_ARGUMENT", str(error)))
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
        if self._ended.is_set():
            raise LinkClosed(f"session {self._session_id} ended")
        proto = serde.master_message_to_proto(message)
        try:
            async with self._write_lock:
                await self._context.write(proto)
        except Exception as error:  # grpc raises several types once the peer is gone
            self._ended.set()
            raise LinkClosed(f"session {self._session_id}: write failed: {error}") from error
        return proto.ByteSize()

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


class FLQServicer(pb_grpc.FLQServicer):
    def __init__(self, control: MasterControl) -> None:
        self._control = control

    async def Session(
        self,
        request_iterator: object,
        context: grpc.aio.ServicerContext,
    ) -> None:
        link = GrpcWorkerLink(context, self._control)
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
                code=link.violation.code,
                reason=link.violation.reason,
            )
            await context.abort(
                getattr(grpc.StatusCode, link.violation.code), link.violation.reason
            )

    async def Status(
        self,
        request: pb.StatusRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.StatusReply:
        return serde.status_reply_to_proto(self._control.status())

    async def Stop(
        self,
        request: pb.StopRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.StopReply:
        round_id = self._control.request_stop(request.reason or "admin Stop RPC")
        return pb.StopReply(accepted=True, round=round_id)

    async def GetGlobalModel(
        self,
        request: pb.ModelRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelChunk]:
        round_id, encoded = self._control.global_model()
        for group in group_chunks(split_tensors(encoded)):
            yield serde.model_chunk_to_proto(ModelChunk(round_id, tuple(group)))
