"""The pipeline aggregates (database/migrations/0002_pipeline_summary.sql): semantics at the edges,
the delta log and its compaction, the deprovisioning rule, rebuilds, and the
`python -m crm_svc verify` command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors

from crm_svc import verify
from shared.database.migrations import apply_migrations
from shared.database.postgres import PostgresDatabase
from tests.aggregates import (
    AGGREGATE_TABLES,
    aggregate_rows,
    assert_exact,
    compact,
    pending_deltas,
    summaries,
)
from tests.conftest import create_database, drop_database
from tests.factories import add_clients, add_quotes, create_tenant, unique_tenant


def stage(document: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in document["stages"] if s["stage"] == name)


@pytest.fixture
def tenant(sql: psycopg.Connection[Any]) -> str:
    tenant_id = unique_tenant("aggs")
    create_tenant(sql, tenant_id)
    return tenant_id


def test_all_null_prices_give_no_entry_but_prices_summing_to_zero_do(
    sql: psycopg.Connection[Any], tenant: str
) -> None:
    add_clients(sql, tenant, [("a@x.io", "QUOTED")])
    add_quotes(
        sql,
        tenant,
        [
            ("a@x.io", None, "USD"),
            ("a@x.io", Decimal("10.00"), "EUR"),
            ("a@x.io", Decimal("-10.00"), "EUR"),
        ],
    )
    aggregated, _ = summaries(sql, tenant)
    assert stage(aggregated, "QUOTED")["value"] == [{"currency": "EUR", "amount": "0.00"}]
    assert aggregated["open_value"] == [{"currency": "EUR", "amount": "0.00"}]
    assert_exact(sql, tenant)


def test_case_and_any_whitespace_match_but_a_lookalike_does_not(
    sql: psycopg.Connection[Any], tenant: str
) -> None:
    add_clients(
        sql,
        tenant,
        [
            ("  Pat@X.io ", "BOOKED"),
            ("pat@x.io\t\r\n", "LOST"),
            ("\u00a0pat@x.io\u3000", "LOST"),
            ("pat@x.io\u200b", "PAID"),  # a zero-width space is not whitespace to strip()
            ("  \t", "PAID"),
        ],
    )
    add_quotes(
        sql, tenant, [("PAT@x.IO", Decimal("12.34"), "EUR"), ("\t ", Decimal("1.00"), "EUR")]
    )
    aggregated, _ = summaries(sql, tenant)
    assert stage(aggregated, "BOOKED")["value"] == [{"currency": "EUR", "amount": "12.34"}]
    assert stage(aggregated, "LOST")["value"] == [{"currency": "EUR", "amount": "24.68"}]
    assert stage(aggregated, "PAID") == {
        "stage": "PAID",
        "open": True,
        "client_count": 2,
        "value": [],
    }
    assert_exact(sql, tenant)


def test_updates_of_price_currency_email_and_stage(
    sql: psycopg.Connection[Any], tenant: str
) -> None:
    (client,) = add_clients(sql, tenant, [("kim@x.io", "QUOTED")])
    add_quotes(sql, tenant, [("kim@x.io", Decimal("50.00"), "EUR")])
    changes = [
        "UPDATE quotes SET total_price = NULL WHERE tenant_id = %(t)s",
        "UPDATE quotes SET total_price = 60.00 WHERE tenant_id = %(t)s",
        "UPDATE quotes SET currency = 'JPY' WHERE tenant_id = %(t)s",
        "UPDATE quotes SET customer_email = ' KIM@X.IO ' WHERE tenant_id = %(t)s",
        "UPDATE clients SET pipeline_stage = 'TRAVELLED' WHERE tenant_id = %(t)s",
        "UPDATE clients SET email = 'other@x.io' WHERE tenant_id = %(t)s",
        "UPDATE clients SET email = 'Kim@x.io' WHERE tenant_id = %(t)s",
        "UPDATE clients SET name = 'Kim' WHERE tenant_id = %(t)s",
    ]
    for change in changes:
        sql.execute(change, {"t": tenant})
        assert_exact(sql, tenant)
    aggregated, _ = summaries(sql, tenant)
    assert stage(aggregated, "TRAVELLED")["value"] == [{"currency": "JPY", "amount": "60.00"}]
    assert aggregated["open_value"] == []
    sql.execute("DELETE FROM clients WHERE tenant_id = %s AND id = %s", (tenant, client))
    sql.execute("DELETE FROM quotes WHERE tenant_id = %s", (tenant,))
    assert_exact(sql, tenant)
    # Nothing left behind: rows at zero are deleted, every delta is folded in.
    assert all(rows == [] for rows in aggregate_rows(sql, tenant).values())
    assert pending_deltas(sql, tenant) == 0


def test_the_summary_reads_no_client_or_quote_row_once_compacted(
    sql: psycopg.Connection[Any], tenant: str
) -> None:
    """O(stages x currencies) whatever the tenant's size: with no delta pending,
    the summary reads none of the tenant's 300 clients and quotes (the
    transaction's own counters say so; the planner may probe an index end or
    two); with one pending, it reads that email's rows only."""
    add_clients(sql, tenant, [(f"c{i}@x.io", "PAID") for i in range(300)])
    add_quotes(sql, tenant, [(f"c{i}@x.io", Decimal("1.00"), "EUR") for i in range(300)])
    compact(sql)

    # The backend's unflushed counters (they are flushed between transactions,
    # at most once a second), read before and after, within one transaction.
    counters = (
        "SELECT sum(pg_stat_get_xact_tuples_returned(r.oid) + pg_stat_get_xact_tuples_fetched(r.oid))"
        " FROM pg_class r LEFT JOIN pg_index i ON i.indexrelid = r.oid"
        " WHERE r.oid IN ('clients'::regclass, 'quotes'::regclass)"
        " OR i.indrelid IN ('clients'::regclass, 'quotes'::regclass)"
    )

    def rows_read_by_one_summary() -> int:
        with sql.transaction():
            before = sql.execute(counters).fetchone()
            row = sql.execute("SELECT pipeline_summary(%s)", (tenant,)).fetchone()
            assert row is not None
            after = sql.execute(counters).fetchone()
        assert before is not None and after is not None
        return int(after[0]) - int(before[0])

    assert rows_read_by_one_summary() <= 4
    add_clients(sql, tenant, [("C7@x.io", "BOOKED")])
    assert 2 <= rows_read_by_one_summary() <= 8  # c7's two clients and one quote


