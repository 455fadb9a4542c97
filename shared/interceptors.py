"""Server interceptors: errors to statuses plus the access log, and auth.

Both wrap the unary-unary behaviours of our services; health and reflection
pass through untouched (they are public). A method's handler is the same
object on every call, so each interceptor wraps it once and reuses the
wrapped handler (`_WrappedHandlers`): nothing is built per RPC but the call.
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


class _WrappedHandlers:
    """Wrapped handlers by method, rebuilt only if the inner handler changes."""

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler | None]] = {}

    def get(
        self,
        method: str,
        handler: grpc.RpcMethodHandler,
        build: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler | None],
    ) -> grpc.RpcMethodHandler | None:
        known = self._by_method.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = build(method, handler)
        self._by_method[method] = (handler, wrapped)
        return wrapped


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
        self._wrapped = _WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in self._public:
            return handler
        return self._wrapped.get(details.method, handler, self._wrap)  # type: ignore[return-value]

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
        # Undecodable bodies reach the wrapper as a marker, so they are
        # INVALID_ARGUMENT (the caller's fault) rather than grpc's INTERNAL.
        return _wrap_unary(
            handler,
            lambda inner: self._behaviour(method, inner),
            _lenient(handler.request_deserializer),
        )

    def _behaviour(self, method: str, inner: Behaviour) -> Behaviour:
        domain = self._domain
        # This method's metrics, labelled once.
        in_flight = RPCS_IN_FLIGHT.labels(method)
        seconds = RPC_SECONDS.labels(method)
        codes: dict[grpc.StatusCode, Any] = {}  # the RPCS counter by code

        async def behaviour(request: Any, context: ServicerContext) -> Any:
            started = time.monotonic()
            inbound_deadline.set(Deadline.from_caller(context.time_remaining()))
            code = grpc.StatusCode.OK
            in_flight.inc()
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
                status = to_rpc_status(error, domain)
                code = status.code
                await context.abort_with_status(status)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED  # deadline passed or caller went away
                raise
            except Exception as exc:
                log.exception(kv("unhandled_error", method=method))
                status = to_rpc_status(internal_error(exc), domain)
                code = status.code
                await context.abort_with_status(status)
            finally:
                duration_s = time.monotonic() - started
                in_flight.dec()
                counter = codes.get(code)
                if counter is None:
                    counter = codes[code] = RPCS.labels(method, code.name)
                counter.inc()
                seconds.observe(duration_s)
                # The access log, formatted only if emitted, as kv() would (a
                # method name has no spaces or quotes to escape).
                log.info(
                    "rpc method=%s code=%s duration_ms=%.1f", method, code.name, duration_s * 1000
                )

        return behaviour


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates the bearer token of every non-public RPC."""

    def __init__(
        self, tokens: Callable[[], TokenRegistry], public_methods: Collection[str]
    ) -> None:
        self._tokens = tokens
        self._public = frozenset(public_methods)
        self._wrapped = _WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in self._public:
            return handler
        return self._wrapped.get(details.method, handler, self._wrap)  # type: ignore[return-value]

    def _wrap(self, _method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler | None:
        return _wrap_unary(handler, self._behaviour)

    def _behaviour(self, inner: Behaviour) -> Behaviour:
        async def behaviour(request: Any, context: ServicerContext) -> Any:
            current_caller.set(self._tokens().authenticate(_bearer_token(context)))
            return await inner(request, context)

        return behaviour


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
