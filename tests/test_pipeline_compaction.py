"""Compaction of the pipeline delta log (crm_svc/compaction.py): one call on
both transports, the background loop (draining, rebuilding tenants that need
it, reporting the backlog, riding out a failing call, stopping on cancel),
and the real service process compacting in the background. Its settings are
in tests/test_settings.py."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from crm_svc import compaction
from crm_svc.compaction import (
    MAX_RETRY_S,
    READ_ONLY_RETRY_S,
    Compaction,
    _retry_pause,
    compact_pipeline,
    run_compactor,
)
from devkit.postgrest_standin import PostgrestStandin
from shared.database import Database
from shared.database.postgres import PostgresDatabase
from shared.deadline import Deadline
from shared.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from tests import polling
from tests.conftest import url_for
from tests.factories import add_clients, add_quotes, create_tenant, unique_tenant
from tests.test_service_process import (
    Service,
    kill_if_running,
    start_crm_process,
    tokens_toml,
)

# Generous bounds on waits for something that normally takes milliseconds.
DRAIN_WAIT_S = 15.0


def pending_deltas(sql: psycopg.Connection[Any], tenant: str) -> int:
    row = sql.execute("SELECT count(*) FROM pipeline_deltas WHERE tenant_id = %s", (tenant,))
    return int(row.fetchone()[0])  # type: ignore[index]


def verification(sql: psycopg.Connection[Any], tenant: str) -> dict[str, Any]:
    row = sql.execute("SELECT pipeline_verify(%s)", (tenant,)).fetchone()
    assert row is not None
    return dict(row[0])


def summary(sql: psycopg.Connection[Any], tenant: str) -> dict[str, Any]:
    row = sql.execute("SELECT pipeline_summary(%s) - 'computed_at'", (tenant,)).fetchone()
    assert row is not None
    return dict(row[0])


def write_pipeline(sql: psycopg.Connection[Any], tenant: str) -> None:
    """Inserts, updates and deletes of clients and quotes: deltas of every kind."""
    ids = add_clients(
        sql,
        tenant,
        [
            ("ana@x.io", "QUOTED"),
            (" Ben@X.io", "NEGOTIATING"),
            ("cy@x.io", "BOOKED"),
            ("dee@x.io", "PAID"),
            (None, "LOST"),
            ("eve@x.io", "TRAVELLED"),
        ],
    )
    add_quotes(
        sql,
        tenant,
        [
            ("ana@x.io", Decimal("100.10"), "EUR"),
            ("ben@x.io", Decimal("20.00"), "USD"),
            ("BEN@x.io ", Decimal("5.55"), "USD"),
            ("cy@x.io", None, "EUR"),
            ("dee@x.io", Decimal("7.00"), "JPY"),
            ("nobody@x.io", Decimal("1.00"), "EUR"),
        ],
    )
    sql.execute(
        "UPDATE clients SET pipeline_stage = 'BOOKED' WHERE tenant_id = %s AND id = %s",
        (tenant, ids[0]),
    )
    sql.execute(
        "UPDATE quotes SET total_price = 30.00 WHERE tenant_id = %s AND customer_email = 'ben@x.io'",
        (tenant,),
    )
    sql.execute("DELETE FROM clients WHERE tenant_id = %s AND id = %s", (tenant, ids[5]))


def assert_exact_and_compacted(sql: psycopg.Connection[Any], tenant: str) -> None:
    assert pending_deltas(sql, tenant) == 0
    check = verification(sql, tenant)
    assert check["checked"] is True
    assert check["drift"] is False, check
    assert check["pending_deltas"] == 0


@pytest.fixture
def tenant_with_backlog(sql: psycopg.Connection[Any]) -> Iterator[str]:
    tenant = unique_tenant("compact")
    create_tenant(sql, tenant)
    write_pipeline(sql, tenant)
    assert pending_deltas(sql, tenant) > 0
    yield tenant


async def wait_until(condition: Any, what: str, timeout_s: float = DRAIN_WAIT_S) -> None:
    await polling.wait_until(condition, what, timeout_s)


def compaction_errors() -> float:
    total = 0.0
    for family in REGISTRY.collect():
        if family.name == "pipeline_compaction_errors":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def deltas_compacted() -> float:
    return REGISTRY.get_sample_value("pipeline_deltas_compacted_total") or 0.0


# -- one call, both transports ------------------------------------------------


async def test_compact_pipeline_folds_every_delta_and_stays_exact(
    database: Database, sql: psycopg.Connection[Any], tenant_with_backlog: str
) -> None:
    tenant = tenant_with_backlog
    before = summary(sql, tenant)
    assert verification(sql, tenant)["drift"] is False  # exact before compaction too

    calls: list[Compaction] = []
    while not calls or calls[-1].more:
        assert len(calls) < 1000, "compaction does not converge"
        calls.append(await compact_pipeline(database, Deadline.after(10), max_deltas=10_000))

    assert sum(c.compacted for c in calls) > 0
    assert all(c.compacted >= 0 and c.tenants >= 0 and c.busy >= 0 for c in calls)
    assert_exact_and_compacted(sql, tenant)
    assert summary(sql, tenant) == before


async def test_compact_pipeline_in_small_batches_says_more(
    database: Database, sql: psycopg.Connection[Any], tenant_with_backlog: str
) -> None:
    tenant = tenant_with_backlog
    before = summary(sql, tenant)
    # Drain everyone else first, so that the small batches below are this tenant's.
    while (await compact_pipeline(database, Deadline.after(10), max_deltas=10_000)).more:
        pass
    write_pipeline(sql, tenant)  # more of the same: the emails now have aggregates to adjust
    backlog = pending_deltas(sql, tenant)
    assert backlog > 2

    first = await compact_pipeline(database, Deadline.after(10), max_deltas=2)
    # A batch ends at a whole email key: at least its share, never the lot here.
    assert 2 <= first.compacted < backlog
    assert (first.tenants, first.more) == (1, True)
    assert pending_deltas(sql, tenant) == backlog - first.compacted
    assert verification(sql, tenant)["drift"] is False  # half-way is exact as well
    calls = [first]
    while calls[-1].more:
        assert len(calls) < 1000, "compaction does not converge"
        calls.append(await compact_pipeline(database, Deadline.after(10), max_deltas=2))
    assert sum(c.compacted for c in calls) == backlog
    assert_exact_and_compacted(sql, tenant)
    doubled = summary(sql, tenant)
    assert doubled["total_clients"] == 2 * before["total_clients"]


async def test_compact_pipeline_refuses_a_batch_below_one(database: Database) -> None:
    with pytest.raises(InvalidArgument):
        await compact_pipeline(database, Deadline.after(5), max_deltas=0)


# -- the background loop -----------------------------------------------------


async def test_run_compactor_drains_a_backlog_and_stops_on_cancel(
    database: Database, sql: psycopg.Connection[Any], tenant_with_backlog: str
) -> None:
    tenant = tenant_with_backlog
    counted = deltas_compacted()
    task = asyncio.create_task(
        run_compactor(database, interval_s=0.05, max_deltas=3, budget_s=10.0)
    )
    try:
        await wait_until(lambda: pending_deltas(sql, tenant) == 0, "backlog drained")
        # New writes while it runs are compacted too.
        write_pipeline(sql, tenant)
        await wait_until(lambda: pending_deltas(sql, tenant) == 0, "new writes drained")
    finally:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done and task.cancelled()
    assert_exact_and_compacted(sql, tenant)
    assert deltas_compacted() > counted


async def test_run_compactor_rebuilds_a_marked_tenant_and_reports_the_backlog(
    database: Database, sql: psycopg.Connection[Any]
) -> None:
    """A statement with more rows than are worth folding marks its tenant
    instead of logging them; the compactor rebuilds that tenant, folds the
    others meanwhile, and puts the largest backlogs on the gauges."""
    bulk, small = unique_tenant("bulk"), unique_tenant("small")
    for tenant in (bulk, small):
        create_tenant(sql, tenant)
    sql.execute("SET crm_pipeline.min_fold_limit = 5")
    try:
        sql.execute(
            "INSERT INTO clients (tenant_id, email, pipeline_stage)"
            " SELECT %s, 'c' || i || '@x.io', 'PAID' FROM generate_series(1, 20) i",
            (bulk,),
        )
        sql.execute(
            "INSERT INTO quotes (tenant_id, customer_email, total_price, currency)"
            " SELECT %s, 'C' || i || '@x.io ', 2.50, 'EUR' FROM generate_series(1, 20) i",
            (bulk,),
        )
    finally:
        sql.execute("RESET crm_pipeline.min_fold_limit")
    add_clients(sql, small, [("s@x.io", "LOST")])
    assert pending_deltas(sql, bulk) == 2  # a mark per statement, no per-row deltas
    assert summary(sql, bulk)["total_clients"] == 20  # read through the full scan
    rebuilds = REGISTRY.get_sample_value("pipeline_rebuilds_total", {"outcome": "rebuilt"}) or 0.0

    task = asyncio.create_task(
        run_compactor(database, interval_s=0.05, max_deltas=100, budget_s=10.0)
    )
    try:
        await wait_until(
            lambda: pending_deltas(sql, bulk) == 0 and pending_deltas(sql, small) == 0,
            "the marked tenant rebuilt and the other one folded",
        )
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=5)
    assert (REGISTRY.get_sample_value("pipeline_rebuilds_total", {"outcome": "rebuilt"}) or 0.0) > (
        rebuilds
    )
    # The first report was taken before anything was compacted.
    assert REGISTRY.get_sample_value("pipeline_backlog_tenant_deltas", {"tenant": bulk}) == 2
    assert (REGISTRY.get_sample_value("pipeline_backlog_pending_deltas") or 0) >= 3
    for tenant in (bulk, small):
        assert_exact_and_compacted(sql, tenant)
    assert summary(sql, bulk)["open_value"] == [{"currency": "EUR", "amount": "50.00"}]


@pytest.fixture
def deltas_locked(database_url: str, tenant_with_backlog: str) -> Iterator[psycopg.Connection[Any]]:
    """A transaction holding pipeline_deltas in EXCLUSIVE mode (taken after the
    backlog was written): reads go on, but every compaction call waits for it
    to delete deltas, until its own timeout. Rolled back to release."""
    with psycopg.connect(database_url, application_name="tests_lock_holder") as conn:
        conn.execute("SET lock_timeout = '5s'")
        conn.execute("LOCK TABLE pipeline_deltas IN EXCLUSIVE MODE")
        yield conn
        conn.rollback()


async def test_run_compactor_rides_out_failing_calls(
    database: Database,
    sql: psycopg.Connection[Any],
    tenant_with_backlog: str,
    deltas_locked: psycopg.Connection[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tenant = tenant_with_backlog
    errors = compaction_errors()
    task = asyncio.create_task(
        run_compactor(database, interval_s=0.05, max_deltas=10_000, budget_s=0.3)
    )
    try:
        # While the log is locked every call times out: counted, logged, retried.
        await wait_until(lambda: compaction_errors() > errors, "a failed call counted")
        assert not task.done()
        assert pending_deltas_after_release(deltas_locked, sql, tenant) > 0
        await wait_until(lambda: pending_deltas(sql, tenant) == 0, "backlog drained after")
    finally:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done and task.cancelled()
    assert_exact_and_compacted(sql, tenant)
    failures = [
        r.getMessage() for r in caplog.records if "pipeline_compaction_failed" in r.getMessage()
    ]
    assert failures, "the failed call was not logged"
    assert all(
        r.levelno == logging.WARNING
        for r in caplog.records
        if "compaction_failed" in r.getMessage()
    )
    assert "reason=" in failures[0] and "retry_in_ms=" in failures[0]


def pending_deltas_after_release(
    holder: psycopg.Connection[Any], sql: psycopg.Connection[Any], tenant: str
) -> int:
    """End the lock holder's transaction, then count what is still pending."""
    holder.rollback()
    return pending_deltas(sql, tenant)


