"""Server interceptors: errors to statuses plus the access log, and auth.

Both wrap the unary-unary behaviours of our services; health and reflection
pass through untouched (they are public).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc.aio import ServicerContext

from shared.auth import TokenRegistry, current_caller
from shared.deadline import Deadline, inbound_deadline
from shared.errors import ServiceError, Unauthenticated
from shared.logs import kv
from shared.status import internal_error, to_rpc_status

log = logging.getLogger("rpc")

Behaviour = Callable[[Any, ServicerContext], Awaitable[Any]]


@dataclass
class RpcRecord:
    """What the access log line says about the RPC being served."""

    method: str
    started: float = field(default_factory=time.monotonic)
    caller: str | None = None


current_rpc: ContextVar[RpcRecord | None] = ContextVar("current_rpc", default=None)


def _wrap_unary(
    handler: grpc.RpcMethodHandler | None, wrap: Callable[[Behaviour], Behaviour]
) -> grpc.RpcMethodHandler | None:
    if handler is None or handler.unary_unary is None:
        return handler
    return grpc.unary_unary_rpc_method_handler(
        wrap(handler.unary_unary),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Turns typed errors into statuses (one place) and logs every RPC.

    It also records the caller's deadline in `inbound_deadline`, so that the
    client helpers can pass what is left of it to the services they call.
    """

    def __init__(self, domain: str, public_methods: Collection[str]) -> None:
        self._domain = domain
        self._public = frozenset(public_methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method in self._public:
            return handler
        method = details.method

        def wrap(inner: Behaviour) -> Behaviour:
            async def behaviour(request: Any, context: ServicerContext) -> Any:
                record = RpcRecord(method)
                current_rpc.set(record)
                inbound_deadline.set(Deadline.from_caller(context.time_remaining()))
                code = grpc.StatusCode.OK
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise  # the RPC already ended with a status
                except ServiceError as error:
                    status = to_rpc_status(error, self._domain)
                    code = status.code
                    await context.abort_with_status(status)
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED  # deadline passed or caller went away
                    raise
                except Exception as exc:
                    log.exception(kv("unhandled_error", method=method))
                    status = to_rpc_status(internal_error(exc), self._domain)
                    code = status.code
                    await context.abort_with_status(status)
                finally:
                    log.info(
                        kv(
                            "rpc",
                            method=method,
                            caller=record.caller,
                            code=code.name,
                            duration_ms=(time.monotonic() - record.started) * 1000,
                        )
                    )

            return behaviour

        return _wrap_unary(handler, wrap)  # type: ignore[return-value]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates the bearer token of every non-public RPC."""

    def __init__(
        self, tokens: Callable[[], TokenRegistry], public_methods: Collection[str]
    ) -> None:
        self._tokens = tokens
        self._public = frozenset(public_methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method in self._public:
            return handler

        def wrap(inner: Behaviour) -> Behaviour:
            async def behaviour(request: Any, context: ServicerContext) -> Any:
                caller = self._tokens().authenticate(_bearer_token(context))
                record = current_rpc.get()
                if record is not None:
                    record.caller = caller.name
                current_caller.set(caller)
                return await inner(request, context)

            return behaviour

        return _wrap_unary(handler, wrap)  # type: ignore[return-value]


def _bearer_token(context: ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            break
    raise Unauthenticated(
        "missing credentials: send 'authorization: Bearer <token>'", reason="MISSING_CREDENTIALS"
    )
