"""In-memory transport: a pair of queues standing in for one gRPC stream.

Used by `flq simulate` and the engine's unit tests (and inside each Ray actor of
`flq simulate --ray`, flq/raysim.py). Messages stay domain objects, but each one's
wire size is measured through serde exactly as the gRPC transport measures it, so bits and bytes
in a simulation equal what the daemons would put on the wire.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from flq import serde
from flq.link import (
    DownlinkPayload,
    LinkClosed,
    PayloadCache,
    ProtocolViolation,
    Received,
    ReceivedByWorker,
)
from flq.types import MasterMessage, WorkerMessage

T = TypeVar("T")
_session_numbers = itertools.count(1)


@dataclass
class Pipe(Generic[T]):
    """One direction: a queue plus a closed flag, so a late send fails instead of vanishing."""

    queue: asyncio.Queue[tuple[T | None, int]] = field(default_factory=asyncio.Queue)
    closed: bool = False
    violation: ProtocolViolation | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set by close()

    def put(self, item: T, size: int) -> None:
        if self.closed:
            raise LinkClosed("memory link closed")
        self.queue.put_nowait((item, size))

    def close(self, violation: ProtocolViolation | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.violation = violation
            self.queue.put_nowait((None, 0))  # None: the end (messages are never None)
            self.ended.set()

    async def get(self) -> tuple[T, int]:
        item, size = await self.queue.get()
        if item is None:
            self.queue.put_nowait((None, 0))  # keep later readers failing too
            if self.violation is not None:
                raise LinkClosed(f"session ended by master: {self.violation}")
            raise LinkClosed("memory link closed")
        return item, size

    def get_ready(self) -> list[tuple[T, int]]:
        """The items queued now, without waiting (a batch to relay in one call)."""
        ready: list[tuple[T, int]] = []
        while not self.queue.empty():
            item, size = self.queue.get_nowait()
            if item is None:
                self.queue.put_nowait((None, 0))  # the end stays for the next get()
                break
            ready.append((item, size))
        return ready


class MemoryWorkerLink:
    """The master's end."""

    def __init__(
        self,
        worker_id: str,
        to_worker: Pipe[MasterMessage],
        to_master: Pipe[WorkerMessage],
        round_start_sizes: PayloadCache[int],
    ) -> None:
        self._worker_id = worker_id
        self._round_start_sizes = round_start_sizes
        self._session_id = f"mem-{next(_session_numbers)}"
        self._to_worker = to_worker
        self._to_master = to_master
        self.violations: list[ProtocolViolation] = []

    @property
    def worker_id(self) -> str:
        return self._worker_id

    @property
    def session_id(self) -> str:
        return self._session_id

    async def send(self, message: MasterMessage) -> int:
        size = wire_size(message)
        self._to_worker.put(message, size)
        return size

    async def send_payload(self, payload: DownlinkPayload) -> int:
        sizes = self._round_start_sizes.get(payload)
        for message, size in zip(payload.messages, sizes, strict=True):
            self._to_worker.put(message, size)
        return sum(sizes)

    async def recv(self) -> Received:
        item, size = await self._to_master.get()
        return Received(item, size)

    async def reject(self, violation: ProtocolViolation) -> None:
        self.violations.append(violation)
        self._to_worker.close(violation)
        self._to_master.close()

    async def close(self) -> None:
        self._to_worker.close()
        self._to_master.close()

    async def wait_ended(self) -> None:
        """Until the worker's side is closed (its session ended) or the master closed it."""
        await self._to_master.ended.wait()


class MemoryMasterLink:
    """The worker's end."""

    def __init__(self, to_worker: Pipe[MasterMessage], to_master: Pipe[WorkerMessage]) -> None:
        self._to_worker = to_worker
        self._to_master = to_master

    async def send(self, message: WorkerMessage) -> int:
        size = serde.worker_message_to_proto(message).ByteSize()
        self._to_master.put(message, size)
        return size

    async def recv(self) -> ReceivedByWorker:
        item, size = await self._to_worker.get()
        return ReceivedByWorker(item, size)

    def close(self) -> None:
        self._to_master.close()
        self._to_worker.close()


def wire_size(message: MasterMessage) -> int:
    """The bytes `message` takes on the wire (what the gRPC transport would send)."""
    return serde.master_message_to_proto(message).ByteSize()


def memory_link_pair(
    worker_id: str, round_start_sizes: PayloadCache[int] | None = None
) -> tuple[MemoryWorkerLink, MemoryMasterLink]:
    """Both ends of one in-memory session. Pass the links of one simulation the same
    `round_start_sizes` so that a round's payload is measured once, not once per worker."""
    to_worker: Pipe[MasterMessage] = Pipe()
    to_master: Pipe[WorkerMessage] = Pipe()
    sizes = round_start_sizes if round_start_sizes is not None else PayloadCache(wire_size)
    return (
        MemoryWorkerLink(worker_id, to_worker, to_master, sizes),
        MemoryMasterLink(to_worker, to_master),
    )
