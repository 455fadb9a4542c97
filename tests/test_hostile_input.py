"""Hostile and malformed callers: only documented codes, and the server keeps
serving. Requests go over the real server, including raw bytes that no
well-behaved client would send."""

from __future__ import annotations

import asyncio
import os
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.proto_gen.crm.v1 import crm_pb2
from tests.conftest import TOKEN_READER
from tests.rpc import bearer, error_info

METHOD = "/crm.v1.CrmService/PipelineSummary"
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def field(number: int, wire_type: int, payload: bytes) -> bytes:
    """A raw protobuf field: tag, then payload (length-prefixed for type 2)."""
    tag = bytes([(number << 3) | wire_type])
    if wire_type == 2:
        return tag + bytes([len(payload)]) + payload
    return tag + payload


RAW_BODIES = [
    field(1, 2, b"\xff\xfe\xfd"),  # invalid UTF-8 in tenant_id
    field(1, 2, b"acme\xc0\xafx"),  # overlong encoding
    b"\x0a\xff\xff\xff\xff\x0f",  # length far beyond the body
    b"\x0a",  # truncated
    field(1, 0, b"\x05"),  # wrong wire type for a string
    field(15, 2, b"unknown") + field(1, 2, b"no-such-tenant"),  # unknown field: ignored
    b"\x00\x00\x00",  # field number 0
    os.urandom(64),
]


async def raw_call(channel: grpc.aio.Channel, body: bytes) -> grpc.StatusCode:
    call = channel.unary_unary(METHOD)  # bytes in, bytes out: no client-side checks
    try:
        await call(body, metadata=bearer(TOKEN_READER), timeout=5)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            error_info(error)  # every failure carries the rich status
        return error.code()
    return grpc.StatusCode.OK


async def assert_serving(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=3
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("body", RAW_BODIES, ids=range(len(RAW_BODIES)))
async def test_raw_bodies_get_documented_codes(crm_address: str, body: bytes) -> None:
    async with grpc.aio.insecure_channel(crm_address) as channel:
        code = await raw_call(channel, body)
    assert code in ALLOWED - {grpc.StatusCode.OK}, code


async def test_fuzzed_requests_over_the_real_server(crm_address: str, transport: str) -> None:
    """A few thousand generated requests: typed fields and raw bodies.

    The gRPC edge is the same for both transports; the REST one gets a
    shorter run because each of its calls costs an HTTP round trip more.
    """
    examples = 1500 if transport == "postgres" else 300
    seen: dict[grpc.StatusCode, int] = {}
    async with grpc.aio.insecure_channel(crm_address) as channel:
        typed = channel.unary_unary(
            METHOD,
            request_serializer=crm_pb2.PipelineSummaryRequest.SerializeToString,
            response_deserializer=crm_pb2.PipelineSummaryResponse.FromString,
        )

        async def typed_call(tenant_id: str) -> grpc.StatusCode:
            try:
                await typed(
                    crm_pb2.PipelineSummaryRequest(tenant_id=tenant_id),
                    metadata=bearer(TOKEN_READER),
                    timeout=5,
                )
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        loop = asyncio.get_running_loop()

        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            database=None,
        )
        @given(
            st.one_of(
                st.text(max_size=80),
                st.from_regex(r"[a-z0-9][a-z0-9_-]{0,70}", fullmatch=True),
                st.text(alphabet="./%\\\x00\n -_azAZ09", max_size=70),
            ),
            st.binary(max_size=200),
        )
        def run(tenant_id: str, body: bytes) -> None:
            for code in (
                asyncio.run_coroutine_threadsafe(typed_call(tenant_id), loop).result(10),
                asyncio.run_coroutine_threadsafe(raw_call(channel, body), loop).result(10),
            ):
                seen[code] = seen.get(code, 0) + 1
                assert code in ALLOWED, (code, tenant_id, body)

        await asyncio.to_thread(run)
    assert (
        sum(seen.values()) >= 1.8 * examples
    )  # two calls per example; hypothesis may skip duplicates
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0
    await assert_serving(crm_address)


async def test_oversized_message_is_resource_exhausted(crm_address: str) -> None:
    async with grpc.aio.insecure_channel(crm_address) as channel:
        assert (
            await raw_call(channel, field(1, 2, b"a" * 100) * 1000)
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
    await assert_serving(crm_address)


async def test_garbage_bytes_on_the_port_close_the_connection(crm_address: str) -> None:
    host, port = crm_address.rsplit(":", 1)

    def send_garbage(payload: bytes) -> bytes:
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(payload)
            received = b""
            while chunk := conn.recv(4096):
                received += chunk
            return received

    for payload in (os.urandom(4096), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 100_000):
        await asyncio.to_thread(send_garbage, payload)  # returns once the server closes
    await assert_serving(crm_address)
