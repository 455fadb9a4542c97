"""Migration 0006 on a database that already holds data, and while it is written to.

Each test builds a fresh database migrated up to (not including) 0006, fills
it, then applies the rest of the migrations the way `make migrate` does.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from itertools import count
from typing import Any

import psycopg
import pytest

from shared.database.migrations import apply_migrations
from tests.aggregates import AGGREGATE_TABLES, assert_exact
from tests.conftest import create_database, drop_database
from tests.factories import add_clients, add_quotes, create_tenant

AGGREGATES_MIGRATION = "0006_pipeline_aggregates"
_databases = count(1)


def migrate_before_aggregates(url: str) -> None:
    apply_migrations(url, before=AGGREGATES_MIGRATION)


@pytest.fixture
def fresh_url(pg_server_url: str) -> Iterator[str]:
    """A new database with every migration before 0006 applied."""
    name = f"crm_backfill_{os.getpid()}_{next(_databases)}"
    url = create_database(pg_server_url, name)
    try:
        migrate_before_aggregates(url)
        yield url
    finally:
        drop_database(pg_server_url, name)


def fill(conn: psycopg.Connection[Any]) -> None:
    create_tenant(conn, "alpha")
    add_clients(
        conn,
        "alpha",
        [
            ("Ann@x.io ", "QUOTED"),
            ("ann@X.io", "LOST"),
            ("bob@x.io", "PAID"),
            (None, "QUOTED"),
            ("", "BOOKED"),
            ("cy@x.io\t", "NEGOTIATING"),
        ],
    )
    add_quotes(
        conn,
        "alpha",
        [
            ("ann@x.io", Decimal("100.10"), "EUR"),
            ("  ANN@x.io", Decimal("-0.10"), "EUR"),
            ("ann@x.io", None, "USD"),
            ("bob@x.io", Decimal("10.00"), "USD"),
            ("bob@x.io", Decimal("-10.00"), "USD"),
            ("cy@x.io", Decimal("5.00"), "EUR"),
            (None, Decimal("1.00"), "EUR"),
        ],
    )
    create_tenant(conn, "beta")
    add_clients(conn, "beta", [(f"c{i}@x.io", "BOOKED") for i in range(50)])
    add_quotes(
        conn, "beta", [(f"C{i % 25}@x.io", Decimal(i) + Decimal("0.99"), "GBP") for i in range(80)]
    )
    create_tenant(conn, "gamma")
    # Being deprovisioned: not maintained, so not backfilled either.
    create_tenant(conn, "leaving", status="deprovisioning")
    add_clients(conn, "leaving", [("z@x.io", "PAID")])
    add_quotes(conn, "leaving", [("z@x.io", Decimal("1.00"), "EUR")])


def test_backfill_equals_the_recomputation(fresh_url: str) -> None:
    with psycopg.connect(fresh_url, autocommit=True) as conn:
        fill(conn)
        assert AGGREGATES_MIGRATION in apply_migrations(fresh_url)
        for tenant in ("alpha", "beta", "gamma"):
            assert_exact(conn, tenant)
        for table in AGGREGATE_TABLES:
            row = conn.execute(
                f"SELECT count(*) FROM {table} WHERE tenant_id = 'leaving'"
            ).fetchone()
            assert row == (0,), table
        # And it stays exact under writes after the migration.
        add_quotes(conn, "alpha", [("bob@x.io ", Decimal("2.50"), "EUR")])
        conn.execute("UPDATE clients SET pipeline_stage = 'BOOKED' WHERE tenant_id = 'alpha'")
        assert_exact(conn, "alpha")


def test_writes_during_the_migration_are_counted_once(fresh_url: str) -> None:
    """A writer keeps committing small transactions while 0006 runs: those before
    the backfill are in it, those after go through the triggers, none is lost or
    counted twice (the migration holds clients and quotes against writes)."""
    with psycopg.connect(fresh_url, autocommit=True) as conn:
        fill(conn)
        add_clients(conn, "gamma", [(f"w{i}@x.io", "QUOTED") for i in range(2000)])
    stop = threading.Event()
    written: list[int] = []
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            with psycopg.connect(fresh_url, autocommit=True) as conn:
                i = 0
                while not stop.is_set() or i < 20:
                    add_clients(conn, "gamma", [(f"w{i % 50}@x.io", "PAID")])
                    add_quotes(conn, "gamma", [(f"W{i % 50}@x.io", Decimal("1.01"), "EUR")])
                    i += 1
                    written.append(i)
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(written) < 20:
            time.sleep(0.01)
        assert AGGREGATES_MIGRATION in apply_migrations(fresh_url)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert failures == []
    with psycopg.connect(fresh_url, autocommit=True) as conn:
        for tenant in ("alpha", "beta", "gamma"):
            assert_exact(conn, tenant)


def test_truncate_rebuilds_the_aggregates(fresh_url: str) -> None:
    """TRUNCATE fires no row or statement triggers: the aggregates are rebuilt,
    this transaction's earlier writes included."""
    apply_migrations(fresh_url)
    with psycopg.connect(fresh_url, autocommit=True) as conn:
        fill(conn)
        with conn.transaction():
            add_quotes(conn, "beta", [("c1@x.io", Decimal("7.00"), "GBP")])
            conn.execute("TRUNCATE quotes, invoices")
            add_quotes(conn, "beta", [("c2@x.io", Decimal("3.00"), "GBP")])
        for tenant in ("alpha", "beta", "gamma"):
            assert_exact(conn, tenant)
        conn.execute("TRUNCATE clients CASCADE")
        for tenant in ("alpha", "beta", "gamma"):
            assert_exact(conn, tenant)
