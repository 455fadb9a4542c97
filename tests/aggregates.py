"""Checks of the pipeline aggregates (database/migrations/0002_pipeline_summary.sql)
shared by their tests."""

from __future__ import annotations

from typing import Any

import psycopg

# The tables that hold the aggregates; pipeline_deltas holds what they do not yet.
AGGREGATE_TABLES = (
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


def compact(conn: psycopg.Connection[Any]) -> int:
    """Fold every committed delta (and this transaction's) into the aggregates,
    and rebuild the tenants compaction lists for it, as the CRM service's
    compactor does; return how many deltas were folded."""
    folded = 0
    while True:
        row = conn.execute("SELECT pipeline_compact(100000)").fetchone()
        assert row is not None
        result = row[0]
        folded += int(result["compacted"])
        assert result["busy"] == 0, result
        for tenant in result["rebuild"]:
            rebuilt = conn.execute("SELECT pipeline_rebuild_if_needed(%s)", (tenant,)).fetchone()
            assert rebuilt is not None and rebuilt[0]["rebuilt"], rebuilt
        if not result["more"]:
            return folded


def pending_deltas(conn: psycopg.Connection[Any], tenant_id: str) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pipeline_deltas WHERE tenant_id = %s", (tenant_id,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def verify(conn: psycopg.Connection[Any], tenant_id: str) -> None:
    aggregated, recomputed = summaries(conn, tenant_id)
    assert aggregated == recomputed, f"{tenant_id}: summary differs from the full scan"
    row = conn.execute("SELECT pipeline_verify(%s)", (tenant_id,)).fetchone()
    assert row is not None
    check = row[0]
    assert check["checked"], check
    assert not check["drift"], check
    assert set(check["mismatched_rows"].values()) == {0}, check["mismatched_rows"]


def assert_exact(conn: psycopg.Connection[Any], tenant_id: str, *, compacted: bool = True) -> None:
    """The summary equals the recomputation (amount strings included) and every
    aggregate row equals its recomputation: first with the pending deltas read
    alongside the aggregates, then (unless `compacted` is False) once they are
    folded in, when the stored rows alone must be exact."""
    verify(conn, tenant_id)
    if compacted:
        compact(conn)
        assert pending_deltas(conn, tenant_id) == 0
        verify(conn, tenant_id)


def aggregate_rows(
    conn: psycopg.Connection[Any], tenant_id: str
) -> dict[str, list[tuple[Any, ...]]]:
    """Every stored aggregate row of a tenant, table by table, in key order."""
    return {
        table: conn.execute(
            f"SELECT * FROM {table} WHERE tenant_id = %s ORDER BY 1, 2, 3", (tenant_id,)
        ).fetchall()
        for table in AGGREGATE_TABLES
    }