class Abandoned(Exception):
    """Raised to roll a transaction back."""


def test_a_writing_transaction_sees_its_own_changes(
    sql: psycopg.Connection[Any], tenant: str
) -> None:
    """Deltas are written with the rows: inside the writing transaction the
    summary counts them, and a rollback takes both away."""
    with sql.transaction():
        add_clients(sql, tenant, [("a@x.io", "QUOTED")])
        add_quotes(sql, tenant, [("A@x.io", Decimal("7.00"), "EUR")])
        inside, recomputed = summaries(sql, tenant)
        assert inside == recomputed
        assert inside["total_clients"] == 1
    with pytest.raises(Abandoned), sql.transaction():
        add_clients(sql, tenant, [("b@x.io", "PAID")])
        compact(sql)  # folded inside the transaction, undone with it
        raise Abandoned
    aggregated, _ = summaries(sql, tenant)
    assert aggregated["total_clients"] == 1
    assert_exact(sql, tenant)


def test_writes_touch_no_aggregate_row_until_compacted(
    sql: psycopg.Connection[Any], tenant: str
) -> None:
    """A write only appends to the log; the summary reads the log's pending
    deltas on top of the stored rows; compaction moves them there exactly once."""
    add_clients(sql, tenant, [("a@x.io", "PAID"), ("b@x.io", "LOST"), (None, "QUOTED")])
    add_quotes(sql, tenant, [("a@x.io", Decimal("2.50"), "EUR"), ("b@x.io", None, "EUR")])
    assert all(rows == [] for rows in aggregate_rows(sql, tenant).values())
    assert pending_deltas(sql, tenant) == 4  # three client keys, one priced quote
    before, recomputed = summaries(sql, tenant)
    assert before == recomputed
    assert compact(sql) >= 4
    assert pending_deltas(sql, tenant) == 0
    assert aggregate_rows(sql, tenant)["pipeline_stage_values"] == [
        (tenant, "PAID", "EUR", Decimal("2.50"), 1)
    ]
    assert summaries(sql, tenant)[0] == before
    assert compact(sql) == 0  # nothing twice
    assert summaries(sql, tenant)[0] == before


