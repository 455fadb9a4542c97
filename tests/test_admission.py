"""Admission control on real servers (docs/design.md, "Admission"): a burst is
answered OK or shed with RESOURCE_EXHAUSTED + RetryInfo + ErrorInfo, never
CANCELLED, while health stays SERVING; health and reflection are never shed;
a call whose deadline is shorter than the queue ahead of it is refused on
arrival; Deprovision has its own bound, which leaves the other methods' slots
alone."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc.aio import ServicerContext
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from crm_svc.servicer import ERROR_DOMAIN as CRM_ERROR_DOMAIN
from crm_svc.servicer import crm_service
from provisioning_svc.servicer import provisioning_service
from shared.admission import (
    DEADLINE_BELOW_QUEUE_WAIT,
    DEPROVISION_METHOD,
    QUEUE_FULL,
    QUEUE_WAIT_EXPIRED,
    Admission,
    ConcurrencyLimit,
    ServiceTime,
)
from shared.auth import METHOD_ACCESS, SCOPE_PIPELINE_READ, TokenRegistry, requires
from shared.database.postgres import PostgresDatabase
from shared.deadline import Deadline
from shared.errors import ResourceExhausted, ServiceError
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc
from shared.proto_gen.provisioning.v1 import provisioning_pb2, provisioning_pb2_grpc
from shared.rpc_clients import CrmClient
from shared.server import Service, create_server
from shared.settings import Settings
from shared.status import error_from_rpc
from tests.conftest import SENDGRID_KEY, TOKEN_ADMIN, TOKEN_READER
from tests.factories import create_tenant, unique_tenant
from tests.polling import wait_until
from tests.provisioning_fixtures import FakeReply, FakeSendGrid, seed_tenant
from tests.rpc import bearer, detail, error_info

SHED_REASONS = {
    QUEUE_FULL,
    DEADLINE_BELOW_QUEUE_WAIT,
    QUEUE_WAIT_EXPIRED,
}
SERVING = health_pb2.HealthCheckResponse.SERVING
# Past grpc core's default pending-request limits (1000 soft, 3000 hard), where
# core itself ended calls with CANCELLED before the server raised them.
BURST_CALLS = 2000
BURST_CHANNELS = 8
# Long enough that no call of the burst can end DEADLINE_EXCEEDED on a slow
# machine: everything not served is shed, not timed out.
BURST_DEADLINE_S = 30.0


@pytest_asyncio.fixture(scope="module")
async def direct_db(database_url: str) -> AsyncIterator[PostgresDatabase]:
    """The direct transport, once: admission does not depend on the transport."""
    db = PostgresDatabase(database_url, application_name="admission_test", max_size=4)
    await db.open(wait_s=10)
    yield db
    await db.close()


def assert_shed(error: grpc.aio.AioRpcError, domain: str, reasons: set[str]) -> ErrorInfoView:
    """A shed answer: RESOURCE_EXHAUSTED with an ErrorInfo and a RetryInfo."""
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    info = error_info(error)
    assert info.domain == domain and info.reason in reasons, info
    retry = detail(error, error_details_pb2.RetryInfo)
    assert isinstance(retry, error_details_pb2.RetryInfo), "shed answer without RetryInfo"
    assert retry.retry_delay.ToNanoseconds() > 0
    # Our client helpers read it back as the typed error with its delay.
    typed = error_from_rpc(error)
    assert isinstance(typed, ResourceExhausted) and typed.retry_after_s > 0
    return ErrorInfoView(info.reason, dict(info.metadata))


@dataclass(frozen=True)
class ErrorInfoView:
    reason: str
    metadata: dict[str, str]


# --- a burst on the CRM service ---------------------------------------------------


async def test_a_burst_is_served_or_shed_never_cancelled_and_health_stays_serving(
    direct_db: PostgresDatabase,
    tokens: TokenRegistry,
    sql: psycopg.Connection[Any],
    database_url: str,
) -> None:
    tenant = unique_tenant("burst")
    create_tenant(sql, tenant)
    # A small bound, so that much of the burst is shed.
    admission = Admission(ConcurrencyLimit("general", limit=2, max_queue=20))
    handle = create_server(
        "127.0.0.1:0",
        [crm_service(direct_db, 10.0)],
        tokens=lambda: tokens,
        error_domain=CRM_ERROR_DOMAIN,
        database=direct_db,
        admission=admission,
    )
    await handle.start()
    address = f"127.0.0.1:{handle.port}"
    channels = [grpc.aio.insecure_channel(address) for _ in range(BURST_CHANNELS)]
    try:
        stubs = [crm_pb2_grpc.CrmServiceStub(c) for c in channels]
        health = health_pb2_grpc.HealthStub(channels[0])
        request = crm_pb2.PipelineSummaryRequest(tenant_id=tenant)
        await stubs[0].PipelineSummary(request, metadata=bearer(TOKEN_READER), timeout=10)

        outcomes: list[grpc.StatusCode] = []
        shed: list[grpc.aio.AioRpcError] = []
        # Every fourth call goes through our client helper, as another service's would.
        helpers = [CrmClient(c, TOKEN_READER) for c in channels]
        helper_errors: list[ServiceError] = []

        async def one(index: int) -> None:
            if index % 4 == 0:
                try:
                    await helpers[index % len(helpers)].pipeline_summary(
                        tenant, deadline=Deadline.after(BURST_DEADLINE_S)
                    )
                except ServiceError as exc:
                    helper_errors.append(exc)
                return
            try:
                await stubs[index % len(stubs)].PipelineSummary(
                    request, metadata=bearer(TOKEN_READER), timeout=BURST_DEADLINE_S
                )
                outcomes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                outcomes.append(exc.code())
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    shed.append(exc)

        health_answers: list[int] = []
        burst_over = asyncio.Event()

        async def watch_health() -> None:
            while not burst_over.is_set():
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                health_answers.append(reply.status)
                await asyncio.sleep(0.05)

        # The first calls hold their slots (their read of `tenants` waits on a
        # lock) until the queue behind them has overflowed, however fast this
        # machine serves; then the rest of the burst is served.
        holder = await psycopg.AsyncConnection.connect(database_url)
        try:
            await holder.execute("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
            watcher = asyncio.create_task(watch_health())
            burst = asyncio.gather(*(one(i) for i in range(BURST_CALLS)))
            await wait_until(lambda: shed or helper_errors, "a call shed", timeout_s=20)
            await holder.rollback()
            await burst
            burst_over.set()
            await watcher
        finally:
            await holder.close()

        codes = Counter(code.name for code in outcomes)
        assert sum(codes.values()) + BURST_CALLS // 4 == BURST_CALLS
        assert all(
            isinstance(e, ResourceExhausted) and e.retry_after_s > 0 and e.reason in SHED_REASONS
            for e in helper_errors
        ), helper_errors[:3]
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes  # no CANCELLED, no timeouts
        assert codes["OK"] > 0 and codes["RESOURCE_EXHAUSTED"] > 0, codes
        for error in shed:
            view = assert_shed(error, CRM_ERROR_DOMAIN, SHED_REASONS)
            assert view.metadata["method"] == "/crm.v1.CrmService/PipelineSummary"
        assert health_answers and set(health_answers) == {SERVING}

        # Right after: fully normal, nothing left running or queued.
        await stubs[1].PipelineSummary(request, metadata=bearer(TOKEN_READER), timeout=10)
        assert (admission.general.in_flight, admission.general.queued) == (0, 0)
    finally:
        for channel in channels:
            await channel.close()
        await handle.stop(0)


# --- a probe whose calls hold their slot until the test lets them go ---------------

PROBE_SERVICE = "throwaway.v1.Gate"
HOLD = f"/{PROBE_SERVICE}/Hold"


@dataclass
class Gate:
    """The probe's handler waits until `open` is set; `entered` counts its calls."""

    open: asyncio.Event = field(default_factory=asyncio.Event)
    entered: int = 0

    def service(self) -> Service:
        async def hold(request: bytes, context: ServicerContext) -> bytes:
            self.entered += 1
            await self.open.wait()
            return request

        handler = grpc.method_handlers_generic_handler(
            PROBE_SERVICE, {"Hold": grpc.unary_unary_rpc_method_handler(hold)}
        )
        return Service(
            PROBE_SERVICE,
            lambda server: server.add_generic_rpc_handlers((handler,)),
            default_deadline_s=30.0,
        )


