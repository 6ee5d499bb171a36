"""A raw Session client that misbehaves on purpose.

It speaks the wire itself (flq/pb, with serde for the well-formed messages), so it can send what
no real worker would: nothing at all, a flood, a granted upload of huge finite values or in the
wrong codec, bytes that are not protobuf. Each behaviour returns what the master answered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import numpy as np

from flq import serde
from flq.algorithm.modes import encode_upload
from flq.codec import EncodedTensor, encode_float32, group_chunks, split_tensors
from flq.pb import flq_pb2 as pb
from flq.security import worker_metadata
from flq.types import (
    PROTOCOL_VERSION,
    Decision,
    Heartbeat,
    Hello,
    MasterMessage,
    RoundStart,
    UpdateChunk,
    UploadOffer,
    Welcome,
    WorkerMessage,
)

SESSION_METHOD = "/flq.v1.FLQ/Session"
HUGE = 1e38  # finite in float32 (max 3.4e38); the LAQ grid decodes it to values in [-1e38, 1e38]
GARBAGE = b"\xff\xfe\x00not a protobuf\x07\x07\x07\xff"


@dataclass
class AdversaryResult:
    behaviour: str
    worker_id: str
    code: str = ""  # the call's final status; CANCELLED when we hung up first
    details: str = ""
    grants: int = 0  # uploads the master granted us
    bad_uploads: int = 0  # bad payloads sent after a grant
    messages: int = 0  # messages sent in all


def _serialize(message: pb.WorkerMessage | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


class RawSession:
    """One Session call, messages sent and read by hand."""

    def __init__(self, address: str, worker_id: str, result: AdversaryResult) -> None:
        self.worker_id = worker_id
        self.result = result
        self._channel = grpc.aio.insecure_channel(address)
        method = self._channel.stream_stream(
            SESSION_METHOD,
            request_serializer=_serialize,
            response_deserializer=pb.MasterMessage.FromString,
        )
        self._call = method(metadata=worker_metadata(worker_id, None))
        self._write_lock = asyncio.Lock()

    async def send(self, message: WorkerMessage | bytes) -> None:
        wire = message if isinstance(message, bytes) else serde.worker_message_to_proto(message)
        async with self._write_lock:
            await self._call.write(wire)
        self.result.messages += 1

    async def recv(self) -> MasterMessage | None:
        """The next message, or None when the call has ended."""
        response = await self._call.read()
        if response is grpc.aio.EOF:
            return None
        return serde.master_message_from_proto(response)

    async def hello(self) -> Welcome:
        await self.send(Hello(self.worker_id, PROTOCOL_VERSION, num_samples=64))
        welcome = await self.recv()
        if not isinstance(welcome, Welcome):
            raise RuntimeError(f"expected Welcome, got {welcome!r}")
        return welcome

    async def round_start(self) -> RoundStart | None:
        """The last part of the next RoundStart (its tensors carry the model's shapes)."""
        while True:
            message = await self.recv()
            if message is None:
                return None
            if isinstance(message, RoundStart) and message.part == message.parts - 1:
                return message

    async def finish(self, wait_s: float) -> None:
        """Wait up to `wait_s` for the master to end the call, then hang up; record the status."""
        try:
            code = await asyncio.wait_for(self._call.code(), wait_s)
        except asyncio.TimeoutError:
            self._call.cancel()
            code = await self._call.code()
        self.result.code = code.name
        self.result.details = await self._call.details() or ""
        await self._channel.close()


def _shapes(start: RoundStart) -> list[tuple[int, ...]]:
    by_index = {chunk.tensor_index: tuple(chunk.shape) for chunk in start.tensors}
    return [by_index[i] for i in sorted(by_index)]


def huge_upload(shapes: list[tuple[int, ...]]) -> list[EncodedTensor]:
    """A well-formed bbit upload whose values are all +-1e38: finite, and ruinous if summed."""
    rng = np.random.default_rng(0)
    return [
        encode_upload("bbit", np.where(rng.random(s) < 0.5, -HUGE, HUGE), 4, rng) for s in shapes
    ]


def wrong_codec_upload(shapes: list[tuple[int, ...]]) -> list[EncodedTensor]:
    """Modest values in float32, where the bbit mode sends the LAQ grid."""
    return [encode_float32(np.full(s, 0.01, np.float32)) for s in shapes]


async def _offer_and_upload(
    session: RawSession, bad: Callable[[list[tuple[int, ...]]], list[EncodedTensor]]
) -> None:
    """Take part in rounds: always offer, and answer a grant with a bad payload."""
    while True:
        start = await session.round_start()
        if start is None:
            return
        payload = bad(_shapes(start))
        await session.send(
            UploadOffer(
                start.round,
                wants_upload=True,
                cost_bits=sum(e.cost_bits() for e in payload),
                energy=1e30,
                clock=0,
                forced=True,
                num_samples=64,
            )
        )
        decision = await session.recv()
        while decision is not None and not isinstance(decision, Decision):
            decision = await session.recv()
        if decision is None:
            return
        if not decision.granted:
            continue
        session.result.grants += 1
        for group in group_chunks(split_tensors(payload)):
            await session.send(
                UpdateChunk(start.round, decision.upload_ref_version - 1, tuple(group))
            )
        session.result.bad_uploads += 1


async def _lazy_rounds(session: RawSession) -> None:
    """Answer every round with an offer that does not want to upload."""
    while True:
        start = await session.round_start()
        if start is None:
            return
        await session.send(UploadOffer(start.round, False, 0, 0.0, 0, False, num_samples=64))


async def _heartbeats(session: RawSession) -> None:
    while True:
        await session.send(Heartbeat(0, "training", 0.0))


async def silent(session: RawSession, hold_s: float) -> None:
    """Hello, then nothing: connected but silent for `hold_s`."""
    await session.hello()
    await asyncio.sleep(hold_s)


async def flood(session: RawSession, hold_s: float) -> None:
    """Answer rounds (lazily) while writing heartbeats as fast as the stream takes them."""
    await session.hello()
    tasks = [asyncio.create_task(_lazy_rounds(session)), asyncio.create_task(_heartbeats(session))]
    try:
        await asyncio.wait(tasks, timeout=hold_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def huge(session: RawSession, hold_s: float) -> None:
    """Offer every round and upload +-1e38 when granted."""
    await session.hello()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_offer_and_upload(session, huge_upload), hold_s)


async def wrong_codec(session: RawSession, hold_s: float) -> None:
    """Offer every round and upload float32 where the mode sends the LAQ grid."""
    await session.hello()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_offer_and_upload(session, wrong_codec_upload), hold_s)


async def garbage(session: RawSession, hold_s: float) -> None:
    """Hello, then bytes that are not a WorkerMessage in the middle of a round."""
    await session.hello()
    if await session.round_start() is not None:
        await session.send(GARBAGE)


BEHAVIOURS: dict[str, Callable[[RawSession, float], Awaitable[None]]] = {
    "silent": silent,
    "flood": flood,
    "huge": huge,
    "wrong_codec": wrong_codec,
    "garbage": garbage,
}


async def misbehave(behaviour: str, address: str, worker_id: str, hold_s: float) -> AdversaryResult:
    """Run one behaviour on a fresh Session; errors of the call itself end up in the result."""
    result = AdversaryResult(behaviour, worker_id)
    session = RawSession(address, worker_id, result)
    try:
        await BEHAVIOURS[behaviour](session, hold_s)
    except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError, RuntimeError):
        pass  # the master ended the call (or never welcomed us): its status is read below
    await session.finish(wait_s=5.0 if behaviour == "garbage" else 0.5)
    return result