def compaction_backends(sql: psycopg.Connection[Any]) -> int:
    row = sql.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE pid <> pg_backend_pid() AND state = 'active' AND query LIKE '%%pipeline_compact%%'"
    ).fetchone()
    assert row is not None
    return int(row[0])


async def test_cancelling_run_compactor_ends_the_call_in_flight(
    database: Database,
    sql: psycopg.Connection[Any],
    tenant_with_backlog: str,
    deltas_locked: psycopg.Connection[Any],
) -> None:
    assert compaction_backends(sql) == 0
    task = asyncio.create_task(
        run_compactor(database, interval_s=0.05, max_deltas=10_000, budget_s=8.0)
    )
    try:
        await wait_until(lambda: compaction_backends(sql) == 1, "a call waiting for the lock")
    finally:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done and task.cancelled()
    if database.name == "postgres":
        # The direct transport cancels the statement (PostgREST would let it
        # run to its statement_timeout: the REST transport's documented limit).
        await wait_until(lambda: compaction_backends(sql) == 0, "the statement cancelled", 5)
    assert pending_deltas(sql, tenant_with_backlog) > 0  # nothing half-applied


async def test_run_compactor_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        await run_compactor(None, interval_s=0, max_deltas=1, budget_s=1)  # type: ignore[arg-type]