@dataclass
class GatedServer:
    gate: Gate
    limit: ConcurrencyLimit
    channel: grpc.aio.Channel

    def hold(self, timeout_s: float) -> asyncio.Task[bytes]:
        call = self.channel.unary_unary(HOLD)(
            b"x", metadata=bearer(TOKEN_READER), timeout=timeout_s
        )
        return asyncio.ensure_future(call)

    async def refused(self, timeout_s: float) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.hold(timeout_s)
        return caught.value


@asynccontextmanager
async def gated_server(
    tokens: TokenRegistry, limit: ConcurrencyLimit
) -> AsyncIterator[GatedServer]:
    gate = Gate()
    handle = create_server(
        "127.0.0.1:0",
        [gate.service()],
        tokens=lambda: tokens,
        error_domain="gate.test",
        method_access={**METHOD_ACCESS, HOLD: requires(SCOPE_PIPELINE_READ)},
        admission=Admission(limit),
    )
    await handle.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        yield GatedServer(gate, limit, channel)
    gate.open.set()
    await handle.stop(0)


@pytest_asyncio.fixture
async def one_slot_no_queue(tokens: TokenRegistry) -> AsyncIterator[GatedServer]:
    async with gated_server(tokens, ConcurrencyLimit("general", 1, 0)) as server:
        yield server


