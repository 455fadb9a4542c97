"""Server interceptors: errors to statuses plus the access log, and auth.

Both wrap the unary-unary behaviours of our services; health and reflection
pass through untouched (they are public).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import grpc
from grpc.aio import ServicerContext

from shared.auth import TokenRegistry, current_caller
from shared.deadline import Deadline, inbound_deadline
from shared.errors import InvalidArgument, ServiceError, Unauthenticated
from shared.logs import kv
from shared.metrics import RPC_SECONDS, RPCS, RPCS_IN_FLIGHT
from shared.status import internal_error, to_rpc_status

log = logging.getLogger("rpc")

Behaviour = Callable[[Any, ServicerContext], Awaitable[Any]]


def _wrap_unary(
    handler: grpc.RpcMethodHandler | None,
    wrap: Callable[[Behaviour], Behaviour],
    deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler | None:
    if handler is None or handler.unary_unary is None:
        return handler
    return grpc.unary_unary_rpc_method_handler(
        wrap(handler.unary_unary),
        request_deserializer=deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


@dataclass(frozen=True)
class _Undecodable:
    """A request body that is not a valid message (grpc would answer INTERNAL)."""

    error: str


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, invalid UTF-8 in a string field, ...
            return _Undecodable(type(exc).__name__)

    return parse


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
                started = time.monotonic()
                inbound_deadline.set(Deadline.from_caller(context.time_remaining()))
                code = grpc.StatusCode.OK
                RPCS_IN_FLIGHT.labels(method).inc()
                try:
                    if isinstance(request, _Undecodable):
                        raise InvalidArgument(
                            "request body is not a valid message",
                            field="request",
                            reason="MALFORMED_REQUEST",
                        )
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
                    duration_s = time.monotonic() - started
                    RPCS_IN_FLIGHT.labels(method).dec()
                    RPCS.labels(method, code.name).inc()
                    RPC_SECONDS.labels(method).observe(duration_s)
                    log.info(
                        kv(
                            "rpc",
                            method=method,
                            code=code.name,
                            duration_ms=duration_s * 1000,
                        )
                    )

            return behaviour

        # Undecodable bodies reach the wrapper as a marker, so they are
        # INVALID_ARGUMENT (the caller's fault) rather than grpc's INTERNAL.
        deserializer = _lenient(handler.request_deserializer) if handler else None
        return _wrap_unary(handler, wrap, deserializer)  # type: ignore[return-value]


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
                current_caller.set(self._tokens().authenticate(_bearer_token(context)))
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