def test_retries_back_off_to_a_bound_however_long_the_outage() -> None:
    timeout = DeadlineExceeded("database call timed out")
    pauses = [_retry_pause(timeout, failures) for failures in (1, 2, 3, 4, 5, 10**6)]
    assert pauses == sorted(pauses) and pauses[0] > 0
    assert pauses[-1] == MAX_RETRY_S
    # A server that asks for a longer wait gets it, up to the same bound.
    assert _retry_pause(Unavailable("down", retry_after_s=3.0), 1) == 3.0
    assert _retry_pause(Unavailable("down", retry_after_s=600.0), 1) == MAX_RETRY_S


# -- the real service process ------------------------------------------------


@pytest_asyncio.fixture
async def crm_process(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Service]:
    """`python -m crm_svc` on the transport (and settings) the test asks for."""
    transport, extra_env = request.param
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(tokens_toml("caller-a", "process-token-aaaaaaaaaaaaaaaa"))
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"}
    }
    env |= {"AUTH_TOKENS_FILE": str(tokens_file), "CRM_LISTEN": "127.0.0.1:0", **extra_env}
    secrets: list[str] = []
    if transport == "rest":
        standin: PostgrestStandin = request.getfixturevalue("standin")
        key = standin.token("service_role")
        env |= {"SUPABASE_URL": standin.url, "SUPABASE_SERVICE_ROLE_KEY": key}
        secrets.append(key)
    else:
        env["DATABASE_URL"] = url_for(transport, database_url, request)
    service = await start_crm_process(env, tokens_file)
    yield service
    await kill_if_running(service)
    log_text = "".join(service.log)
    for secret in secrets:
        assert secret not in log_text


