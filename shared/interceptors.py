"""The server boundary: where every RPC enters, whatever its handler kind.

`RpcBoundary` is the one server interceptor. For each method it looks up the
access table (`shared.auth.METHOD_ACCESS`):

- a public method (health, reflection) passes through untouched;
- a method missing from the table is refused with UNIMPLEMENTED, with or
  without a token (see `RpcBoundary`);
- any other method is wrapped, for all four handler kinds (unary-unary,
  unary-stream, stream-unary, stream-stream). Per call the wrapper builds the
  RPC's one `Deadline` (the caller's, else the service's default),
  authenticates the bearer token, checks the method's scope, publishes the
  admitted RPC (`shared.inbound_rpc`), takes a slot of the method's
  concurrency limit (`shared.admission`: RESOURCE_EXHAUSTED at once when the
  call cannot be served in time), runs the handler, turns typed errors
  into statuses (`shared.status`, the one mapping), and records metrics and
  the access log line.

A method's handler is the same object on every call, so the wrapped handler is
built once per method and reused: nothing is built per RPC but the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from grpc.aio import ServicerContext

from shared.admission import Admission, ConcurrencyLimit, ServiceTime
from shared.auth import MethodAccess, TokenRegistry
from shared.deadline import Deadline
from shared.errors import InvalidArgument, ServiceError, Unauthenticated, Unimplemented
from shared.inbound_rpc import INBOUND_RPC, InboundRpc
from shared.logs import kv
from shared.metrics import RPC_SECONDS, RPCS, RPCS_IN_FLIGHT
from shared.status import internal_error, to_rpc_status

log = logging.getLogger("rpc")

# The deadline for a method of a service that did not declare its default
# (every Service passed to create_server declares one).
FALLBACK_DEFAULT_DEADLINE_S = 10.0

Behaviour = Callable[[Any, ServicerContext], Any]


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


def _reject_undecodable(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(
            "request body is not a valid message", field="request", reason="MALFORMED_REQUEST"
        )


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


@dataclass
class _Call:
    """One call of a wrapped method: when it started and how it ended."""

    started: float = field(default_factory=time.monotonic)
    code: grpc.StatusCode = grpc.StatusCode.OK


class _MethodBoundary:
    """The boundary of one method: its access rule, default deadline and metrics."""

    def __init__(
        self,
        method: str,
        access: MethodAccess | None,
        default_deadline_s: float,
        tokens: Callable[[], TokenRegistry],
        domain: str,
        limit: ConcurrencyLimit,
    ) -> None:
        self._method = method
        self._access = access
        self._default_deadline_s = default_deadline_s
        self._tokens = tokens
        self._domain = domain
        self._limit = limit
        self._service_time = ServiceTime()
        # This method's metrics, labelled once.
        self._in_flight = RPCS_IN_FLIGHT.labels(method)
        self._seconds = RPC_SECONDS.labels(method)
        self._by_code: dict[grpc.StatusCode, Any] = {}  # the RPCS counter by code

    def _admit(self, context: ServicerContext) -> Deadline:
        """Refuse, or publish the admitted RPC with its one deadline (returned)."""
        deadline = Deadline.from_time_remaining(context.time_remaining(), self._default_deadline_s)
        if self._access is None:
            raise Unimplemented(
                f"method {self._method} is not served",
                reason="METHOD_NOT_SERVED",
                metadata={"method": self._method},
            )
        caller = self._tokens().authenticate(_bearer_token(context))
        if self._access.scope is not None:
            caller.require_scope(self._access.scope)
        INBOUND_RPC.set(InboundRpc(self._method, caller, deadline))
        return deadline

    @contextlib.asynccontextmanager
    async def _slot(self, deadline: Deadline) -> AsyncIterator[None]:
        """Hold a slot of the method's concurrency limit (or be refused), and
        time the call for the method's service time."""
        await self._limit.acquire(self._method, self._service_time, deadline)
        began = time.monotonic()
        try:
            yield
        finally:
            self._limit.release()
            self._service_time.observe(time.monotonic() - began)

    def _begin(self) -> _Call:
        self._in_flight.inc()
        return _Call()

    async def _fail(self, call: _Call, exc: BaseException, context: ServicerContext) -> NoReturn:
        """End the call with the status `exc` stands for (always raises)."""
        if isinstance(exc, grpc.aio.AbortError):
            call.code = context.code() or grpc.StatusCode.UNKNOWN
            raise exc  # the RPC already ended with a status
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            call.code = grpc.StatusCode.CANCELLED  # deadline passed or caller went away
            raise exc
        if isinstance(exc, ServiceError):
            status = to_rpc_status(exc, self._domain)
        elif isinstance(exc, Exception):
            log.exception(kv("unhandled_error", method=self._method), exc_info=exc)
            status = to_rpc_status(internal_error(exc), self._domain)
        else:
            raise exc  # KeyboardInterrupt, SystemExit
        call.code = status.code
        await context.abort_with_status(status)
        raise AssertionError("abort_with_status returned")  # it raises AbortError

    def _end(self, call: _Call) -> None:
        duration_s = time.monotonic() - call.started
        self._in_flight.dec()
        counter = self._by_code.get(call.code)
        if counter is None:
            counter = self._by_code[call.code] = RPCS.labels(self._method, call.code.name)
        counter.inc()
        self._seconds.observe(duration_s)
        # The access log, formatted only if emitted, as kv() would (a method
        # name has no spaces or quotes to escape).
        log.info(
            "rpc method=%s code=%s duration_ms=%.1f",
            self._method,
            call.code.name,
            duration_s * 1000,
        )

    def single_response(self, inner: Behaviour) -> Callable[[Any, ServicerContext], Awaitable[Any]]:
        """For unary-unary and stream-unary handlers."""

        async def behaviour(request: Any, context: ServicerContext) -> Any:
            call = self._begin()
            try:
                deadline = self._admit(context)
                _reject_undecodable(request)
                async with self._slot(deadline):
                    return await inner(request, context)
            except BaseException as exc:
                await self._fail(call, exc, context)
            finally:
                self._end(call)

        return behaviour

    def streamed_response(self, inner: Behaviour) -> Callable[[Any, ServicerContext], Any]:
        """For unary-stream and stream-stream handlers: an async generator, or a
        coroutine that writes with `context.write()`."""

        async def behaviour(request: Any, context: ServicerContext) -> AsyncIterator[Any]:
            call = self._begin()
            try:
                deadline = self._admit(context)
                _reject_undecodable(request)
                async with self._slot(deadline):
                    responses = inner(request, context)
                    if inspect.isawaitable(responses):
                        await responses
                    else:
                        async for response in responses:
                            yield response
            except BaseException as exc:
                await self._fail(call, exc, context)
            finally:
                self._end(call)

        return behaviour


