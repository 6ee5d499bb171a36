"""The admin client: the master's Status, Stop and GetGlobalModel RPCs as a library.

`flq status`, `flq stop` and `flq model pull` (flq/cli/admin.py) are thin commands over it, and
tests and scripts use it the same way. Like the worker connection it is a gRPC edge: requests and
replies cross serde, callers see domain types. gRPC failures become AdminError subclasses whose
message names the master's address and whose exit code says what went wrong (flq/errors.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from flq.errors import FlqError, Refused, Unreachable

if TYPE_CHECKING:
    import grpc
    import numpy as np

    from flq.security import ClientTls
    from flq.types import StatusReply

T = TypeVar("T")
ADMIN_TOKEN_ENV = "FLQ_ADMIN_TOKEN"


class AdminError(FlqError):
    """An admin call failed; the message names the master's address."""


class MasterUnreachable(AdminError, Unreachable):
    pass


class AccessRefused(AdminError, Refused):
    pass


@dataclass(frozen=True)
class AdminTarget:
    """Where the master is and how to prove who we are."""

    address: str
    tls: ClientTls | None = None
    token: str | None = None
    timeout_s: float = 10.0


class AdminClient:
    """The admin RPCs over one channel; gRPC failures become AdminError subclasses."""

    def __init__(self, target: AdminTarget, channel: grpc.aio.Channel) -> None:
        from flq.pb import flq_pb2_grpc as pb_grpc
        from flq.security import admin_metadata

        self.target = target
        self._stub = pb_grpc.FLQStub(channel)
        self._metadata = admin_metadata(target.token)

    async def status(self) -> StatusReply:
        from flq import serde

        reply = await self._call(
            self._stub.Status(
                serde.status_request(), metadata=self._metadata, timeout=self.target.timeout_s
            )
        )
        return serde.status_reply_from_proto(reply)

    async def stop(self, reason: str) -> tuple[bool, int]:
        """Ask the master to stop after this round: (accepted, last completed round)."""
        from flq import serde

        reply = await self._call(
            self._stub.Stop(
                serde.stop_request(reason),
                metadata=self._metadata,
                timeout=self.target.timeout_s,
            )
        )
        return serde.stop_reply_from_proto(reply)

    async def model(self) -> tuple[int, list[np.ndarray]]:
        """The global model's round and float32 weights."""
        from flq import serde
        from flq.codec import Reassembler, decode

        async def collect() -> tuple[int, list[np.ndarray]]:
            call = self._stub.GetGlobalModel(
                serde.model_request(), metadata=self._metadata, timeout=self.target.timeout_s
            )
            reassembler = Reassembler()
            round_id = 0
            async for message in call:
                chunk = serde.model_chunk_from_proto(message)
                round_id = chunk.round
                for tensor in chunk.tensors:
                    reassembler.add(tensor)
            return round_id, [decode(e) for e in reassembler.finish()]

        return await self._call(collect())

    async def _call(self, pending: Awaitable[T]) -> T:
        import grpc

        try:
            return await pending
        except grpc.aio.AioRpcError as error:
            raise _admin_error(self.target.address, error.code(), error.details()) from None


def _admin_error(address: str, code: grpc.StatusCode, details: str | None) -> AdminError:
    import grpc

    text = f"{code.name}: {details or 'no details'}"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return MasterUnreachable(f"cannot reach the master at {address} ({text})")
    if code == grpc.StatusCode.CANCELLED:
        # We never cancel our own calls: the master ended it, as its server does to calls in
        # flight while it stops (`flq stop --wait` polls right through that moment).
        return MasterUnreachable(f"the master at {address} ended the call, stopping ({text})")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AccessRefused(
            f"the master at {address} refused the request ({text}); pass --admin-token-file "
            f"or set {ADMIN_TOKEN_ENV}"
        )
    return AdminError(f"the master at {address} answered {text}")


@asynccontextmanager
async def admin_client(target: AdminTarget) -> AsyncIterator[AdminClient]:
    """A client on its own channel (TLS when the target has it), closed on exit."""
    import grpc

    from flq.grpc_options import CLIENT_OPTIONS
    from flq.security import channel_credentials

    channel = (
        grpc.aio.secure_channel(target.address, channel_credentials(target.tls), CLIENT_OPTIONS)
        if target.tls is not None
        else grpc.aio.insecure_channel(target.address, CLIENT_OPTIONS)
    )
    try:
        yield AdminClient(target, channel)
    finally:
        await channel.close()


def run_admin(target: AdminTarget, action: Callable[[AdminClient], Awaitable[T]]) -> T:
    """Run `action` with a client in a fresh event loop (for synchronous callers)."""

    async def main() -> T:
        async with admin_client(target) as client:
            return await action(client)

    return asyncio.run(main())