async def stop(service: Service) -> str:
    """SIGTERM, a clean exit, and the whole log."""
    service.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        assert await service.process.wait() == 0
    assert service.process.stderr is not None
    service.log += [line.decode() for line in (await service.process.stderr.read()).splitlines()]
    return "\n".join(service.log)


@pytest.mark.parametrize(
    "crm_process",
    [
        ("postgres", {"CRM_PIPELINE_COMPACT_INTERVAL_S": "0.05"}),
        ("pooled", {"CRM_PIPELINE_COMPACT_INTERVAL_S": "0.05"}),
        ("rest", {}),
    ],
    ids=["postgres", "pooled", "rest"],
    indirect=True,
)
async def test_the_service_compacts_in_the_background(
    crm_process: Service, sql: psycopg.Connection[Any]
) -> None:
    await crm_process.read_until(r"pipeline_compactor_started")
    tenant = unique_tenant("svc-compact")
    create_tenant(sql, tenant)
    write_pipeline(sql, tenant)
    await wait_until(lambda: pending_deltas(sql, tenant) == 0, "the service compacted", 10)
    assert_exact_and_compacted(sql, tenant)

    log = await stop(crm_process)
    assert "pipeline_compactor_stopped" in log
    assert "pipeline_compaction_failed" not in log
    assert "background_task" not in log  # neither failed nor left running
    assert "Traceback" not in log


@pytest.mark.parametrize(
    "crm_process",
    [("postgres", {"CRM_PIPELINE_COMPACT_INTERVAL_S": "0"})],
    ids=["off"],
    indirect=True,
)
async def test_an_interval_of_zero_turns_compaction_off(crm_process: Service) -> None:
    await crm_process.read_until(r"pipeline_compactor_off")
    log = await stop(crm_process)
    assert "pipeline_compactor_started" not in log


