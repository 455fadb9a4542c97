"""Concurrent writers in one tenant: the aggregates stay exact and nobody deadlocks.

Real connections in threads. Writers only append deltas to pipeline_deltas
(no aggregate row is locked by a write), and a compactor folds committed
deltas in, one compactor per tenant at a time; so statements may interleave in
any order without a deadlock, and a client and a quote for the same email
committed at the same time are both counted against each other.
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

from tests.aggregates import assert_exact, compact, pending_deltas, summaries
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


def wait_until_blocked(sql: psycopg.Connection[Any], pid: int, failure: str) -> None:
    """Wait (up to 5 s) until backend `pid` waits for a lock."""
    for _ in range(500):
        row = sql.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        if row == ("Lock",):
            return
        threading.Event().wait(0.01)
    raise AssertionError(failure)


def test_statements_interleaved_in_opposite_orders_do_not_deadlock(
    database_url: str, sql: psycopg.Connection[Any]
) -> None:
    """A touches QUOTED then BOOKED, B touches BOOKED then QUOTED, statement by
    statement, in the same emails in opposite orders. Row locks on the
    aggregates taken by each statement would deadlock; appending deltas cannot."""
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


def test_repeatable_read_writers_both_commit_with_exact_totals(
    database_url: str, sql: psycopg.Connection[Any]
) -> None:
    """Under REPEATABLE READ neither writer sees the other's row; their deltas
    are independent, so both commit and the cross term is still counted."""
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
        b.commit()
    aggregated, _ = summaries(sql, tenant)
    booked = next(s for s in aggregated["stages"] if s["stage"] == "BOOKED")
    assert booked["value"] == [{"currency": "USD", "amount": "7.00"}]
    assert_exact(sql, tenant)


def test_compaction_refuses_to_run_on_a_stale_snapshot(
    database_url: str, sql: psycopg.Connection[Any]
) -> None:
    """Compaction reads the aggregates as the last compaction left them: under
    REPEATABLE READ it could read an older state, so it refuses."""
    with connections(database_url, 1) as (conn,):
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with pytest.raises(errors.ObjectNotInPrerequisiteState) as caught:
            conn.execute("SELECT pipeline_compact()")
        assert caught.value.diag.message_hint == "READ_COMMITTED_REQUIRED"


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

        done = threading.Event()

        def compactor() -> None:
            # As the CRM service does, but without pausing.
            with psycopg.connect(database_url, autocommit=True) as conn:
                while not done.is_set():
                    row = conn.execute("SELECT pipeline_compact(50)").fetchone()
                    assert row is not None
                    compactions.append(row[0]["compacted"])

        def writers_then_done() -> None:
            try:
                failures.extend(run_together(*(writer(c, seed) for seed, c in enumerate(conns))))
            finally:
                done.set()

        compactions: list[int] = []
        failures: list[BaseException] = []
        assert run_together(writers_then_done, compactor) == []
    assert failures == [], failures
    assert sum(compactions) > 0  # the compactor did fold deltas in while they wrote
    assert_exact(sql, tenant)


AGGREGATES_AND_LOG = (
    "pipeline_stage_values",
    "pipeline_stage_clients",
    "pipeline_deltas",
)


def test_a_commit_racing_a_status_change_does_not_resurrect_aggregates(
    database_url: str, sql: psycopg.Connection[Any]
) -> None:
    """A writer logged a delta while the tenant was active; the tenant is marked
    'deprovisioning' and its aggregates deleted before the writer commits:
    compaction leaves the late delta alone, so once the data, the aggregate rows
    and the log are deleted the tenant row can go."""
    tenant = unique_tenant("race")
    create_tenant(sql, tenant)
    add_clients(sql, tenant, [("late@x.io", "QUOTED")])
    compact(sql)
    with connections(database_url, 1) as (writer,):
        writer.execute(
            "INSERT INTO quotes (tenant_id, customer_email, total_price, currency)"
            " VALUES (%s, 'late@x.io', 3.00, 'EUR')",
            (tenant,),
        )
        sql.execute("UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (tenant,))
        for table in AGGREGATES_AND_LOG:
            sql.execute(f"DELETE FROM {table} WHERE tenant_id = %s", (tenant,))
        writer.commit()
    compact(sql)
    assert pending_deltas(sql, tenant) == 1
    sql.execute("DELETE FROM quotes WHERE tenant_id = %s", (tenant,))
    sql.execute("DELETE FROM clients WHERE tenant_id = %s", (tenant,))
    for table in AGGREGATES_AND_LOG[:-1]:
        row = sql.execute(
            f"SELECT count(*) FROM {table} WHERE tenant_id = %s", (tenant,)
        ).fetchone()
        assert row == (0,), table
    sql.execute("DELETE FROM pipeline_deltas WHERE tenant_id = %s", (tenant,))
    sql.execute("DELETE FROM tenant_settings WHERE tenant_id = %s", (tenant,))
    sql.execute("DELETE FROM tenants WHERE id = %s", (tenant,))


def test_a_delete_waiting_for_a_reactivation_is_counted(
    database_url: str, sql: psycopg.Connection[Any]
) -> None:
    """A delete sees the tenant 'deprovisioning' (nothing to log) while another
    transaction is making it active again and rebuilding its aggregates without
    that delete: the delete waits for the tenant lock, reads the status again,
    and logs its delta after all."""
    tenant = unique_tenant("back")
    create_tenant(sql, tenant)
    add_clients(sql, tenant, [("a@x.io", "PAID"), ("b@x.io", "PAID")])
    add_quotes(sql, tenant, [("a@x.io", Decimal("4.00"), "EUR")])
    sql.execute("UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (tenant,))
    with connections(database_url, 2) as (reactivation, deleter):
        reactivation.execute("UPDATE tenants SET status = 'active' WHERE id = %s", (tenant,))
        deleter_pid = deleter.info.backend_pid

        def delete() -> None:
            deleter.execute(
                "DELETE FROM clients WHERE tenant_id = %s AND email = 'a@x.io'", (tenant,)
            )
            deleter.commit()

        def reactivate_once_the_delete_waits() -> None:
            wait_until_blocked(sql, deleter_pid, "the delete never waited for the tenant lock")
            reactivation.commit()

        assert run_together(delete, reactivate_once_the_delete_waits) == []
    aggregated, _ = summaries(sql, tenant)
    assert aggregated["total_clients"] == 1
    assert_exact(sql, tenant)


def test_a_compaction_skips_a_tenant_being_rebuilt_and_applies_nothing_twice(
    database_url: str, sql: psycopg.Connection[Any]
) -> None:
    """A rebuild folds every visible delta in under the tenant's lock; a
    compaction meanwhile skips the tenant (busy) instead of waiting, and once
    the rebuild commits finds those deltas gone instead of applying them again."""
    tenant = unique_tenant("rebuilt")
    create_tenant(sql, tenant)
    add_clients(sql, tenant, [("a@x.io", "PAID"), ("b@x.io", "LOST")])
    add_quotes(sql, tenant, [("a@x.io", Decimal("6.00"), "EUR")])
    assert pending_deltas(sql, tenant) > 0
    with connections(database_url, 2) as (rebuilder, compactor):
        rebuilder.execute("SELECT pipeline_aggregates_rebuild(%s)", (tenant,))
        compactor.execute("SET crm_pipeline.min_fold_limit = 1000000")
        row = compactor.execute("SELECT pipeline_compact()").fetchone()
        compactor.commit()
        assert row is not None and row[0]["busy"] >= 1, row
        assert pending_deltas(sql, tenant) > 0  # the rebuild has not committed
        rebuilder.commit()
    assert pending_deltas(sql, tenant) == 0
    assert_exact(sql, tenant)
