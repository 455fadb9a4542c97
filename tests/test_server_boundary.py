"""The server boundary on a real server, for every handler kind: a method
missing from the access table is refused whatever the credential; a listed
one needs a token with its scope, gets the RPC's one Deadline and has its
errors mapped to rich statuses. The access table covers every RPC of our
protos and keeps health and reflection open."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc.aio import ServicerContext

from shared.auth import METHOD_ACCESS, SCOPE_TENANTS_DELETE, TokenRegistry, requires
from shared.errors import NotFound
from shared.inbound_rpc import inbound_rpc
from shared.proto_gen.crm.v1 import crm_pb2
from shared.proto_gen.provisioning.v1 import provisioning_pb2
from shared.server import ServerHandle, Service, create_server
from tests.conftest import TOKEN_ADMIN, TOKEN_READER
from tests.rpc import bearer, error_info

PROBE_SERVICE = "throwaway.v1.Probe"
PROBE_DEFAULT_DEADLINE_S = 4.0
# grpc sends a 1-10 s timeout rounded up to 10 ms, and the server reads it up to 1 ms high.
CALLER_WIRE_ROUNDING_S = 0.011
FAIL = b"fail"  # a request that makes the handler raise NotFound after one response


class Kind(enum.Enum):
    UNARY_UNARY = "UnaryUnary"
    UNARY_STREAM = "UnaryStream"
    # A unary-stream handler that is a coroutine writing with context.write().
    UNARY_STREAM_WRITER = "UnaryStreamWriter"
    STREAM_UNARY = "StreamUnary"
    STREAM_STREAM = "StreamStream"

    @property
    def method(self) -> str:
        return f"/{PROBE_SERVICE}/{self.value}"


@dataclass
class Seen:
    """What the probe's handlers saw of the RPCs that reached them."""

    callers: list[str] = field(default_factory=list)
    deadline_left: list[float] = field(default_factory=list)

    def note(self) -> None:
        rpc = inbound_rpc()
        self.callers.append(rpc.caller.name)
        self.deadline_left.append(rpc.deadline.remaining())


def probe_service(seen: Seen) -> Service:
    """Bytes in, bytes out; one method of each kind."""

    async def unary_unary(request: bytes, context: ServicerContext) -> bytes:
        seen.note()
        if request == FAIL:
            raise NotFound("no such probe", reason="PROBE_NOT_FOUND")
        return request

    async def unary_stream(request: bytes, context: ServicerContext) -> AsyncIterator[bytes]:
        seen.note()
        yield request
        if request == FAIL:
            raise NotFound("no such probe", reason="PROBE_NOT_FOUND")
        yield request

    async def unary_stream_writer(request: bytes, context: ServicerContext) -> None:
        seen.note()
        await context.write(request)
        if request == FAIL:
            raise NotFound("no such probe", reason="PROBE_NOT_FOUND")
        await context.write(request)

    async def stream_unary(requests: AsyncIterator[bytes], context: ServicerContext) -> bytes:
        seen.note()
        received = [request async for request in requests]
        if FAIL in received:
            raise NotFound("no such probe", reason="PROBE_NOT_FOUND")
        return b"".join(received)

    async def stream_stream(
        requests: AsyncIterator[bytes], context: ServicerContext
    ) -> AsyncIterator[bytes]:
        seen.note()
        # Read to the end first: failing while the client still writes races its writes.
        received = [request async for request in requests]
        for request in received:
            yield request
            if request == FAIL:
                raise NotFound("no such probe", reason="PROBE_NOT_FOUND")

    handler = grpc.method_handlers_generic_handler(
        PROBE_SERVICE,
        {
            Kind.UNARY_UNARY.value: grpc.unary_unary_rpc_method_handler(unary_unary),
            Kind.UNARY_STREAM.value: grpc.unary_stream_rpc_method_handler(unary_stream),
            Kind.UNARY_STREAM_WRITER.value: grpc.unary_stream_rpc_method_handler(
                unary_stream_writer
            ),
            Kind.STREAM_UNARY.value: grpc.stream_unary_rpc_method_handler(stream_unary),
            Kind.STREAM_STREAM.value: grpc.stream_stream_rpc_method_handler(stream_stream),
        },
    )
    return Service(
        PROBE_SERVICE,
        lambda server: server.add_generic_rpc_handlers((handler,)),
        default_deadline_s=PROBE_DEFAULT_DEADLINE_S,
    )


@dataclass
class Probe:
    channel: grpc.aio.Channel
    seen: Seen

    async def call(
        self, kind: Kind, token: str | None, body: bytes = b"ping", timeout_s: float | None = 5.0
    ) -> list[bytes]:
        """The responses of one call of `kind` (raises AioRpcError on failure)."""
        metadata = bearer(token) if token else None
        if kind is Kind.UNARY_UNARY:
            reply = await self.channel.unary_unary(kind.method)(
                body, metadata=metadata, timeout=timeout_s
            )
            return [reply]
        if kind in (Kind.UNARY_STREAM, Kind.UNARY_STREAM_WRITER):
            replies = self.channel.unary_stream(kind.method)(
                body, metadata=metadata, timeout=timeout_s
            )
            return [reply async for reply in replies]
        if kind is Kind.STREAM_UNARY:
            reply = await self.channel.stream_unary(kind.method)(
                iter([body, body]), metadata=metadata, timeout=timeout_s
            )
            return [reply]
        replies = self.channel.stream_stream(kind.method)(
            iter([body, body]), metadata=metadata, timeout=timeout_s
        )
        return [reply async for reply in replies]

    async def refusal(self, kind: Kind, token: str | None) -> grpc.aio.AioRpcError:
        """The failure of a call the server refuses before reading any request."""
        if kind not in (Kind.STREAM_UNARY, Kind.STREAM_STREAM):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await self.call(kind, token)
            return caught.value
        # A streaming caller that has sent nothing yet: had it been writing, a
        # write racing the server's early answer would end the call on the
        # client's side with INTERNAL ("Failed execute_batch") instead.
        metadata = bearer(token) if token else None
        if kind is Kind.STREAM_UNARY:
            call: Any = self.channel.stream_unary(kind.method)(metadata=metadata, timeout=5.0)
        else:
            call = self.channel.stream_stream(kind.method)(metadata=metadata, timeout=5.0)
        code = await call.code()
        assert code != grpc.StatusCode.OK
        return grpc.aio.AioRpcError(
            code,
            await call.initial_metadata(),
            await call.trailing_metadata(),
            await call.details(),
        )