async def test_the_service_refuses_a_bad_compaction_setting(tmp_path: Path) -> None:
    env = {**os.environ, "CRM_PIPELINE_COMPACT_BATCH": "lots", "DATA_DIR": str(tmp_path)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "crm_svc", env=env, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        _, err = await process.communicate()
    assert process.returncode == 1
    assert "CRM_PIPELINE_COMPACT_BATCH must be a whole number" in err.decode()


async def test_on_a_read_only_database_the_compactor_says_what_to_do_and_looks_again_rarely(
    database_url: str, sql: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A crm_svc pointed at a read replica: compaction cannot write. It fails
    with READ_ONLY_DATABASE (not INTERNAL), and the loop logs what to do once
    and waits a minute before trying again instead of retrying every few seconds."""
    tenant = unique_tenant("replica")
    create_tenant(sql, tenant)
    add_clients(sql, tenant, [("r@x.io", "PAID")])  # something to fold: a write
    separator = "&" if "?" in database_url else "?"
    read_only_url = f"{database_url}{separator}options=-c%20default_transaction_read_only%3Don"
    replica = PostgresDatabase(read_only_url, application_name="tests_replica", max_size=2)
    await replica.open(wait_s=10)
    caplog.set_level(logging.WARNING, logger="crm_svc.compaction")
    try:
        with pytest.raises(FailedPrecondition) as caught:
            await compact_pipeline(replica, Deadline.after(5), max_deltas=10)
        assert caught.value.reason == "READ_ONLY_DATABASE"
        task = asyncio.create_task(
            run_compactor(replica, interval_s=0.01, max_deltas=10, budget_s=5.0)
        )
        try:
            await wait_until(
                lambda: any("READ_ONLY_DATABASE" in r.getMessage() for r in caplog.records),
                "the compactor logged the read-only database",
            )
            await asyncio.sleep(0.5)  # a retry now would log a second failure
        finally:
            task.cancel()
            await asyncio.wait({task}, timeout=5)
    finally:
        await replica.close()
    failures = [
        r.getMessage() for r in caplog.records if "pipeline_compaction_failed" in r.getMessage()
    ]
    assert len(failures) == 1, failures
    assert f"retry_in_ms={round(READ_ONLY_RETRY_S * 1000)}" in failures[0]
    assert "CRM_PIPELINE_COMPACT_INTERVAL_S=0" in failures[0]
    assert pending_deltas(sql, tenant) == 1


def vacuums_of_the_log(sql: psycopg.Connection[Any]) -> int:
    row = sql.execute(
        "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'pipeline_deltas'"
    ).fetchone()
    assert row is not None
    return int(row[0])


async def test_the_log_can_be_vacuumed_where_the_transport_allows(
    database: Database, sql: psycopg.Connection[Any], transport: str
) -> None:
    before = vacuums_of_the_log(sql)
    ran = await database.vacuum("pipeline_deltas", Deadline.after(10), cap_s=10)
    assert ran is (transport != "rest")  # PostgREST cannot run VACUUM
    if ran:
        await wait_until(lambda: vacuums_of_the_log(sql) > before, "the VACUUM counted")
    else:
        assert vacuums_of_the_log(sql) == before


async def test_run_compactor_vacuums_the_log_once_many_deltas_are_gone(
    database: Database,
    sql: psycopg.Connection[Any],
    tenant_with_backlog: str,
    transport: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dead entries of deleted deltas slow every read of their tenant until a
    VACUUM: past a threshold (here 5) the compactor runs one itself."""
    monkeypatch.setattr(compaction, "VACUUM_AFTER_DELTAS", 5)
    caplog.set_level(logging.INFO, logger="crm_svc.compaction")
    task = asyncio.create_task(
        run_compactor(database, interval_s=0.05, max_deltas=100, budget_s=10.0)
    )
    try:
        await wait_until(
            lambda: pending_deltas(sql, tenant_with_backlog) == 0, "the backlog drained"
        )
        if transport != "rest":
            await wait_until(
                lambda: any(
                    "pipeline_delta_log_vacuumed" in r.getMessage() for r in caplog.records
                ),
                "the compactor vacuumed the log",
            )
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=5)
    assert not any("vacuum_failed" in r.getMessage() for r in caplog.records)
    assert_exact_and_compacted(sql, tenant_with_backlog)