def test_compaction_skips_a_tenant_another_compactor_holds(
    database_url: str, sql: psycopg.Connection[Any], tenant: str
) -> None:
    add_clients(sql, tenant, [("a@x.io", "PAID")])
    with psycopg.connect(database_url) as holder:
        holder.execute(
            "SELECT pg_advisory_xact_lock(pipeline_lock_space(), pipeline_tenant_lock_key(%s))",
            (tenant,),
        )
        row = sql.execute("SELECT pipeline_compact(100000)").fetchone()
        assert row is not None and row[0]["busy"] >= 1
        assert pending_deltas(sql, tenant) == 1
        holder.rollback()
    assert_exact(sql, tenant)


def test_compaction_batches_and_rejects_a_bad_batch_size(
    sql: psycopg.Connection[Any], tenant: str
) -> None:
    add_clients(sql, tenant, [(f"c{i}@x.io", "QUOTED") for i in range(5)])
    add_clients(sql, tenant, [(f"c{i}@x.io", "BOOKED") for i in range(5)])
    compact(sql)
    for i in range(7):
        sql.execute(
            "UPDATE clients SET pipeline_stage = 'PAID' WHERE tenant_id = %s AND email = %s",
            (tenant, f"c{i % 5}@x.io"),
        )
    waiting = pending_deltas(sql, tenant)
    row = sql.execute("SELECT pipeline_compact(3)").fetchone()
    assert row is not None
    assert row[0]["more"] is True
    assert pending_deltas(sql, tenant) == waiting - 3
    assert_exact(sql, tenant, compacted=False)
    for bad in (0, -1, None):
        with pytest.raises(errors.InvalidParameterValue) as caught:
            sql.execute("SELECT pipeline_compact(%s)", (bad,))
        assert caught.value.diag.message_hint == "INVALID_BATCH_SIZE"
    assert_exact(sql, tenant)


def test_both_summaries_keep_the_error_contract(sql: psycopg.Connection[Any]) -> None:
    for function in ("pipeline_summary", "pipeline_summary_recompute"):
        with pytest.raises(errors.NoDataFound) as missing:
            sql.execute(f"SELECT {function}('no-such-tenant')")
        assert missing.value.diag.message_hint == "TENANT_NOT_FOUND"
    leaving = unique_tenant("leaving")
    create_tenant(sql, leaving, status="deprovisioning")
    for function in ("pipeline_summary", "pipeline_summary_recompute"):
        with pytest.raises(errors.ObjectNotInPrerequisiteState) as caught:
            sql.execute(f"SELECT {function}(%s)", (leaving,))
        assert caught.value.diag.message_hint == "TENANT_DEPROVISIONING"


def tenant_tables(sql: psycopg.Connection[Any]) -> set[str]:
    """What deprovisioning deletes: the public tables with a tenant_id column."""
    return {
        row[0]
        for row in sql.execute(
            "SELECT c.relname FROM pg_class c"
            " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id'"
            " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'"
        )
    }