def _wrap(handler: grpc.RpcMethodHandler, boundary: _MethodBoundary) -> grpc.RpcMethodHandler:
    # Undecodable unary bodies reach the wrapper as a marker, so they are
    # INVALID_ARGUMENT (the caller's fault) rather than grpc's INTERNAL. A
    # streamed request is decoded message by message as the handler reads it:
    # it keeps grpc's own deserializer.
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            boundary.single_response(handler.unary_unary),
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            boundary.streamed_response(handler.unary_stream),
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            boundary.single_response(handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=serializer,
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            boundary.streamed_response(handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=serializer,
        )
    raise TypeError(f"a method handler without a behaviour: {handler!r}")


class RpcBoundary(grpc.aio.ServerInterceptor):
    """Access table, authentication, the RPC's deadline, admission control
    (docs/design.md, "Admission"), statuses, metrics, logs.

    A method that has a handler but no entry in the access table is refused
    with UNIMPLEMENTED, checked before the credential, so that every caller
    gets the same answer. UNIMPLEMENTED rather than PERMISSION_DENIED: no
    credential or scope could open the method, it is not served (a handler
    registered without an access rule is our deployment's mistake), and
    PERMISSION_DENIED would send the caller off to ask for a scope that does
    not exist. It is also what grpc answers for a method with no handler at
    all, so an unlisted method is indistinguishable from a missing one.
    """

    def __init__(
        self,
        *,
        domain: str,
        tokens: Callable[[], TokenRegistry],
        method_access: Mapping[str, MethodAccess],
        default_deadlines_s: Mapping[str, float],
        admission: Admission,
    ) -> None:
        """`default_deadlines_s`: the deadline applied when the caller sets none,
        by service name (e.g. `crm.v1.CrmService`); `admission`: the concurrency
        limit each method's calls take a slot of."""
        self._domain = domain
        self._tokens = tokens
        self._access = method_access
        self._default_deadlines_s = default_deadlines_s
        self._admission = admission
        # method -> (the handler wrapped, the wrapper); rebuilt only if it changes.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler  # no such method: grpc answers UNIMPLEMENTED
        method: str = details.method  # type: ignore[attr-defined]
        access = self._access.get(method)
        if access is not None and access.public:
            return handler
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        service = method.split("/")[1] if method.count("/") == 2 else ""
        boundary = _MethodBoundary(
            method,
            access,
            self._default_deadlines_s.get(service, FALLBACK_DEFAULT_DEADLINE_S),
            self._tokens,
            self._domain,
            self._admission.limit_for(method),
        )
        wrapped = _wrap(handler, boundary)
        self._wrapped[method] = (handler, wrapped)
        return wrapped
