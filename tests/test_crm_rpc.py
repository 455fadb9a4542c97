"""PipelineSummary over a real grpc.aio server: answers and every status."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, given, settings

from crm_svc.servicer import ERROR_DOMAIN
from shared.auth import TokenRegistry
from shared.database import Database
from shared.database.postgres import PostgresDatabase
from shared.database.rest import SupabaseRestDatabase
from shared.money import from_money
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc
from tests.conftest import (
    LIMITED_TENANT,
    TOKEN_LIMITED,
    TOKEN_NO_SCOPE,
    TOKEN_READER,
    start_crm_server,
)
from tests.factories import add_clients, add_quotes, create_tenant, unique_tenant
from tests.pipeline_reference import reference, tenant_data
from tests.rpc import bearer, detail, error_info

Stub = crm_pb2_grpc.CrmServiceStub


async def summary(
    stub: Stub, tenant_id: str, token: str | None = TOKEN_READER, deadline_s: float = 5.0
) -> Any:
    return await stub.PipelineSummary(
        crm_pb2.PipelineSummaryRequest(tenant_id=tenant_id),
        metadata=bearer(token) if token else None,
        timeout=deadline_s,
    )


async def failure(stub: Stub, tenant_id: str, **kwargs: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await summary(stub, tenant_id, **kwargs)
    return caught.value


def money(items: Any) -> list[tuple[str, Decimal]]:
    return [(m.currency_code, from_money(m)) for m in items]


async def test_summary_of_a_tenant(crm_stub: Stub, sql: psycopg.Connection[Any]) -> None:
    tenant = unique_tenant()
    create_tenant(sql, tenant)
    add_clients(
        sql,
        tenant,
        [("A@x.io ", "QUOTED"), ("b@x.io", "BOOKED"), (None, "LOST"), ("c@x.io", "LOST")],
    )
    add_quotes(
        sql,
        tenant,
        [
            ("a@x.io", Decimal("100.10"), "EUR"),
            (" A@X.IO", Decimal("0.05"), "USD"),
            ("b@x.io", Decimal("-20.25"), "EUR"),
            ("b@x.io", None, "EUR"),
            ("c@x.io", Decimal("7.00"), "GBP"),
            ("nobody@x.io", Decimal("999.00"), "EUR"),
        ],
    )
    reply = await summary(crm_stub, tenant)

    assert reply.tenant_id == tenant
    assert [s.stage for s in reply.stages] == [
        crm_pb2.PIPELINE_STAGE_QUOTED,
        crm_pb2.PIPELINE_STAGE_NEGOTIATING,
        crm_pb2.PIPELINE_STAGE_BOOKED,
        crm_pb2.PIPELINE_STAGE_PAID,
        crm_pb2.PIPELINE_STAGE_TRAVELLED,
        crm_pb2.PIPELINE_STAGE_LOST,
    ]
    assert [s.open for s in reply.stages] == [True, True, True, True, False, False]
    assert [s.client_count for s in reply.stages] == [1, 0, 1, 0, 0, 2]
    assert money(reply.stages[0].value) == [("EUR", Decimal("100.10")), ("USD", Decimal("0.05"))]
    assert money(reply.stages[1].value) == []
    assert money(reply.stages[2].value) == [("EUR", Decimal("-20.25"))]
    negative = reply.stages[2].value[0]
    assert (negative.units, negative.nanos) == (-20, -250_000_000)
    assert money(reply.stages[5].value) == [("GBP", Decimal("7.00"))]
    assert reply.total_clients == 4
    assert money(reply.open_value) == [("EUR", Decimal("79.85")), ("USD", Decimal("0.05"))]
    assert reply.computed_at.seconds > 0


def as_reference(response: crm_pb2.PipelineSummaryResponse) -> dict[str, Any]:
    """The response in the shape of tests.pipeline_reference.reference."""

    def amounts(items: Any) -> list[dict[str, Any]]:
        return [{"currency": c, "amount": a} for c, a in money(items)]

    return {
        "stages": [
            {
                "stage": crm_pb2.PipelineStage.Name(s.stage).removeprefix("PIPELINE_STAGE_"),
                "open": s.open,
                "client_count": s.client_count,
                "value": amounts(s.value),
            }
            for s in response.stages
        ],
        "total_clients": response.total_clients,
        "open_value": amounts(response.open_value),
    }


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=tenant_data)
async def test_summary_matches_the_reference_for_any_padding_and_case(
    crm_stub: Stub, sql: psycopg.Connection[Any], data: tuple[list[Any], list[Any]]
) -> None:
    """Emails padded with any whitespace Python strips, in any case, match as
    the system we replace matched them (str.strip().lower())."""
    tenant = unique_tenant("hyp-rpc")
    create_tenant(sql, tenant)
    add_clients(sql, tenant, data[0])
    add_quotes(sql, tenant, data[1])
    assert as_reference(await summary(crm_stub, tenant)) == reference(data)


async def test_unknown_tenant_is_not_found(crm_stub: Stub) -> None:
    error = await failure(crm_stub, "no-such-tenant")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(error)
    assert (info.reason, info.domain) == ("TENANT_NOT_FOUND", ERROR_DOMAIN)
    assert info.metadata["tenant_id"] == "no-such-tenant"


async def test_tenant_being_deprovisioned_is_failed_precondition(
    crm_stub: Stub, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant()
    create_tenant(sql, tenant, status="deprovisioning")
    error = await failure(crm_stub, tenant)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(error).reason == "TENANT_DEPROVISIONING"


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (None, "MISSING_CREDENTIALS"),
        ((("authorization", "Bearer not-a-known-token"),), "INVALID_CREDENTIALS"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "MISSING_CREDENTIALS"),
        ((("authorization", "Bearer "),), "MISSING_CREDENTIALS"),
    ],
)
async def test_missing_or_unknown_credentials_are_unauthenticated(
    crm_stub: Stub, metadata: Any, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await crm_stub.PipelineSummary(
            crm_pb2.PipelineSummaryRequest(tenant_id="acme-travel"), metadata=metadata, timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == reason
    assert "not-a-known-token" not in (caught.value.details() or "")


async def test_token_without_the_scope_is_permission_denied(crm_stub: Stub) -> None:
    error = await failure(crm_stub, "acme-travel", token=TOKEN_NO_SCOPE)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(error).reason == "MISSING_SCOPE"


async def test_token_not_allowed_for_the_tenant_is_permission_denied_before_existence(
    crm_stub: Stub, sql: psycopg.Connection[Any]
) -> None:
    other = unique_tenant()
    create_tenant(sql, other)
    for tenant in (other, "tenant-that-does-not-exist"):
        error = await failure(crm_stub, tenant, token=TOKEN_LIMITED)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(error).reason == "TENANT_NOT_ALLOWED"


async def test_limited_token_reads_its_own_tenant(
    crm_stub: Stub, sql: psycopg.Connection[Any]
) -> None:
    sql.execute("DELETE FROM tenant_settings WHERE tenant_id = %s", (LIMITED_TENANT,))
    sql.execute("DELETE FROM tenants WHERE id = %s", (LIMITED_TENANT,))
    create_tenant(sql, LIMITED_TENANT)
    reply = await summary(crm_stub, LIMITED_TENANT, token=TOKEN_LIMITED)
    assert reply.total_clients == 0
    assert len(reply.stages) == 6


class CountingDatabase:
    """The real database, counting the calls that reach it."""

    def __init__(self, real: Database) -> None:
        self.real = real
        self.name = real.name
        self.calls = 0

    async def call(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await self.real.call(*args, **kwargs)

    async def ping(self, *args: Any) -> None:
        await self.real.ping(*args)

    async def close(self) -> None:
        pass


BAD_TENANT_IDS = [
    "",
    "../x",
    "..",
    "A",
    "Acme",
    "a" * 64,
    "x\x00y",
    "acme travel",
    "acme/../../etc",
    "%2e%2e",
    "-leading-dash",
    "acme\n",
    "café",
    "租户",
]


async def test_malformed_tenant_ids_are_invalid_argument_and_query_nothing(
    database: Database, tokens: TokenRegistry
) -> None:
    counting = CountingDatabase(database)
    handle = await start_crm_server(counting, tokens)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = Stub(channel)
            for bad in BAD_TENANT_IDS:
                error = await failure(stub, bad)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
                assert error_info(error).reason == "INVALID_TENANT_ID"
                violation = detail(error, error_details_pb2.BadRequest)
                assert isinstance(violation, error_details_pb2.BadRequest)
                assert violation.field_violations[0].field == "tenant_id"
            assert counting.calls == 0
            # The same server still answers a good request, through the database.
            error = await failure(stub, "well-formed-but-unknown")
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert counting.calls == 1
    finally:
        await handle.stop(0)


async def test_oversized_request_is_rejected_and_server_keeps_serving(crm_stub: Stub) -> None:
    error = await failure(crm_stub, "a" * 100_000)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    error = await failure(crm_stub, "still-serving-unknown")
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def unreachable_database(transport: str) -> Database:
    """The transport pointed at a port where nothing listens."""
    if transport == "rest":
        rest = SupabaseRestDatabase("http://127.0.0.1:9", "unused-key")
        await rest.open()
        return rest
    direct = PostgresDatabase(
        "postgresql://postgres@127.0.0.1:9/postgres?connect_timeout=1",
        application_name="crm_svc_down",
        min_size=1,
        max_size=2,
    )
    await direct.open()
    return direct


async def test_database_down_is_unavailable_with_retry_info(
    tokens: TokenRegistry, transport: str
) -> None:
    unreachable = await unreachable_database(transport)
    handle = await start_crm_server(unreachable, tokens)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            loop = asyncio.get_running_loop()
            started = loop.time()
            error = await failure(Stub(channel), "acme-travel", deadline_s=5.0)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert loop.time() - started < 4.0, "an unreachable database must not eat the deadline"
            assert error_info(error).reason == "DB_UNAVAILABLE"
            assert isinstance(
                detail(error, error_details_pb2.RetryInfo), error_details_pb2.RetryInfo
            )
    finally:
        await handle.stop(0)
        await unreachable.close()