@pytest_asyncio.fixture
async def one_slot_queue(tokens: TokenRegistry) -> AsyncIterator[GatedServer]:
    async with gated_server(tokens, ConcurrencyLimit("general", 1, 10)) as server:
        yield server


async def test_health_and_reflection_are_never_shed(one_slot_no_queue: GatedServer) -> None:
    server = one_slot_no_queue
    holding = server.hold(30)
    await wait_until(lambda: server.gate.entered == 1, "the first call holds the slot", 10)

    refused = await server.refused(30)
    view = assert_shed(refused, "gate.test", {QUEUE_FULL})
    assert view.metadata == {"method": HOLD, "limit": "general", "expected_wait_ms": "0"}
    assert server.gate.entered == 1  # the refused call never reached the handler

    # The server is full, and still answers health and reflection.
    health = health_pb2_grpc.HealthStub(server.channel)
    for _ in range(5):
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    answers = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    names = [s.name async for a in answers for s in a.list_services_response.service]
    assert PROBE_SERVICE in names and "grpc.health.v1.Health" in names

    server.gate.open.set()
    assert await holding == b"x"
    assert await server.hold(10) == b"x"  # the slot is free again


async def test_a_deadline_shorter_than_the_expected_wait_is_refused_on_arrival(
    one_slot_queue: GatedServer,
) -> None:
    server = one_slot_queue
    # Teach the limit this method's service time: one call held for a second.
    first = server.hold(30)
    await wait_until(lambda: server.gate.entered == 1, "the first call runs", 10)
    await asyncio.sleep(1.0)
    server.gate.open.set()
    await first
    server.gate.open.clear()

    # With the slot free, a call is served even though its deadline is shorter
    # than the method's service time: this one may be quicker.
    server.gate.open.set()
    assert await server.hold(0.5) == b"x"
    server.gate.open.clear()
    assert server.gate.entered == 2

    holding = server.hold(30)
    await wait_until(lambda: server.gate.entered == 3, "a call holds the slot", 10)
    # Half a second cannot cover the call ahead and its own (the average service
    # time is still most of a second): refused at once, without waiting and
    # without running.
    short = await server.refused(0.5)
    view = assert_shed(short, "gate.test", {DEADLINE_BELOW_QUEUE_WAIT})
    assert int(view.metadata["expected_wait_ms"]) > 500
    assert server.limit.queued == 0 and server.gate.entered == 3

    # A caller with time to wait is queued instead, and served.
    patient = server.hold(30)
    await wait_until(lambda: server.limit.queued == 1, "the patient call waits", 10)
    server.gate.open.set()
    assert await holding == b"x" and await patient == b"x"
    assert server.gate.entered == 4
    assert (server.limit.in_flight, server.limit.queued) == (0, 0)