async def start_probe(
    tokens: TokenRegistry, seen: Seen, method_access: dict[str, Any]
) -> ServerHandle:
    handle = create_server(
        "127.0.0.1:0",
        [probe_service(seen)],
        tokens=lambda: tokens,
        error_domain="probe.test",
        method_access=method_access,
    )
    await handle.start()
    return handle


@pytest_asyncio.fixture
async def unlisted(tokens: TokenRegistry) -> AsyncIterator[Probe]:
    """The probe on a server enforcing our real access table, which lacks it."""
    seen = Seen()
    handle = await start_probe(tokens, seen, dict(METHOD_ACCESS))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        yield Probe(channel, seen)
    await handle.stop(0)


@pytest_asyncio.fixture
async def listed(tokens: TokenRegistry) -> AsyncIterator[Probe]:
    """The probe on a server whose table lists its methods, all needing one scope."""
    seen = Seen()
    access = {**METHOD_ACCESS, **{k.method: requires(SCOPE_TENANTS_DELETE) for k in Kind}}
    handle = await start_probe(tokens, seen, access)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        yield Probe(channel, seen)
    await handle.stop(0)


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.value)
@pytest.mark.parametrize("token", [None, TOKEN_ADMIN], ids=["no-token", "admin-token"])
async def test_a_method_missing_from_the_table_is_refused_whatever_the_token(
    unlisted: Probe, kind: Kind, token: str | None
) -> None:
    refused = await unlisted.refusal(kind, token)
    assert refused.code() == grpc.StatusCode.UNIMPLEMENTED
    info = error_info(refused)
    assert (info.reason, info.metadata["method"]) == ("METHOD_NOT_SERVED", kind.method)
    assert unlisted.seen.callers == []  # the handler never ran


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.value)
async def test_a_listed_method_of_any_kind_needs_a_token_with_its_scope(
    listed: Probe, kind: Kind
) -> None:
    missing = await listed.refusal(kind, None)
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(missing).reason == "MISSING_CREDENTIALS"
    unknown = await listed.refusal(kind, "not-a-known-token")
    assert unknown.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(unknown).reason == "INVALID_CREDENTIALS"
    # The reader is a known caller without provisioning.tenants.delete.
    denied = await listed.refusal(kind, TOKEN_READER)
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(denied).metadata == {"caller": "reader", "scope": SCOPE_TENANTS_DELETE}
    assert listed.seen.callers == []

    replies = await listed.call(kind, TOKEN_ADMIN, timeout_s=2.0)
    assert replies and all(reply.startswith(b"ping") for reply in replies)
    assert listed.seen.callers == ["admin"]
    # The caller's deadline (which reaches the server rounded up to a 10 ms step).
    assert 1.0 < listed.seen.deadline_left[0] <= 2.0 + CALLER_WIRE_ROUNDING_S


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.value)
async def test_without_a_caller_deadline_the_handler_gets_the_service_default(
    listed: Probe, kind: Kind
) -> None:
    await listed.call(kind, TOKEN_ADMIN, timeout_s=None)
    (left,) = listed.seen.deadline_left
    assert PROBE_DEFAULT_DEADLINE_S - 1.0 < left <= PROBE_DEFAULT_DEADLINE_S


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.value)
async def test_errors_of_any_kind_of_handler_become_rich_statuses(
    listed: Probe, kind: Kind
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await listed.call(kind, TOKEN_ADMIN, body=FAIL)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(caught.value)
    assert (info.reason, info.domain) == ("PROBE_NOT_FOUND", "probe.test")


def rpc_methods() -> Iterator[str]:
    """Every RPC our protos define, as its full gRPC method name."""
    for file in (crm_pb2.DESCRIPTOR, provisioning_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            for method in service.methods:
                yield f"/{service.full_name}/{method.name}"


def test_every_rpc_of_our_protos_requires_a_scope() -> None:
    methods = list(rpc_methods())
    assert methods  # the protos define RPCs: the check is not vacuous
    missing = [m for m in methods if m not in METHOD_ACCESS]
    assert missing == [], "add these to shared.auth.METHOD_ACCESS"
    assert all(METHOD_ACCESS[m].scope for m in methods)


def test_only_health_and_reflection_are_public() -> None:
    public = sorted(m for m, access in METHOD_ACCESS.items() if access.public)
    assert public and all(
        m.startswith(("/grpc.health.v1.Health/", "/grpc.reflection.")) for m in public
    )
