"""Concurrent writers in one tenant: the aggregates stay exact and nobody deadlocks.

Real connections in threads. The aggregates are applied at commit in one
fixed lock order, so statements may interleave in any order without a
deadlock; a client and a quote for the same email committed at the same time
are both counted against each other (the email row serializes them).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.aggregates import assert_exact, summaries
from tests.factories import add_clients, add_quotes, create_tenant, unique_tenant

STAGES = ["QUOTED", "NEGOTIATING", "BOOKED", "PAID", "TRAVELLED", "LOST"]
EMAILS = [f"client{i}@x.io" for i in range(6)]


@contextmanager
def connections(database_url: str, count: int) -> Iterator[list[psycopg.Connection[Any]]]:
    conns = [psycopg.connect(database_url, application_name="agg_writer") for _ in range(count)]
    try:
        yield conns
    finally:
        for conn in conns:
            conn.close()


def run_together(*work: Callable[[], None]) -> list[BaseException]:
    """Run each callable in its own thread; return what they raised."""
    failures: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=guarded, args=(fn,)) for fn in work]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a writer is stuck"
    return failures


def test_statements_interleaved_in_opposite_orders_do_not_deadlock(
    database_url: str, sql: psycopg.Connection[Any]
) -> None:
    """A touches QUOTED then BOOKED, B touches BOOKED then QUOTED, statement by
    statement, in the same emails in opposite orders. Row locks taken by each
    statement would deadlock; locks taken at commit, in key order, cannot."""
    tenant = unique_tenant("interleave")
    create_tenant(sql, tenant)
    add_quotes(
        sql, tenant, [("a@x.io", Decimal("1.00"), "EUR"), ("b@x.io", Decimal("2.00"), "EUR")]
    )
    with connections(database_url, 2) as (a, b):
        plan = [
            (a, "a@x.io", "QUOTED"),
            (b, "b@x.io", "BOOKED"),
            (a, "b@x.io", "BOOKED"),
            (b, "a@x.io", "QUOTED"),
        ]
        for conn, email, stage in plan:
            conn.execute(
                "INSERT INTO clients (tenant_id, email, pipeline_stage) VALUES (%s, %s, %s)",
                (tenant, email, stage),
            )
        barrier = threading.Barrier(2)

        def commit(conn: psycopg.Connection[Any]) -> Callable[[], None]:
            def go() -> None:
                barrier.wait()
                conn.commit()

            return go

        assert run_together(commit(a), commit(b)) == []
    assert_exact(sql, tenant)


@pytest.mark.parametrize("round_", range(10))
def test_a_client_and_a_quote_of_one_email_committed_together_are_both_counted(
    database_url: str, sql: psycopg.Connection[Any], round_: int
) -> None:
    """The cross term: neither transaction sees the other's row before commit,
    yet the new client's stage gets the new quote's value."""
    tenant = unique_tenant("cross")
    create_tenant(sql, tenant)
    add_clients(sql, tenant, [("pat@x.io", "PAID")])
    add_quotes(sql, tenant, [("pat@x.io", Decimal("5.00"), "EUR")])
    with connections(database_url, 2) as (a, b):
        a.execute(
            "INSERT INTO clients (tenant_id, email, pipeline_stage) VALUES (%s, ' PAT@x.io', 'QUOTED')",
            (tenant,),
        )
        b.execute(
            "INSERT INTO quotes (tenant_id, customer_email, total_price, currency)"
            " VALUES (%s, 'pat@X.IO', 100.00, 'EUR')",
            (tenant,),
        )
        barrier = threading.Barrier(2)

        def commit(conn: psycopg.Connection[Any]) -> Callable[[], None]:
            def go() -> None:
                barrier.wait()
                conn.commit()

            return go

        # Vary who reaches the commit first.
        order = (a, b) if round_ % 2 else (b, a)
        assert run_together(*(commit(c) for c in order)) == []
    aggregated, recomputed = summaries(sql, tenant)
    assert aggregated == recomputed
    stages = {s["stage"]: s for s in aggregated["stages"]}
    assert stages["QUOTED"]["value"] == [{"currency": "EUR", "amount": "105.00"}]
    assert stages["PAID"]["value"] == [{"currency": "EUR", "amount": "105.00"}]
    assert_exact(sql, tenant)


def test_repeatable_read_writers_get_a_serialization_failure_not_a_wrong_total(
    database_url: str, sql: psycopg.Connection[Any]
) -> None:
    """Under REPEATABLE READ the second commit cannot see the first one's client:
    it must fail (40001, retryable) rather than miss the cross term."""
    tenant = unique_tenant("rr")
    create_tenant(sql, tenant)
    with connections(database_url, 2) as (a, b):
        for conn in (a, b):
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.execute("SELECT 1 FROM tenants LIMIT 1")  # takes the snapshot
        a.execute(
            "INSERT INTO clients (tenant_id, email, pipeline_stage) VALUES (%s, 'rr@x.io', 'BOOKED')",
            (tenant,),
        )
        b.execute(
            "INSERT INTO quotes (tenant_id, customer_email, total_price, currency)"
            " VALUES (%s, 'rr@x.io', 7.00, 'USD')",
            (tenant,),
        )
        a.commit()
        with pytest.raises(errors.SerializationFailure):
            b.commit()
    assert_exact(sql, tenant)


def test_many_writers_with_rollbacks_keep_the_totals_exact(
    database_url: str, sql: psycopg.Connection[Any]
) -> None:
    """Six connections, interleaved multi-statement transactions on a few shared
    emails (so that their quotes and clients meet), some rolled back, some with
    a savepoint rolled back: no deadlock, no error, exact totals."""
    tenant = unique_tenant("writers")
    create_tenant(sql, tenant)
    writers, transactions = 6, 25
    with connections(database_url, writers) as conns:

        def writer(conn: psycopg.Connection[Any], seed: int) -> Callable[[], None]:
            rng = random.Random(seed)
            own_clients: list[int] = []
            own_quotes: list[int] = []

            def statement() -> None:
                kind = rng.choice(
                    ["client", "client", "quote", "quote", "stage", "price", "delete"]
                )
                email = rng.choice(EMAILS)
                if kind == "client":
                    row = conn.execute(
                        "INSERT INTO clients (tenant_id, email, pipeline_stage)"
                        " VALUES (%s, %s, %s) RETURNING id",
                        (
                            tenant,
                            rng.choice([email, email.upper(), f" {email} "]),
                            rng.choice(STAGES),
                        ),
                    ).fetchone()
                    assert row is not None
                    own_clients.append(row[0])
                elif kind == "quote":
                    price = rng.choice([None, Decimal(rng.randint(-500, 100000)) / 100])
                    row = conn.execute(
                        "INSERT INTO quotes (tenant_id, customer_email, total_price, currency)"
                        " VALUES (%s, %s, %s, %s) RETURNING id",
                        (tenant, email, price, rng.choice(["EUR", "USD"])),
                    ).fetchone()
                    assert row is not None
                    own_quotes.append(row[0])
                elif kind == "stage" and own_clients:
                    conn.execute(
                        "UPDATE clients SET pipeline_stage = %s WHERE tenant_id = %s AND id = %s",
                        (rng.choice(STAGES), tenant, rng.choice(own_clients)),
                    )
                elif kind == "price" and own_quotes:
                    conn.execute(
                        "UPDATE quotes SET total_price = %s WHERE tenant_id = %s AND id = %s",
                        (rng.choice([None, Decimal("9.99")]), tenant, rng.choice(own_quotes)),
                    )
                elif kind == "delete" and own_clients:
                    conn.execute(
                        "DELETE FROM clients WHERE tenant_id = %s AND id = %s",
                        (tenant, own_clients.pop(rng.randrange(len(own_clients)))),
                    )

            def go() -> None:
                for _ in range(transactions):
                    # Ids are only kept once their transaction commits.
                    kept = (list(own_clients), list(own_quotes))
                    for _ in range(rng.randint(1, 4)):
                        statement()
                    if rng.random() < 0.2:
                        conn.execute("SAVEPOINT s")
                        statement()
                        conn.execute("ROLLBACK TO SAVEPOINT s")
                    if rng.random() < 0.25:
                        conn.rollback()
                        own_clients[:], own_quotes[:] = kept
                    else:
                        conn.commit()

            return go

        failures = run_together(*(writer(c, seed) for seed, c in enumerate(conns)))
    assert failures == [], failures
    assert_exact(sql, tenant)


def test_a_commit_racing_a_status_change_does_not_resurrect_aggregates(
    database_url: str, sql: psycopg.Connection[Any]
) -> None:
    """A writer staged deltas while the tenant was active; the tenant is marked
    'deprovisioning' before the writer commits: the commit applies nothing, so
    once the data and the aggregate rows are deleted the tenant row can go."""
    tenant = unique_tenant("race")
    create_tenant(sql, tenant)
    add_clients(sql, tenant, [("late@x.io", "QUOTED")])
    with connections(database_url, 1) as (writer,):
        writer.execute(
            "INSERT INTO quotes (tenant_id, customer_email, total_price, currency)"
            " VALUES (%s, 'late@x.io', 3.00, 'EUR')",
            (tenant,),
        )
        sql.execute("UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (tenant,))
        for table in (
            "pipeline_stage_values",
            "pipeline_stage_clients",
            "pipeline_email_quotes",
            "pipeline_email_clients",
            "pipeline_emails",
        ):
            sql.execute(f"DELETE FROM {table} WHERE tenant_id = %s", (tenant,))
        writer.commit()
    sql.execute("DELETE FROM quotes WHERE tenant_id = %s", (tenant,))
    sql.execute("DELETE FROM clients WHERE tenant_id = %s", (tenant,))
    for table in (
        "pipeline_stage_values",
        "pipeline_stage_clients",
        "pipeline_email_quotes",
        "pipeline_email_clients",
        "pipeline_emails",
    ):
        row = sql.execute(
            f"SELECT count(*) FROM {table} WHERE tenant_id = %s", (tenant,)
        ).fetchone()
        assert row == (0,), table
    sql.execute("DELETE FROM tenant_settings WHERE tenant_id = %s", (tenant,))
    sql.execute("DELETE FROM tenants WHERE id = %s", (tenant,))