def test_a_tenant_being_deprovisioned_is_not_maintained_and_can_be_removed(
    sql: psycopg.Connection[Any], tenant: str
) -> None:
    add_clients(sql, tenant, [("a@x.io", "QUOTED"), ("b@x.io", "PAID"), (None, "LOST")])
    add_quotes(
        sql, tenant, [("a@x.io", Decimal("3.00"), "EUR"), ("b@x.io", Decimal("4.00"), "USD")]
    )
    compact(sql)
    sql.execute("UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (tenant,))
    before = aggregate_rows(sql, tenant)
    assert before["pipeline_stage_values"] != []
    sql.execute("DELETE FROM quotes WHERE tenant_id = %s", (tenant,))
    sql.execute("DELETE FROM clients WHERE tenant_id = %s", (tenant,))
    assert pending_deltas(sql, tenant) == 0  # deleting its rows logs nothing
    with pytest.raises(psycopg.Error) as refused:  # the write guard
        add_clients(sql, tenant, [("late@x.io", "QUOTED")])
    assert refused.value.sqlstate == "CRM01"
    compact(sql)  # skips the tenant
    assert pending_deltas(sql, tenant) == 0
    assert aggregate_rows(sql, tenant) == before
    # Every aggregate table and the log are tenant data for deprovisioning.
    assert {*AGGREGATE_TABLES, "pipeline_deltas"} <= tenant_tables(sql)
    sql.execute("DELETE FROM clients WHERE tenant_id = %s", (tenant,))
    for table in (*AGGREGATE_TABLES, "pipeline_deltas", "tenant_settings"):
        sql.execute(f"DELETE FROM {table} WHERE tenant_id = %s", (tenant,))
    sql.execute("DELETE FROM tenants WHERE id = %s", (tenant,))
    assert sql.execute("SELECT count(*) FROM tenants WHERE id = %s", (tenant,)).fetchone() == (0,)


def test_a_tenant_active_again_is_rebuilt(sql: psycopg.Connection[Any], tenant: str) -> None:
    """Deletes while it was being deprovisioned logged nothing: the rebuild
    when it becomes active again counts them."""
    add_clients(sql, tenant, [("a@x.io", "QUOTED"), ("A@x.io", "BOOKED")])
    add_quotes(
        sql, tenant, [("a@x.io", Decimal("3.00"), "EUR"), ("a@x.io", Decimal("1.50"), "EUR")]
    )
    compact(sql)
    sql.execute("UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (tenant,))
    sql.execute("DELETE FROM clients WHERE tenant_id = %s AND pipeline_stage = 'QUOTED'", (tenant,))
    sql.execute("DELETE FROM quotes WHERE tenant_id = %s AND total_price = 3.00", (tenant,))
    assert pending_deltas(sql, tenant) == 0
    sql.execute("UPDATE tenants SET status = 'active' WHERE id = %s", (tenant,))
    assert_exact(sql, tenant)
    aggregated, _ = summaries(sql, tenant)
    assert aggregated["total_clients"] == 1
    assert stage(aggregated, "BOOKED")["value"] == [{"currency": "EUR", "amount": "1.50"}]


def test_rebuild_of_one_tenant(sql: psycopg.Connection[Any], tenant: str) -> None:
    other = unique_tenant("aggs")
    create_tenant(sql, other)
    for t in (tenant, other):
        add_clients(sql, t, [("a@x.io", "NEGOTIATING")])
        add_quotes(sql, t, [("a@x.io", Decimal("8.00"), "EUR")])
    compact(sql)
    add_clients(sql, tenant, [("b@x.io", "PAID")])  # pending: the rebuild counts it once
    others_rows = aggregate_rows(sql, other)
    sql.execute("DELETE FROM pipeline_stage_values WHERE tenant_id = %s", (tenant,))
    sql.execute("UPDATE pipeline_stage_clients SET clients = 42 WHERE tenant_id = %s", (tenant,))
    assert sql.execute("SELECT pipeline_aggregates_rebuild(%s)", (tenant,)).fetchone() == (1,)
    assert_exact(sql, tenant)
    assert aggregate_rows(sql, other) == others_rows


def drift_tenant(sql: psycopg.Connection[Any]) -> str:
    """A tenant whose aggregates say one client too many in QUOTED."""
    tenant_id = unique_tenant("drift")
    create_tenant(sql, tenant_id)
    add_clients(sql, tenant_id, [("a@x.io", "QUOTED")])
    add_quotes(sql, tenant_id, [("a@x.io", Decimal("2.00"), "EUR")])
    compact(sql)
    sql.execute(
        "UPDATE pipeline_stage_clients SET clients = clients + 1"
        " WHERE tenant_id = %s AND stage = 'QUOTED'",
        (tenant_id,),
    )
    return tenant_id


async def test_verify_reports_ok_drift_repair_and_skips(
    database: PostgresDatabase, sql: psycopg.Connection[Any], tenant: str
) -> None:
    add_clients(sql, tenant, [("a@x.io", "QUOTED")])
    lines: list[str] = []
    assert (
        await verify.verify(
            database, tenant_id=tenant, repair=False, timeout_s=30, emit=lines.append
        )
        == verify.EXIT_OK
    )
    assert lines[0] == f"{tenant}: ok"

    drifting = drift_tenant(sql)
    lines.clear()
    assert (
        await verify.verify(
            database, tenant_id=drifting, repair=False, timeout_s=30, emit=lines.append
        )
        == verify.EXIT_DRIFT
    )
    assert lines[:4] == [
        f"{drifting}: DRIFT",
        "  QUOTED clients: aggregates 2, recomputed 1",
        "  total clients: aggregates 2, recomputed 1",
        "  aggregate rows differing from a recomputation: pipeline_stage_clients 1",
    ]

    lines.clear()
    assert (
        await verify.verify(
            database, tenant_id=drifting, repair=True, timeout_s=30, emit=lines.append
        )
        == verify.EXIT_DRIFT
    )
    assert "  repaired: ok" in lines
    assert_exact(sql, drifting)

    sql.execute("UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (tenant,))
    lines.clear()
    assert (
        await verify.verify(
            database, tenant_id=tenant, repair=False, timeout_s=30, emit=lines.append
        )
        == verify.EXIT_OK
    )
    assert "skipped" in lines[0]

    lines.clear()
    assert (
        await verify.verify(
            database, tenant_id="no-such-tenant", repair=False, timeout_s=30, emit=lines.append
        )
        == verify.EXIT_ERROR
    )
    assert "TENANT_NOT_FOUND" in lines[0]


def run_verify_command(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crm_svc", "verify", *args],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_verify_command_exit_status(direct_url: str, sql: psycopg.Connection[Any]) -> None:
    drifting = drift_tenant(sql)
    found = run_verify_command(direct_url)
    assert found.returncode == verify.EXIT_DRIFT, found.stdout + found.stderr
    assert f"{drifting}: DRIFT" in found.stdout
    repaired = run_verify_command(direct_url, "--tenant", drifting, "--repair")
    assert repaired.returncode == verify.EXIT_DRIFT
    assert "  repaired: ok" in repaired.stdout
    clean = run_verify_command(direct_url, "--tenant", drifting)
    assert clean.returncode == verify.EXIT_OK, clean.stdout
    assert clean.stdout.splitlines()[0] == f"{drifting}: ok"
    bad = run_verify_command(direct_url, "--tenant", "Not A Tenant")
    assert bad.returncode == verify.EXIT_ERROR


def test_compaction_starves_no_tenant_and_skips_those_being_deprovisioned(
    sql: psycopg.Connection[Any],
) -> None:
    """With room for one or two tenants per call, tenants that keep writing do
    not hold back the others, and tenants being deprovisioned (whose deltas wait
    for deprovisioning to delete them) take no room at all."""
    compact(sql)
    leaving = [unique_tenant("leaving") for _ in range(3)]
    for tenant_id in leaving:
        create_tenant(sql, tenant_id)
        add_clients(sql, tenant_id, [("late@x.io", "QUOTED")])  # pending when it leaves
        sql.execute("UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (tenant_id,))
    quiet = unique_tenant("quiet")
    create_tenant(sql, quiet)
    add_clients(sql, quiet, [("q@x.io", "PAID")])
    row = sql.execute("SELECT pipeline_compact(1)").fetchone()
    assert row is not None and row[0]["compacted"] == 1
    assert pending_deltas(sql, quiet) == 0

    busy = [unique_tenant("busy") for _ in range(2)]
    others = [unique_tenant("other") for _ in range(3)]
    for tenant_id in (*busy, *others):
        create_tenant(sql, tenant_id)
        add_clients(sql, tenant_id, [("o@x.io", "QUOTED")])
    for i in range(40):
        for tenant_id in busy:
            add_clients(sql, tenant_id, [(f"b{i}@x.io", "BOOKED")])
        sql.execute("SELECT pipeline_compact(2)")
    # A tenant left out of every one of 40 random draws: about 1 chance in 10^8.
    assert [pending_deltas(sql, t) for t in others] == [0, 0, 0]
    assert all(pending_deltas(sql, t) == 1 for t in leaving)
    for tenant_id in (quiet, *busy, *others):
        assert_exact(sql, tenant_id)


def test_compaction_discards_the_deltas_of_a_tenant_that_is_gone(
    sql: psycopg.Connection[Any],
) -> None:
    compact(sql)
    gone = unique_tenant("gone")
    sql.execute(
        "INSERT INTO pipeline_deltas (tenant_id, email_key, stage, clients)"
        " VALUES (%s, 'x@x.io', 'PAID', 1), (%s, '', 'LOST', 2)",
        (gone, gone),
    )
    row = sql.execute("SELECT pipeline_compact()").fetchone()
    assert row is not None
    assert row[0]["discarded"] == 2 and row[0]["compacted"] == 0
    assert pending_deltas(sql, gone) == 0
    assert all(rows == [] for rows in aggregate_rows(sql, gone).values())


# -- bulk statements, large backlogs, fairness, TRUNCATE ------------------------


def insert_clients_in_one_statement(sql: psycopg.Connection[Any], tenant: str, count: int) -> None:
    sql.execute(
        "INSERT INTO clients (tenant_id, email, pipeline_stage)"
        " SELECT %s, 'bulk' || i || '@x.io', 'QUOTED' FROM generate_series(1, %s) i",
        (tenant, count),
    )


def needs_recompute(sql: psycopg.Connection[Any], tenant: str) -> bool:
    row = sql.execute("SELECT pipeline_needs_recompute(%s)", (tenant,)).fetchone()
    assert row is not None
    return bool(row[0])


@pytest.fixture
def low_fold_limit(sql: psycopg.Connection[Any]) -> Iterator[None]:
    """A floor of 5 deltas for pipeline_fold_limit in this session, so that a
    few rows reach the bulk paths that need ten thousand in production."""
    sql.execute("SET crm_pipeline.min_fold_limit = 5")
    yield
    sql.execute("RESET crm_pipeline.min_fold_limit")


def test_a_bulk_statement_marks_its_tenant_and_the_summary_stays_exact(
    sql: psycopg.Connection[Any], tenant: str, low_fold_limit: None
) -> None:
    add_clients(sql, tenant, [("a@x.io", "PAID")])
    add_quotes(sql, tenant, [("a@x.io", Decimal("4.00"), "EUR")])
    compact(sql)
    other = unique_tenant("aggs")
    create_tenant(sql, other)
    with sql.transaction():
        insert_clients_in_one_statement(sql, tenant, 6)  # more than the limit: a mark
        insert_clients_in_one_statement(sql, other, 5)  # not more: logged row by row
        add_clients(sql, tenant, [("a@x.io", "BOOKED")])  # logged as usual after the mark
        assert_exact(sql, tenant, compacted=False)  # the writer sees its own mark
    assert pending_deltas(sql, tenant) == 2 and pending_deltas(sql, other) == 5
    assert needs_recompute(sql, tenant) and not needs_recompute(sql, other)
    aggregated, _ = summaries(sql, tenant)
    assert aggregated["total_clients"] == 8
    assert stage(aggregated, "BOOKED")["value"] == [{"currency": "EUR", "amount": "4.00"}]
    row = sql.execute("SELECT pipeline_compact()").fetchone()
    assert row is not None and row[0]["rebuild"] == [tenant], row
    assert pending_deltas(sql, tenant) == 2  # compaction leaves a marked tenant alone
    assert_exact(sql, tenant)  # which rebuilds it
    assert_exact(sql, other)


def test_bulk_updates_and_deletes_mark_too_and_deprovisioning_logs_nothing(
    sql: psycopg.Connection[Any], tenant: str, low_fold_limit: None
) -> None:
    insert_clients_in_one_statement(sql, tenant, 8)
    add_quotes(sql, tenant, [(f"bulk{i}@x.io", Decimal("1.00"), "USD") for i in range(1, 9)])
    compact(sql)
    sql.execute("UPDATE clients SET pipeline_stage = 'LOST' WHERE tenant_id = %s", (tenant,))
    assert needs_recompute(sql, tenant)
    assert_exact(sql, tenant)
    sql.execute("DELETE FROM quotes WHERE tenant_id = %s", (tenant,))
    assert pending_deltas(sql, tenant) == 1
    assert_exact(sql, tenant)
    sql.execute("UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (tenant,))
    sql.execute("DELETE FROM clients WHERE tenant_id = %s", (tenant,))
    assert pending_deltas(sql, tenant) == 0


def test_a_backlog_beyond_the_fold_limit_is_read_through_the_full_scan(
    sql: psycopg.Connection[Any], tenant: str, low_fold_limit: None
) -> None:
    """Many small statements: each logs its deltas; once they outnumber what
    is worth folding, the summary recomputes and compaction asks for a rebuild."""
    add_clients(sql, tenant, [(f"c{i}@x.io", "PAID") for i in range(4)])
    assert not needs_recompute(sql, tenant)
    assert_exact(sql, tenant, compacted=False)
    add_quotes(sql, tenant, [(f"c{i}@x.io", Decimal("3.00"), "GBP") for i in range(4)])
    assert pending_deltas(sql, tenant) == 8 and needs_recompute(sql, tenant)
    assert_exact(sql, tenant)  # compact() rebuilds it
    assert pending_deltas(sql, tenant) == 0


def test_compaction_gives_what_small_backlogs_leave_to_the_large_one(
    sql: psycopg.Connection[Any],
) -> None:
    """Equal shares first, then the rest of the batch to those that had more:
    a call of 30 folds both small backlogs whole and the large one's rest."""
    compact(sql)
    large, small_1, small_2 = (unique_tenant("share") for _ in range(3))
    for tenant_id in (large, small_1, small_2):
        create_tenant(sql, tenant_id)
    add_clients(sql, large, [(f"l{i:02}@x.io", "QUOTED") for i in range(40)])
    add_clients(sql, small_1, [("s1@x.io", "PAID")])
    add_clients(sql, small_2, [("s2@x.io", "PAID"), ("s3@x.io", "LOST")])
    row = sql.execute("SELECT pipeline_compact(30)").fetchone()
    assert row is not None
    assert (row[0]["compacted"], row[0]["tenants"], row[0]["more"]) == (30, 3, True), row
    assert [pending_deltas(sql, t) for t in (large, small_1, small_2)] == [13, 0, 0]
    for tenant_id in (large, small_1, small_2):
        assert_exact(sql, tenant_id)


def test_the_backlog_lists_the_largest_tenants_first(sql: psycopg.Connection[Any]) -> None:
    compact(sql)
    big, little = unique_tenant("backlog"), unique_tenant("backlog")
    for tenant_id in (big, little):
        create_tenant(sql, tenant_id)
    add_clients(sql, big, [(f"b{i}@x.io", "QUOTED") for i in range(3)])
    add_clients(sql, little, [("l@x.io", "QUOTED")])
    # Other tests leave deltas of tenants being deprovisioned behind: look at ours.
    row = sql.execute("SELECT pipeline_backlog(1000)").fetchone()
    assert row is not None
    ours = [t for t in row[0]["tenants"] if t["tenant_id"] in (big, little)]
    assert ours == [
        {"tenant_id": big, "deltas": 3, "rebuild_marked": False},
        {"tenant_id": little, "deltas": 1, "rebuild_marked": False},
    ]
    assert row[0]["total"] == sum(t["deltas"] for t in row[0]["tenants"]) >= 4
    compact(sql)


@pytest.fixture
def own_database(pg_server_url: str) -> Iterator[str]:
    """A migrated database of this test's own: TRUNCATE empties whole tables."""
    name = f"crm_truncate_{os.getpid()}"
    url = create_database(pg_server_url, name)
    try:
        apply_migrations(url)
        yield url
    finally:
        drop_database(pg_server_url, name)


def test_truncate_empties_the_derived_rows_without_recomputing(own_database: str) -> None:
    """TRUNCATE fires no row or statement triggers; the derived rows are
    emptied with it (no quotes: no value; no clients: nothing), this
    transaction's earlier writes included, and what follows counts as usual."""
    with psycopg.connect(own_database, autocommit=True) as conn:
        tenants = [unique_tenant("trunc") for _ in range(2)]
        for tenant_id in tenants:
            create_tenant(conn, tenant_id)
            add_clients(conn, tenant_id, [("a@x.io", "PAID"), ("b@x.io", "LOST")])
            add_quotes(conn, tenant_id, [("a@x.io", Decimal("5.00"), "EUR")])
        compact(conn)
        with conn.transaction():
            add_quotes(conn, tenants[0], [("b@x.io", Decimal("7.00"), "GBP")])
            conn.execute("TRUNCATE quotes, invoices")
            add_quotes(conn, tenants[0], [("b@x.io", Decimal("3.00"), "GBP")])
        for tenant_id in tenants:
            assert_exact(conn, tenant_id)
        aggregated, _ = summaries(conn, tenants[1])
        assert (aggregated["total_clients"], aggregated["open_value"]) == (2, [])
        conn.execute("TRUNCATE clients CASCADE")
        add_clients(conn, tenants[1], [("c@x.io", "BOOKED")])
        for tenant_id in tenants:
            assert_exact(conn, tenant_id)
        aggregated, _ = summaries(conn, tenants[1])
        assert aggregated["total_clients"] == 1
