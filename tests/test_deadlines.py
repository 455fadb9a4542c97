"""The caller's deadline reaches the database, and nothing outlives it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import pytest_asyncio

from devkit.pooler import Pooler
from shared.auth import TokenRegistry
from shared.database import Database
from shared.database.postgres import PostgresDatabase
from shared.deadline import SAFETY_MARGIN_S, Deadline
from shared.errors import DeadlineExceeded
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc
from tests.conftest import TEST_DB, TOKEN_READER, start_crm_server
from tests.factories import create_tenant, unique_tenant
from tests.rpc import bearer, error_info

# Scheduling delay a loaded CI machine may add to an answer given in time.
JITTER_S = 0.05


def test_no_deadline_gets_the_server_default() -> None:
    before = time.monotonic()
    deadline = Deadline.from_time_remaining(None, default_s=10.0)
    assert 9.9 <= deadline.expires_at - before <= 10.1


def test_absurd_deadline_counts_as_none() -> None:
    deadline = Deadline.from_time_remaining(10.0**9, default_s=3.0)
    assert deadline.remaining() <= 3.0


def test_budget_is_capped_and_keeps_a_margin() -> None:
    deadline = Deadline.after(2.0)
    assert deadline.budget(cap_s=0.5) == 0.5
    assert deadline.budget(cap_s=60.0) <= 2.0 - SAFETY_MARGIN_S


def test_exhausted_budget_fails_fast() -> None:
    with pytest.raises(DeadlineExceeded) as caught:
        Deadline.after(0.01).budget(cap_s=5.0, operation="pipeline_summary")
    assert caught.value.reason == "BUDGET_EXHAUSTED"


async def test_exhausted_budget_never_touches_the_database(database: Database) -> None:
    with pytest.raises(DeadlineExceeded):
        await database.call("pg_sleep", {"seconds": 5}, Deadline.after(0.001))


@pytest_asyncio.fixture
async def blocked_tenant(database_url: str) -> AsyncIterator[str]:
    """A tenant whose summary blocks: another connection holds a lock on a table it reads."""
    tenant = unique_tenant("blocked")
    with psycopg.connect(database_url, autocommit=True) as conn:
        create_tenant(conn, tenant)
    holder = await psycopg.AsyncConnection.connect(database_url, application_name="lock_holder")
    await holder.execute("LOCK TABLE pipeline_stage_clients IN ACCESS EXCLUSIVE MODE")
    try:
        yield tenant
    finally:
        await holder.rollback()
        await holder.close()


async def service_statements(database_url: str, app_name: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT pid, state, wait_event_type, query FROM pg_stat_activity"
            " WHERE application_name = %s AND state <> 'idle'",
            (app_name,),
        )
        return await cursor.fetchall()


async def wait_until_no_service_statements(
    database_url: str, app_name: str, within_s: float
) -> list[Any]:
    give_up = time.monotonic() + within_s
    while True:
        rows = await service_statements(database_url, app_name)
        if not rows or time.monotonic() > give_up:
            return rows
        await asyncio.sleep(0.01)


async def test_blocked_summary_returns_deadline_exceeded_and_leaves_nothing_running(
    crm_stub: crm_pb2_grpc.CrmServiceStub,
    blocked_tenant: str,
    database_url: str,
    service_app_name: str,
) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await crm_stub.PipelineSummary(
            crm_pb2.PipelineSummaryRequest(tenant_id=blocked_tenant),
            metadata=bearer(TOKEN_READER),
            timeout=0.3,
        )
    elapsed = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 0.4, f"answered after {elapsed:.3f}s for a 0.3s deadline"
    # The server normally answers first, with its own reason.
    if caught.value.trailing_metadata():
        assert error_info(caught.value).reason in {
            "LOCK_TIMEOUT",
            "STATEMENT_TIMEOUT",
            "DB_TIMEOUT",
        }
    leftover = await wait_until_no_service_statements(database_url, service_app_name, within_s=0.1)
    assert leftover == [], f"statements still running after the deadline: {leftover}"


async def test_caller_without_deadline_gets_the_server_default(
    database: Database,
    tokens: TokenRegistry,
    blocked_tenant: str,
    database_url: str,
    service_app_name: str,
) -> None:
    handle = await start_crm_server(database, tokens, default_deadline_s=0.5)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = crm_pb2_grpc.CrmServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                # No timeout: only the server's default bounds the call.
                await stub.PipelineSummary(
                    crm_pb2.PipelineSummaryRequest(tenant_id=blocked_tenant),
                    metadata=bearer(TOKEN_READER),
                )
            elapsed = time.monotonic() - started
    finally:
        await handle.stop(0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.4 < elapsed < 1.0
    assert (
        await wait_until_no_service_statements(database_url, service_app_name, within_s=0.1) == []
    )


async def test_burst_beyond_the_pool_ends_within_the_deadline(
    direct_url: str, tokens: TokenRegistry, blocked_tenant: str
) -> None:
    """Twenty concurrent calls on a two-connection pool, all blocked: each one
    ends with DEADLINE_EXCEEDED or UNAVAILABLE by its deadline; none hangs."""
    small = PostgresDatabase(direct_url, application_name="crm_burst", min_size=2, max_size=2)
    await small.open(wait_s=10)
    handle = await start_crm_server(small, tokens)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = crm_pb2_grpc.CrmServiceStub(channel)

            async def one() -> tuple[grpc.StatusCode, float]:
                started = time.monotonic()
                try:
                    await stub.PipelineSummary(
                        crm_pb2.PipelineSummaryRequest(tenant_id=blocked_tenant),
                        metadata=bearer(TOKEN_READER),
                        timeout=0.5,
                    )
                except grpc.aio.AioRpcError as error:
                    return error.code(), time.monotonic() - started
                return grpc.StatusCode.OK, time.monotonic() - started

            results = await asyncio.gather(*(one() for _ in range(20)))
    finally:
        await handle.stop(0)
        await small.close()
    codes = {code for code, _ in results}
    assert codes <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}, codes
    assert max(elapsed for _, elapsed in results) < 0.7


async def test_a_call_queued_in_the_pooler_ends_by_its_deadline(
    pooler: Pooler, pg_server_url: str, database_url: str, tmp_path: Path
) -> None:
    """A transaction pooler queues a statement while every server connection is
    busy; the cancellation of a queued statement takes effect only once one is
    free. The call still ends by its deadline, with the service's own status."""
    narrow = Pooler(pg_server_url, tmp_path, pool_size=1).start()
    url = narrow.url(TEST_DB)
    holder = await psycopg.AsyncConnection.connect(url, prepare_threshold=None)
    await holder.execute("SELECT 1")  # holds the only server connection: a transaction is open
    db = PostgresDatabase(url, application_name="crm_queued", min_size=1, max_size=2)
    try:
        await db.open(wait_s=10)
        for _ in range(2):  # a fresh connection (checked first), then the one just used
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as caught:
                await db.ping(Deadline.after(0.5))
            elapsed = time.monotonic() - started
            assert caught.value.reason == "DB_TIMEOUT"
            # It normally answers about 8 ms early; the allowance is for a
            # loaded machine's scheduling. Without the forced close it would
            # wait until the pooler frees a connection (the end of this test).
            assert elapsed < 0.5 + JITTER_S, f"answered {elapsed:.3f}s after a 0.5 s deadline began"
        await holder.rollback()  # the server connection is free again
        await db.ping(Deadline.after(5.0))
    finally:
        await holder.close()
        await db.close()
        narrow.stop()
