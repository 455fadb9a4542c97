"""Checks of the pipeline aggregates (migration 0006) shared by their tests."""

from __future__ import annotations

from typing import Any

import psycopg

AGGREGATE_TABLES = (
    "pipeline_emails",
    "pipeline_email_clients",
    "pipeline_email_quotes",
    "pipeline_stage_clients",
    "pipeline_stage_values",
)


def summaries(conn: psycopg.Connection[Any], tenant_id: str) -> tuple[Any, Any]:
    """The aggregate-backed summary and the full scan, in one snapshot, without computed_at."""
    row = conn.execute(
        "SELECT pipeline_summary(%(t)s) - 'computed_at', pipeline_summary_recompute(%(t)s) - 'computed_at'",
        {"t": tenant_id},
    ).fetchone()
    assert row is not None
    return row[0], row[1]


def assert_exact(conn: psycopg.Connection[Any], tenant_id: str) -> None:
    """The summary equals the recomputation (amount strings included) and every
    aggregate row equals its recomputation."""
    aggregated, recomputed = summaries(conn, tenant_id)
    assert aggregated == recomputed, f"{tenant_id}: summary differs from the full scan"
    row = conn.execute("SELECT pipeline_verify(%s)", (tenant_id,)).fetchone()
    assert row is not None
    check = row[0]
    assert check["checked"], check
    assert not check["drift"], check
    assert set(check["mismatched_rows"].values()) == {0}, check["mismatched_rows"]


def aggregate_rows(
    conn: psycopg.Connection[Any], tenant_id: str
) -> dict[str, list[tuple[Any, ...]]]:
    """Every aggregate row of a tenant, table by table, in key order."""
    return {
        table: conn.execute(
            f"SELECT * FROM {table} WHERE tenant_id = %s ORDER BY 1, 2, 3", (tenant_id,)
        ).fetchall()
        for table in AGGREGATE_TABLES
    }


def pending_rows(conn: psycopg.Connection[Any]) -> int:
    """Deltas left in this session's pending table (none once a transaction is over)."""
    exists = conn.execute("SELECT to_regclass('pg_temp.pipeline_pending') IS NOT NULL").fetchone()
    if exists is None or not exists[0]:
        return 0
    row = conn.execute("SELECT count(*) FROM pg_temp.pipeline_pending").fetchone()
    assert row is not None
    return int(row[0])
