"""CrmClient between real servers: caller -> chain service -> CRM -> PostgreSQL.

The chain service is a generic handler (bytes in, bytes out: no proto) hosted
by `create_server`, so the server boundary builds its RPC's deadline (the
caller's, else the chain service's default); its handler calls the CRM
service through `CrmClient` without an explicit deadline. The CRM server is the real servicer, noting what `time_remaining()`
each call arrives with; a client interceptor notes the timeout CrmClient sends.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import psycopg
import pytest
import pytest_asyncio
from grpc.aio import ServicerContext

from crm_svc.servicer import ERROR_DOMAIN as CRM_ERROR_DOMAIN
from crm_svc.servicer import SERVICE_NAME as CRM_SERVICE_NAME
from crm_svc.servicer import CrmServicer
from shared.auth import METHOD_ACCESS, SCOPE_PIPELINE_READ, TokenRegistry, requires
from shared.database.postgres import PostgresDatabase
from shared.deadline import MIN_BUDGET_S
from shared.errors import DeadlineExceeded, InvalidArgument, PermissionDenied, ServiceError
from shared.inbound_rpc import inbound_rpc
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc
from shared.rpc_clients import DOWNSTREAM_MARGIN_S, WIRE_HEADROOM_S, CrmClient
from shared.server import ServerHandle, Service, create_server
from tests.conftest import TOKEN_ADMIN, TOKEN_NO_SCOPE, TOKEN_READER
from tests.factories import add_clients, create_tenant, unique_tenant
from tests.rpc import bearer

CHAIN_SERVICE = "chain.v1.Chain"
CHAIN_METHOD = f"/{CHAIN_SERVICE}/Summarize"
# The chain service's own default deadline: neither CrmClient's (1 s) nor the CRM's (10 s).
CHAIN_DEFAULT_DEADLINE_S = 3.0
# Slack for scheduling on a busy machine; the claims are about the margin, not speed.
SLACK_S = 0.25
# A server's time_remaining() can read up to ~1 ms high: grpc rounds the deadline
# it derives from the grpc-timeout header up to a whole ms.
CLOCK_FUZZ_S = 0.002
# Our test caller's own timeout also reaches the chain service rounded up
# (to 10 ms steps for 1-10 s): 2 s arrives as 2.01 s.
CALLER_WIRE_ROUNDING_S = 0.01


@dataclass
class CrmCall:
    time_remaining: float | None
    caller: str | None


class RecordingCrmServicer(CrmServicer):
    """The real CRM servicer, noting how much time each call arrives with."""

    def __init__(self, db: PostgresDatabase, calls: list[CrmCall]) -> None:
        super().__init__(db)
        self.calls = calls

    async def PipelineSummary(
        self, request: crm_pb2.PipelineSummaryRequest, context: ServicerContext
    ) -> crm_pb2.PipelineSummaryResponse:
        self.calls.append(CrmCall(context.time_remaining(), inbound_rpc().caller.name))
        return await super().PipelineSummary(request, context)


class OutboundTimeouts(grpc.aio.UnaryUnaryClientInterceptor):
    """Notes the timeout of every call made on the chain service's CRM channel."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        self.timeouts.append(client_call_details.timeout)
        return await continuation(client_call_details, request)


@dataclass
class Chain:
    call: grpc.aio.UnaryUnaryMultiCallable
    outbound: OutboundTimeouts
    crm_calls: list[CrmCall]
    inbound: list[float | None] = field(default_factory=list)
    # What the chain handler found left of its RPC's Deadline, as it started.
    deadline_left: list[float] = field(default_factory=list)
    errors: list[ServiceError] = field(default_factory=list)
    # When set, the chain service spends its deadline until this much is left.
    leave_s: float | None = None

    async def summarize(
        self, tenant_id: str, deadline_s: float | None
    ) -> crm_pb2.PipelineSummaryResponse:
        reply = await self.call(
            tenant_id.encode(), timeout=deadline_s, metadata=bearer(TOKEN_READER)
        )
        return crm_pb2.PipelineSummaryResponse.FromString(reply)


async def _start(service: Service, tokens: TokenRegistry, domain: str) -> ServerHandle:
    handle = create_server(
        "127.0.0.1:0",
        [service],
        tokens=lambda: tokens,
        error_domain=domain,
        method_access={**METHOD_ACCESS, CHAIN_METHOD: requires(SCOPE_PIPELINE_READ)},
    )
    await handle.start()
    return handle


