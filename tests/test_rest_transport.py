"""The Supabase REST transport and the PostgREST stand-in it talks to."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import psycopg
import pytest

from devkit import postgrest_standin
from devkit.postgrest_standin import PostgrestStandin
from shared.database import rest as rest_transport
from shared.database.rest import BUDGET_HEADER, SupabaseRestDatabase
from shared.deadline import Deadline
from shared.errors import DeadlineExceeded, Internal, NotFound, Unavailable
from tests.factories import create_tenant, unique_tenant


@pytest.fixture
async def rest(standin: PostgrestStandin) -> Any:
    db = SupabaseRestDatabase(standin.url, standin.token("service_role"))
    await db.open()
    yield db
    await db.close()


def statement_timeout_after(sql: psycopg.Connection[Any], headers: str | None, role: str) -> str:
    """What apply_request_timeout() leaves statement_timeout at, as PostgREST would call it."""
    with sql.transaction():
        sql.execute("SELECT set_config('role', %s, true)", (role,))
        sql.execute("SELECT set_config('statement_timeout', '10s', true)")
        if headers is not None:
            sql.execute("SELECT set_config('request.headers', %s, true)", (headers,))
        sql.execute("SELECT apply_request_timeout()")
        row = sql.execute("SHOW statement_timeout").fetchone()
        assert row is not None
        value = str(row[0])
        sql.execute("SELECT set_config('role', 'none', true)")
        return value


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ('{"x-statement-timeout-ms": "250"}', "250ms"),
        ('{"x-statement-timeout-ms": "10000"}', "10s"),
        ('{"x-statement-timeout-ms": "60000"}', "10s"),  # above the role's cap: ignored
        ('{"x-statement-timeout-ms": "0"}', "10s"),
        ('{"x-statement-timeout-ms": "-5"}', "10s"),
        ('{"x-statement-timeout-ms": "1e3"}', "10s"),
        ('{"x-statement-timeout-ms": "99999999999999"}', "10s"),
        ('{"x-statement-timeout-ms": "250; DROP TABLE tenants"}', "10s"),
        ("{}", "10s"),
        ("not json", "10s"),
        (None, "10s"),
    ],
)
def test_pre_request_applies_only_sane_shorter_timeouts(
    sql: psycopg.Connection[Any], headers: str | None, expected: str
) -> None:
    assert statement_timeout_after(sql, headers, "service_role") == expected


def test_roles_have_statement_timeouts(sql: psycopg.Connection[Any]) -> None:
    rows = sql.execute(
        "SELECT r.rolname, s.setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole"
        " WHERE r.rolname IN ('service_role', 'authenticated', 'anon') AND s.setdatabase = 0"
    ).fetchall()
    assert {name: config for name, config in rows} == {
        "service_role": ["statement_timeout=10s"],
        "authenticated": ["statement_timeout=8s"],
        "anon": ["statement_timeout=3s"],
    }


def test_every_table_has_row_level_security(sql: psycopg.Connection[Any]) -> None:
    exposed = sql.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind = 'r' AND NOT c.relrowsecurity"
        " AND c.relname NOT LIKE '%yoyo%'"
    ).fetchall()
    assert exposed == []


async def test_the_anon_key_cannot_read_tenant_data(standin: PostgrestStandin) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{standin.url}/rest/v1/rpc/pipeline_summary",
            json={"p_tenant_id": "acme-travel"},
            headers={
                "apikey": standin.token("anon"),
                "Authorization": f"Bearer {standin.token('anon')}",
            },
        )
    assert response.status_code == 401
    assert response.json()["code"] == "42501"
    assert response.headers["Proxy-Status"] == "PostgREST; error=42501"


async def test_calls_go_through_postgrest_with_the_budget(
    rest: SupabaseRestDatabase, standin: PostgrestStandin, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant()
    create_tenant(sql, tenant)
    before = len(standin.requests)
    document = await rest.call("pipeline_summary", {"p_tenant_id": tenant}, Deadline.after(2.0))
    assert document["total_clients"] == 0
    (request,) = standin.requests[before:]
    assert request["function"] == "pipeline_summary"
    assert 1000 < int(request["headers"][BUDGET_HEADER.lower()]) <= 2000
    assert request["headers"]["apikey"]


async def test_domain_errors_keep_their_reason(rest: SupabaseRestDatabase) -> None:
    with pytest.raises(NotFound) as caught:
        await rest.call("pipeline_summary", {"p_tenant_id": "nobody-here"}, Deadline.after(2.0))
    assert caught.value.reason == "TENANT_NOT_FOUND"


async def test_postgrest_own_errors_are_internal(rest: SupabaseRestDatabase) -> None:
    with pytest.raises(Internal) as caught:
        await rest.call("no_such_function", {}, Deadline.after(2.0))
    assert caught.value.metadata["code"] == "PGRST202"


async def test_unavailable_database_is_not_retried(
    rest: SupabaseRestDatabase, standin: PostgrestStandin, sql: psycopg.Connection[Any]
) -> None:
    sql.execute(
        "CREATE OR REPLACE FUNCTION test_admin_shutdown() RETURNS jsonb LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'terminating connection' USING ERRCODE = 'admin_shutdown'; END $$"
    )
    sql.execute("GRANT EXECUTE ON FUNCTION test_admin_shutdown() TO service_role")
    before = len(standin.requests)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await rest.call("test_admin_shutdown", {}, Deadline.after(5.0))
    assert time.monotonic() - started < 1.0
    assert len(standin.requests) - before == 1


async def test_standin_like_postgrest_does_not_cancel_abandoned_queries(
    standin: PostgrestStandin, database_url: str, sql: psycopg.Connection[Any]
) -> None:
    """Why the budget header exists: without it, a query outlives its client."""
    tenant = unique_tenant()
    create_tenant(sql, tenant)
    holder = await psycopg.AsyncConnection.connect(database_url)
    await holder.execute("LOCK TABLE pipeline_stage_clients IN ACCESS EXCLUSIVE MODE")
    try:
        key = standin.token("service_role")
        async with httpx.AsyncClient(timeout=0.2) as client:
            with pytest.raises(httpx.TimeoutException):
                await client.post(
                    f"{standin.url}/rest/v1/rpc/pipeline_summary",
                    json={"p_tenant_id": tenant},
                    headers={"apikey": key, "Authorization": f"Bearer {key}"},
                )
        await asyncio.sleep(0.3)
        active = sql.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND state = 'active'",
            (postgrest_standin.APP_NAME,),
        ).fetchone()
        assert active is not None and active[0] == 1, "the abandoned query should still be waiting"
    finally:
        await holder.rollback()
        await holder.close()


async def test_budget_header_bounds_the_query_even_when_postgrest_would_not(
    rest: SupabaseRestDatabase, database_url: str, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant()
    create_tenant(sql, tenant)
    holder = await psycopg.AsyncConnection.connect(database_url)
    await holder.execute("LOCK TABLE pipeline_stage_clients IN ACCESS EXCLUSIVE MODE")
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await rest.call("pipeline_summary", {"p_tenant_id": tenant}, Deadline.after(0.3))
        assert time.monotonic() - started < 0.4
        await asyncio.sleep(0.1)
        active = sql.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND state = 'active'",
            (postgrest_standin.APP_NAME,),
        ).fetchone()
        assert active is not None and active[0] == 0
    finally:
        await holder.rollback()
        await holder.close()


async def test_the_http_timeout_comes_from_each_calls_budget(
    standin: PostgrestStandin, sql: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    sql.execute(
        "CREATE OR REPLACE FUNCTION test_pause(p_seconds float8) RETURNS jsonb LANGUAGE sql"
        " AS $$ SELECT to_jsonb(p_seconds) FROM pg_sleep(p_seconds) $$"
    )
    sql.execute("GRANT EXECUTE ON FUNCTION test_pause(float8) TO service_role")
    # A client-wide timeout far below the call's budget: only a request without
    # a budget of its own would be held to it.
    monkeypatch.setattr(rest_transport, "CLIENT_TIMEOUT_S", 0.2)
    db = SupabaseRestDatabase(standin.url, standin.token("service_role"))
    await db.open()
    try:
        started = time.monotonic()
        assert await db.call("test_pause", {"p_seconds": 0.6}, Deadline.after(3.0)) == 0.6
        assert time.monotonic() - started >= 0.6
        # And a budget shorter than the work still ends the call at the budget.
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await db.call("test_pause", {"p_seconds": 2.0}, Deadline.after(0.4))
        assert time.monotonic() - started < 0.6
    finally:
        await db.close()


async def test_no_call_is_given_more_than_the_roles_statement_timeout(
    standin: PostgrestStandin,
) -> None:
    db = SupabaseRestDatabase(standin.url, standin.token("service_role"))
    await db.open()
    try:
        before = len(standin.requests)
        await db.call("pipeline_verify_tenants", {}, Deadline.after(60.0), cap_s=60.0)
        (request,) = standin.requests[before:]
        sent_ms = int(request["headers"][BUDGET_HEADER.lower()])
        assert 9000 < sent_ms <= db.max_call_s * 1000 == 10_000
    finally:
        await db.close()
