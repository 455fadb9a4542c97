"""Many concurrent calls on the direct transport, to the database itself and
through the transaction pooler: every answer is OK and is its own tenant's.

A transaction pooler hands each transaction to any server connection, so
anything a client leaves on a connection (a prepared statement, a session
setting) is seen by other clients' transactions. psycopg prepares a statement
on the server after it ran 5 times on a connection; the rounds below run every
statement many more times than that on every connection of the pool.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import pytest_asyncio

from crm_svc.compaction import run_compactor
from shared.auth import TokenRegistry
from shared.database.postgres import PostgresDatabase
from shared.money import from_money
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc
from shared.proto_gen.provisioning.v1 import provisioning_pb2 as pb
from tests.aggregates import pending_deltas
from tests.conftest import TOKEN_ADMIN, start_crm_server
from tests.factories import create_tenant, unique_tenant
from tests.polling import wait_until
from tests.provisioning_fixtures import FakeSendGrid, provisioning_server, seed_tenant
from tests.rpc import bearer

# Clients per tenant: three sizes, so that answers of different tenants differ
# in every field.
SIZES = (7, 300, 3_000)
CALLS_PER_ROUND = 64
ROUNDS = 6
POOL_SIZE = 4
# Statements each pooled connection runs: well past psycopg's prepare threshold.
assert CALLS_PER_ROUND * ROUNDS / POOL_SIZE >= 5 * 10

BUSINESS_TABLES = ("clients", "quotes", "invoices", "activities", "notifications")

Summary = tuple[tuple[tuple[str, int, tuple[tuple[str, Decimal], ...]], ...], int, Any]


def seed_pipeline(conn: psycopg.Connection[Any], tenant_id: str, clients: int) -> None:
    """Clients in every stage, quotes in two currencies, emails differing in case and padding."""
    create_tenant(conn, tenant_id)
    conn.execute(
        "INSERT INTO clients (tenant_id, email, pipeline_stage)"
        " SELECT %(t)s, CASE WHEN g %% 5 = 0 THEN NULL ELSE format('  C%%s@Mail.io ', g) END,"
        " (ARRAY['QUOTED','NEGOTIATING','BOOKED','PAID','TRAVELLED','LOST'])[1 + g %% 6]"
        " FROM generate_series(1, %(n)s) g",
        {"t": tenant_id, "n": clients},
    )
    conn.execute(
        "INSERT INTO quotes (tenant_id, customer_email, total_price, currency)"
        " SELECT %(t)s, format('c%%s@mail.io', g %% (%(n)s + 10)),"
        " CASE WHEN g %% 7 = 0 THEN NULL ELSE round((g * 37 %% 100000) / 100.0 + 0.01, 2) END,"
        " (ARRAY['EUR', 'USD'])[1 + g %% 2]"
        " FROM generate_series(1, 2 * %(n)s) g",
        {"t": tenant_id, "n": clients},
    )


def _amounts(items: Any) -> tuple[tuple[str, Decimal], ...]:
    return tuple((m.currency_code, from_money(m)) for m in items)


def from_response(response: crm_pb2.PipelineSummaryResponse) -> Summary:
    stages = tuple(
        (crm_pb2.PipelineStage.Name(s.stage), s.client_count, _amounts(s.value))
        for s in response.stages
    )
    return stages, response.total_clients, _amounts(response.open_value)


def _document_amounts(items: list[dict[str, str]]) -> tuple[tuple[str, Decimal], ...]:
    return tuple((item["currency"], Decimal(item["amount"])) for item in items)


def reference(conn: psycopg.Connection[Any], tenant_id: str) -> Summary:
    """The full recomputation from the base rows, shaped like a response."""
    row = conn.execute("SELECT pipeline_summary_recompute(%s)", (tenant_id,)).fetchone()
    assert row is not None
    document = row[0]
    stages = tuple(
        (f"PIPELINE_STAGE_{s['stage']}", int(s["client_count"]), _document_amounts(s["value"]))
        for s in document["stages"]
    )
    return stages, int(document["total_clients"]), _document_amounts(document["open_value"])


@pytest_asyncio.fixture
async def pool(direct_url: str) -> AsyncIterator[PostgresDatabase]:
    db = PostgresDatabase(
        direct_url, application_name="crm_concurrency", min_size=POOL_SIZE, max_size=POOL_SIZE
    )
    await db.open(wait_s=10)
    yield db
    await db.close()


async def test_concurrent_summaries_dry_runs_and_compaction_answer_each_tenant_exactly(
    pool: PostgresDatabase,
    sql: psycopg.Connection[Any],
    tokens: TokenRegistry,
    sendgrid: FakeSendGrid,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tenants = [unique_tenant(f"conc{size}") for size in SIZES]
    for tenant, size in zip(tenants, SIZES, strict=True):
        seed_pipeline(sql, tenant, size)
    expected = {tenant: reference(sql, tenant) for tenant in tenants}
    assert len({repr(summary) for summary in expected.values()}) == len(tenants)
    doomed = unique_tenant("conc-dry")
    doomed_rows = seed_tenant(sql, doomed, clients=20)
    # The seeded rows' deltas are still pending: the compactor folds them
    # while the summaries are read.
    assert all(pending_deltas(sql, tenant) > 0 for tenant in tenants)

    crm = await start_crm_server(pool, tokens)
    compactor = asyncio.create_task(
        run_compactor(pool, interval_s=0.01, max_deltas=500, budget_s=5.0)
    )
    caplog.set_level(logging.WARNING)
    try:
        async with (
            provisioning_server(pool, tokens, sendgrid, tmp_path) as provisioning,
            grpc.aio.insecure_channel(f"127.0.0.1:{crm.port}") as channel,
        ):
            stub = crm_pb2_grpc.CrmServiceStub(channel)
            dry_runs: list[pb.DeprovisionResponse] = []
            stop = asyncio.Event()

            async def summary(tenant: str) -> tuple[str, Summary]:
                response = await stub.PipelineSummary(
                    crm_pb2.PipelineSummaryRequest(tenant_id=tenant),
                    metadata=bearer(TOKEN_ADMIN),
                    timeout=30,
                )
                assert response.tenant_id == tenant
                return tenant, from_response(response)

            async def keep_dry_running() -> None:
                while not stop.is_set():
                    dry_runs.append(
                        await provisioning.deprovision(
                            doomed,
                            request_id=str(uuid.uuid4()),
                            validate_only=True,
                            deadline_s=30,
                        )
                    )

            dry_running = asyncio.create_task(keep_dry_running())
            answers: list[tuple[str, Summary]] = []
            try:
                for _ in range(ROUNDS):
                    answers += await asyncio.gather(
                        *(summary(tenants[i % len(tenants)]) for i in range(CALLS_PER_ROUND))
                    )
            finally:
                stop.set()
                await dry_running
        await wait_until(
            lambda: not any(pending_deltas(sql, tenant) for tenant in tenants),
            "the compactor folded the rows' deltas",
            timeout_s=60,
        )
    finally:
        compactor.cancel()
        await asyncio.gather(compactor, return_exceptions=True)
        await crm.stop(0)

    assert len(answers) == CALLS_PER_ROUND * ROUNDS
    wrong = [(tenant, got) for tenant, got in answers if got != expected[tenant]]
    assert not wrong, f"{len(wrong)} answers differ from their tenant's summary: {wrong[:1]}"
    assert dry_runs, "no dry run finished"
    for dry in dry_runs:
        assert dry.state == pb.JOB_STATE_VALIDATED
        assert dry.tenant_id == doomed
        data = next(s for s in dry.steps if s.step == pb.STEP_TENANT_DATA)
        # The business rows; the derived ones change as the compactor folds deltas.
        assert {t: data.rows[t] for t in BUSINESS_TABLES} == {
            t: doomed_rows[t] for t in BUSINESS_TABLES
        }
    failures = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not failures, failures[:3]
