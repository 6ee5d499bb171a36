"""Authentication as a gRPC server interceptor: every call of the FLQ service is checked before
its handler runs, so no handler has to remember to.

A Session needs a worker's credentials (token, and with mutual TLS a certificate whose common
name is the worker id); Status, Stop and GetGlobalModel need the admin token (flq/security.py
decides). A refused call is counted, logged (never the token) and ended with UNAUTHENTICATED or
PERMISSION_DENIED. The worker id a Session authenticated as reaches its handler through
`authenticated_worker()`. Other services (gRPC health) pass unchecked.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, TypeAlias

import grpc
import structlog

from flq.security import Authenticator, AuthResult

# Requests and replies differ by RPC; strings, as grpc's runtime classes are not generic.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

log = structlog.get_logger("flq.master.servicer")
SERVICE = "flq.v1.FLQ"
SESSION_RPC = "Session"
# A refused Session is read until the caller pauses this long, at most REFUSAL_DRAIN_S, before
# its status goes out (see _drain_briefly): long enough for a Hello in flight, too short for a
# flood to hold the call.
REFUSAL_PAUSE_S = 0.2
REFUSAL_DRAIN_S = 1.0

_worker: ContextVar[str | None] = ContextVar("flq_authenticated_worker", default=None)
Check = Callable[[Context], AuthResult]


def authenticated_worker() -> str | None:
    """The worker id the current Session call authenticated as (None: no identity bound)."""
    return _worker.get()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: Authenticator, count_refused: Callable[[str], None]) -> None:
        self._auth = auth
        self._count_refused = count_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        service, _, rpc = details.method.lstrip("/").rpartition("/")
        if handler is None or service != SERVICE:
            return handler
        check = self._check_worker if rpc == SESSION_RPC else self._check_admin
        return _guarded(handler, lambda context: self._admit(context, rpc, check))

    def _check_worker(self, context: Context) -> AuthResult:
        return self._auth.check_worker(_metadata(context), _cert_names(context))

    def _check_admin(self, context: Context) -> AuthResult:
        return self._auth.check_admin(_metadata(context))

    async def _admit(self, context: Context, rpc: str, check: Check) -> None:
        """Bind the call's identity, or count, log and end the call with the refusal's status."""
        result = check(context)
        if result.ok:
            _worker.set(result.worker_id)
            return
        self._count_refused(result.code.lower())
        log.warning(
            "call refused", rpc=rpc, peer=context.peer(), code=result.code, reason=result.reason
        )
        if rpc == SESSION_RPC:  # the only call whose requests stream in after the headers
            await _drain_briefly(context)
        await context.abort(getattr(grpc.StatusCode, result.code), result.reason)


def _guarded(
    handler: Handler,
    admit: Callable[[Context], Awaitable[None]],
) -> Handler:
    """`handler` with `admit` awaited before its behaviour, whatever its streaming kind."""

    def wrap(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behaviour):

            async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
                await admit(context)
                async for response in behaviour(request, context):
                    yield response

            return streaming

        async def single(request: Any, context: Context) -> Any:
            await admit(context)
            return await behaviour(request, context)

        return single

    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for kind, make in kinds.items():
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            return make(
                wrap(behaviour),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler


def _metadata(context: Context) -> dict[str, str]:
    return {
        key.lower(): value
        for key, value in (context.invocation_metadata() or ())
        if isinstance(value, str)
    }


def _cert_names(context: Context) -> list[str]:
    """Common names of the verified client certificate (mutual TLS), else []."""
    names = context.auth_context().get("x509_common_name", [])
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


async def _drain_briefly(context: Context) -> None:
    """Read (and drop) what a refused caller already sent, until it half-closes or pauses, for
    at most REFUSAL_DRAIN_S. gRPC's Python client reports a write that races with the call's end
    as INTERNAL and keeps that status instead of ours; a client that sends its Hello and then
    listens has its write finished before we answer, so it reads the refusal we sent."""

    async def drain() -> None:
        while await asyncio.wait_for(context.read(), REFUSAL_PAUSE_S) is not grpc.aio.EOF:
            pass

    try:
        await asyncio.wait_for(drain(), REFUSAL_DRAIN_S)
    except (asyncio.TimeoutError, grpc.aio.AioRpcError):
        pass
