"""The transport seam: how the round engine and a worker session reach each other.

The master's round engine sees each worker as a `WorkerLink`; a worker session sees the master
as a `MasterLink`. Two implementations exist: gRPC streams (flq/master/servicer.py and
flq/worker/connection.py) and in-memory queues (flq/memlink.py, for `flq simulate` and tests).
Messages are domain objects (flq.types); each link converts at its edge and reports the bytes the
message takes on the wire, so byte accounting is identical over both transports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, Literal, Protocol, TypeVar

from flq.types import MasterMessage, RoundStart, WorkerMessage

T = TypeVar("T")


class LinkClosed(Exception):
    """The other side went away (stream ended, connection lost, session replaced)."""


class ViolationCode(str, Enum):
    """The status a refused session ends with; the names are grpc.StatusCode's, so the gRPC
    transport maps them one to one and the in-memory transport reports the same."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # a malformed or out-of-protocol message
    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # wrong order, version or reference
    PERMISSION_DENIED = "PERMISSION_DENIED"  # a message claims another worker's identity
    UNIMPLEMENTED = "UNIMPLEMENTED"  # a protocol version this master does not speak
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # no Hello in time
    UNAVAILABLE = "UNAVAILABLE"  # the master is not accepting sessions now


# Begins the reason of a Hello refused for its model; the worker's connection reads it as final
# (retrying cannot change the model a board holds).
MODEL_MISMATCH = "model architecture differs"


class ProtocolViolation(Exception):
    """A peer broke the protocol; the session ends with a clear status and changes nothing."""

    def __init__(self, code: ViolationCode, reason: str) -> None:
        self.code = ViolationCode(code)  # a plain name is accepted, an unknown one is a bug
        self.reason = reason
        super().__init__(f"{self.code.value}: {reason}")


@dataclass(frozen=True)
class Received:
    """A message and the bytes it took on the wire."""

    message: WorkerMessage
    wire_bytes: int


@dataclass(frozen=True)
class ReceivedByWorker:
    message: MasterMessage
    wire_bytes: int


@dataclass(frozen=True, eq=False)
class DownlinkPayload:
    """One encoding of a round's model (the b_down delta, a catch-up chain of deltas, or the
    float32 keyframe) as the RoundStart messages that carry it. Every worker that needs this
    encoding is sent these same messages, so a transport converts or measures them once per
    round (`PayloadCache`)."""

    round: int
    kind: Literal["delta", "keyframe"]
    version: int  # the downlink reference version a worker holds once it applied the payload
    # The version a worker must hold to apply it (-1: a keyframe, applied on any): the shared
    # delta starts at version - 1, a catch-up chain further back.
    base_version: int
    messages: tuple[RoundStart, ...]
    bits: int  # cost of the encoded tensors (packed bits + headers)


class PayloadCache(Generic[T]):
    """A transport's wire form of each message of a round's payloads, built on first use and
    kept for that round only. One per transport instance (a gRPC server, a simulation), shared
    by its links, so that every worker of a round reuses the first one's conversion."""

    def __init__(self, build: Callable[[RoundStart], T]) -> None:
        self._build = build
        self._round = -1
        self._forms: dict[tuple[str, int, int], list[T]] = {}

    def get(self, payload: DownlinkPayload) -> list[T]:
        if payload.round != self._round:
            self._round, self._forms = payload.round, {}
        key = (payload.kind, payload.version, payload.base_version)
        forms = self._forms.get(key)
        if forms is None:
            forms = self._forms[key] = [self._build(m) for m in payload.messages]
        return forms


class WorkerLink(Protocol):
    """The master's end of one worker's session."""

    @property
    def worker_id(self) -> str: ...

    @property
    def session_id(self) -> str: ...

    async def send(self, message: MasterMessage) -> int:
        """Send one message; returns its size on the wire. Raises LinkClosed."""
        ...

    async def send_payload(self, payload: DownlinkPayload) -> int:
        """Send a round's downlink messages; returns their size on the wire. Raises LinkClosed."""
        ...

    async def recv(self) -> Received:
        """The next message from the worker. Raises LinkClosed."""
        ...

    async def reject(self, violation: ProtocolViolation) -> None:
        """End the session because of a protocol violation (the worker sees the status)."""
        ...

    async def close(self) -> None:
        """End the session without an error (after a Shutdown, or when replaced)."""
        ...


class SessionLink(WorkerLink, Protocol):
    """A WorkerLink whose end can be awaited, so the registry can forget it once it is over:
    the gRPC stream (GrpcWorkerLink), an in-memory or a Ray simulated worker's session."""

    async def wait_ended(self) -> None: ...


class MasterLink(Protocol):
    """A worker's end of its session with the master."""

    async def send(self, message: WorkerMessage) -> int: ...

    async def recv(self) -> ReceivedByWorker: ...