@pytest_asyncio.fixture
async def chain(database: PostgresDatabase, tokens: TokenRegistry) -> AsyncIterator[Chain]:
    crm_calls: list[CrmCall] = []
    servicer = RecordingCrmServicer(database, crm_calls)
    crm = await _start(
        Service(
            CRM_SERVICE_NAME,
            lambda server: crm_pb2_grpc.add_CrmServiceServicer_to_server(servicer, server),
            default_deadline_s=10.0,
        ),
        tokens,
        CRM_ERROR_DOMAIN,
    )
    outbound = OutboundTimeouts()
    crm_channel = grpc.aio.insecure_channel(f"127.0.0.1:{crm.port}", interceptors=[outbound])
    # The chain service's own credential, not its caller's.
    crm_client = CrmClient(crm_channel, TOKEN_ADMIN)

    async def summarize(request: bytes, context: ServicerContext) -> bytes:
        remaining = context.time_remaining()
        state.inbound.append(remaining)
        state.deadline_left.append(inbound_rpc().deadline.remaining())
        if state.leave_s is not None and remaining is not None:
            # Blocking on purpose: no await, so grpc cannot cancel this handler
            # before CrmClient has looked at the deadline, however late we wake.
            time.sleep(max(0.0, remaining - state.leave_s))  # noqa: ASYNC251
        try:
            reply = await crm_client.pipeline_summary(request.decode())
        except ServiceError as error:
            state.errors.append(error)
            raise
        return reply.SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        CHAIN_SERVICE, {"Summarize": grpc.unary_unary_rpc_method_handler(summarize)}
    )
    front = await _start(
        Service(
            CHAIN_SERVICE,
            lambda server: server.add_generic_rpc_handlers((handler,)),
            default_deadline_s=CHAIN_DEFAULT_DEADLINE_S,
        ),
        tokens,
        "chain.test",
    )
    caller_channel = grpc.aio.insecure_channel(f"127.0.0.1:{front.port}")
    state = Chain(caller_channel.unary_unary(CHAIN_METHOD), outbound, crm_calls)
    try:
        yield state
    finally:
        await caller_channel.close()
        await crm_channel.close()
        await front.stop(0)
        await crm.stop(0)


@pytest.fixture
def tenant(sql: psycopg.Connection[Any]) -> str:
    tenant_id = unique_tenant("chain")
    create_tenant(sql, tenant_id)
    add_clients(sql, tenant_id, [("a@x.io", "QUOTED"), ("b@x.io", "PAID")])
    return tenant_id


async def test_downstream_timeout_shrinks_with_the_inbound_deadline(
    chain: Chain, tenant: str
) -> None:
    for deadline_s in (2.0, 0.5):
        reply = await chain.summarize(tenant, deadline_s=deadline_s)
        assert (reply.tenant_id, reply.total_clients) == (tenant, 2)

    seen_by_crm = []
    for i, deadline_s in enumerate((2.0, 0.5)):
        inbound, sent, crm = chain.inbound[i], chain.outbound.timeouts[i], chain.crm_calls[i]
        assert inbound is not None and sent is not None and crm.time_remaining is not None
        assert deadline_s - SLACK_S < inbound <= deadline_s + CALLER_WIRE_ROUNDING_S
        # CrmClient passes on what is left of the inbound deadline, less the margin ...
        assert inbound - DOWNSTREAM_MARGIN_S - SLACK_S < sent <= inbound - DOWNSTREAM_MARGIN_S
        # ... and the CRM service gets no more than that, under the chain's credential.
        assert sent - SLACK_S < crm.time_remaining
        assert crm.time_remaining < inbound - DOWNSTREAM_MARGIN_S + CLOCK_FUZZ_S
        assert crm.caller == "admin"
        seen_by_crm.append(crm.time_remaining)
    assert seen_by_crm[0] - seen_by_crm[1] > 1.5 - SLACK_S


async def test_a_caller_without_deadline_still_passes_a_bounded_budget_downstream(
    chain: Chain, tenant: str
) -> None:
    reply = await chain.summarize(tenant, deadline_s=None)
    assert reply.tenant_id == tenant
    assert chain.inbound == [None]  # grpc: no deadline at all
    # The boundary gave the RPC the chain service's default ...
    (left,) = chain.deadline_left
    assert CHAIN_DEFAULT_DEADLINE_S - SLACK_S < left <= CHAIN_DEFAULT_DEADLINE_S
    # ... and CrmClient passed on what was left of that one Deadline (not its own
    # 1 s default, and not unbounded), less the margin.
    (sent,) = chain.outbound.timeouts
    assert sent is not None
    assert left - DOWNSTREAM_MARGIN_S - SLACK_S < sent <= left - DOWNSTREAM_MARGIN_S
    crm_remaining = chain.crm_calls[0].time_remaining
    assert crm_remaining is not None
    assert sent - SLACK_S < crm_remaining < sent + CLOCK_FUZZ_S


async def test_an_almost_spent_deadline_fails_without_calling_crm(
    chain: Chain, tenant: str
) -> None:
    # Less than margin + wire headroom + floor left when CrmClient looks.
    chain.leave_s = DOWNSTREAM_MARGIN_S + WIRE_HEADROOM_S + MIN_BUDGET_S - 0.001
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chain.summarize(tenant, deadline_s=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [(type(e), e.reason) for e in chain.errors] == [(DeadlineExceeded, "BUDGET_EXHAUSTED")]
    assert chain.outbound.timeouts == []
    assert chain.crm_calls == []


async def test_crm_failures_arrive_as_typed_errors(crm_address: str, tenant: str) -> None:
    async with CrmClient.connect(crm_address, TOKEN_NO_SCOPE) as client:
        with pytest.raises(PermissionDenied) as denied:
            await client.pipeline_summary(tenant)
    assert denied.value.reason == "MISSING_SCOPE"
    assert denied.value.metadata == {"caller": "no-scope", "scope": "crm.pipeline.read"}

    async with CrmClient.connect(crm_address, TOKEN_READER) as client:
        with pytest.raises(InvalidArgument) as invalid:
            await client.pipeline_summary("Not A Slug!")
        reply = await client.pipeline_summary(tenant)
    assert (invalid.value.reason, invalid.value.field) == ("INVALID_TENANT_ID", "tenant_id")
    assert reply.total_clients == 2