# --- Deprovision's own bound ---------------------------------------------------------


async def test_deprovision_has_its_own_bound_and_leaves_other_methods_alone(
    direct_db: PostgresDatabase,
    tokens: TokenRegistry,
    sendgrid: FakeSendGrid,
    sql: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    settings = Settings(
        sendgrid_api_key=SENDGRID_KEY,
        sendgrid_api_host=sendgrid.url,
        tenant_config_root=tmp_path,
        deprovision_max_in_flight=1,
    )
    admission = settings.admission
    deprovision_limit = admission.limit_for(DEPROVISION_METHOD)
    assert deprovision_limit is not admission.general
    assert (deprovision_limit.limit, admission.general.limit) == (1, 2 * settings.db_pool_max)
    handle = create_server(
        "127.0.0.1:0",
        [crm_service(direct_db, 10.0), provisioning_service(direct_db, settings)],
        tokens=lambda: tokens,
        error_domain="both.test",
        admission=admission,
    )
    await handle.start()
    tenants = [unique_tenant("bound") for _ in range(4)]
    for index, tenant in enumerate(tenants):
        seed_tenant(sql, tenant, sendgrid_username=f"sub-{tenant}" if index == 0 else None)
    sendgrid.subusers.add(f"sub-{tenants[0]}")
    # The first deprovisioning hangs in its SendGrid call until the fake is reset.
    sendgrid.script(FakeReply(204, delay_s=60))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = provisioning_pb2_grpc.ProvisioningServiceStub(channel)

            def deprovision(tenant: str) -> asyncio.Task[provisioning_pb2.DeprovisionResponse]:
                call = stub.Deprovision(
                    provisioning_pb2.DeprovisionRequest(tenant_id=tenant),
                    metadata=bearer(TOKEN_ADMIN),
                    timeout=60,
                )
                return asyncio.ensure_future(call)

            running = deprovision(tenants[0])
            await wait_until(lambda: sendgrid.deletes(), "the first call reaches SendGrid", 10)
            queued = [deprovision(t) for t in tenants[1:3]]
            await wait_until(lambda: deprovision_limit.queued == 2, "two calls queue", 10)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await deprovision(tenants[3])
            view = assert_shed(caught.value, "both.test", {QUEUE_FULL})
            assert view.metadata["limit"] == "deprovision"

            # The other methods' slots are untouched.
            crm = crm_pb2_grpc.CrmServiceStub(channel)
            summary = await crm.PipelineSummary(
                crm_pb2.PipelineSummaryRequest(tenant_id=tenants[3]),
                metadata=bearer(TOKEN_READER),
                timeout=10,
            )
            assert summary.tenant_id == tenants[3]

            sendgrid.reset()  # the hanging SendGrid call answers now
            for done in [running, *queued]:
                response = await done
                assert response.state == provisioning_pb2.JOB_STATE_COMPLETED
            assert (deprovision_limit.in_flight, deprovision_limit.queued) == (0, 0)
    finally:
        await handle.stop(0)


# --- the limit itself ------------------------------------------------------------------


async def test_a_caller_leaving_the_queue_gives_its_place_and_no_slot_leaks() -> None:
    limit = ConcurrencyLimit("general", limit=1, max_queue=2)
    service = ServiceTime()
    deadline = Deadline.after(30)
    await limit.acquire("m", service, deadline)  # the one slot
    leaving = asyncio.create_task(limit.acquire("m", service, deadline))
    staying = asyncio.create_task(limit.acquire("m", service, deadline))
    await wait_until(lambda: limit.queued == 2, "two calls queue", 5)

    leaving.cancel()  # its caller went away
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert (limit.in_flight, limit.queued) == (1, 1)

    limit.release()  # the slot passes to the call still waiting
    await staying
    assert (limit.in_flight, limit.queued) == (1, 0)
    limit.release()
    assert (limit.in_flight, limit.queued) == (0, 0)
