"""`python -m crm_svc verify` on each transport: it says which one it uses, and
over Supabase REST, where no call outlives the API role's statement_timeout,
it checks tenant by tenant within that cap and names the way out for a tenant
that does not fit."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest_asyncio

from crm_svc import verify
from devkit.postgrest_standin import PostgrestStandin
from shared.database.rest import SupabaseRestDatabase
from tests.factories import add_clients, create_tenant, unique_tenant


def run_verify(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crm_svc", "verify", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def small_tenant(sql: psycopg.Connection[Any]) -> str:
    tenant = unique_tenant("verify")
    create_tenant(sql, tenant)
    add_clients(sql, tenant, [("a@x.io", "QUOTED"), ("b@x.io", "PAID")])
    return tenant


def test_verify_says_it_uses_the_direct_transport(
    database_url: str, sql: psycopg.Connection[Any]
) -> None:
    tenant = small_tenant(sql)
    done = run_verify({"DATABASE_URL": database_url}, "--tenant", tenant)
    assert done.returncode == verify.EXIT_OK, done.stdout + done.stderr
    assert "crm_svc verify: transport: direct PostgreSQL (DATABASE_URL: " in done.stderr
    assert done.stdout.splitlines()[0] == f"{tenant}: ok"


def test_verify_says_it_uses_rest_and_checks_within_the_roles_cap(
    standin: PostgrestStandin, sql: psycopg.Connection[Any]
) -> None:
    tenant = small_tenant(sql)
    rest_env = {
        "DATABASE_URL": "",  # "" is unset: SUPABASE_URL picks the REST transport
        "SUPABASE_URL": standin.url,
        "SUPABASE_SERVICE_ROLE_KEY": standin.token("service_role"),
    }
    done = run_verify(rest_env, "--tenant", tenant)
    assert done.returncode == verify.EXIT_OK, done.stdout + done.stderr
    assert f"transport: Supabase REST (SUPABASE_URL: {standin.url})" in done.stderr
    # The default --timeout-s (300) is more than REST allows: the operator is told.
    assert "runs one call for 10 s at most" in done.stderr
    assert "set DATABASE_URL" in done.stderr
    assert done.stdout.splitlines()[0] == f"{tenant}: ok"
    assert standin.token("service_role") not in done.stdout + done.stderr


@pytest_asyncio.fixture
async def capped_rest(standin: PostgrestStandin) -> AsyncIterator[SupabaseRestDatabase]:
    """The REST transport with a role cap of 0.3 s, standing in for 10 s and a large tenant."""
    db = SupabaseRestDatabase(standin.url, standin.token("service_role"), max_call_s=0.3)
    await db.open()
    yield db
    await db.close()


async def test_a_tenant_that_does_not_fit_the_cap_is_reported_with_the_way_out(
    capped_rest: SupabaseRestDatabase, database_url: str, sql: psycopg.Connection[Any]
) -> None:
    fits, blocked = small_tenant(sql), small_tenant(sql)
    lines: list[str] = []
    assert (
        await verify.verify(
            capped_rest, tenant_id=fits, repair=False, timeout_s=30, emit=lines.append
        )
        == verify.EXIT_OK
    )
    assert lines[0] == f"{fits}: ok"

    # Another session holds the clients table: the check runs into the cap.
    holder = await psycopg.AsyncConnection.connect(database_url)
    await holder.execute("LOCK TABLE clients IN ACCESS EXCLUSIVE MODE")
    try:
        lines.clear()
        status = await verify.verify(
            capped_rest, tenant_id=blocked, repair=False, timeout_s=30, emit=lines.append
        )
    finally:
        await holder.rollback()
        await holder.close()
    assert status == verify.EXIT_ERROR
    assert lines[0].startswith(f"{blocked}: error (")
    assert "not checked: the supabase-rest transport runs one call for 0.3 s at most" in lines[0]
    assert "set DATABASE_URL (the direct connection)" in lines[0]
