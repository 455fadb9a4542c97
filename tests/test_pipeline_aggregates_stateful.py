"""The trigger-maintained pipeline aggregates under random write sequences.

A hypothesis state machine inserts, updates and deletes clients and quotes of
several tenants (single rows, multi-row statements, multi-statement
transactions with rollbacks and savepoints, tenants being deprovisioned and
reactivated) and compacts the delta log at random points, also inside those
transactions. A small floor of the fold limit makes multi-row statements mark
their tenant for a rebuild, and backlogs go through the full scan. After every
step, for every tenant, the aggregate-backed pipeline_summary equals
pipeline_summary_recompute exactly (amount strings included) and every
aggregate row, stored plus pending, equals its recomputation. After each
compaction the stored rows alone must.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Any, ClassVar

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.aggregates import aggregate_rows, assert_exact, compact, pending_deltas
from tests.factories import create_tenant, unique_tenant

# Emails padded with every kind of whitespace, in random case, NULL, blank.
from tests.pipeline_reference import CURRENCIES, STAGES, emails

prices = st.one_of(
    st.none(),
    st.sampled_from([Decimal("0.00"), Decimal("10.00"), Decimal("-10.00")]),
    st.decimals(min_value=Decimal("-1000.00"), max_value=Decimal("999999999999.99"), places=2),
)
client_rows = st.tuples(emails(), st.sampled_from(STAGES))
quote_rows = st.tuples(emails(), prices, st.sampled_from(CURRENCIES))

# One change to an existing row: (column, new value).
client_changes = st.one_of(
    st.tuples(st.just("pipeline_stage"), st.sampled_from(STAGES)),
    st.tuples(st.just("email"), emails()),
)
quote_changes = st.one_of(
    st.tuples(st.just("total_price"), prices),
    st.tuples(st.just("currency"), st.sampled_from(CURRENCIES)),
    st.tuples(st.just("customer_email"), emails()),
)


class AggregatesMachine(RuleBasedStateMachine):
    database_url: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.conn = psycopg.connect(self.database_url, autocommit=True)
        self.tenants = [unique_tenant("agg") for _ in range(3)]
        self.clients: list[tuple[str, int]] = []
        self.quotes: list[tuple[str, int]] = []
        # Aggregate rows of a tenant when it was marked 'deprovisioning'.
        self.frozen: dict[str, dict[str, list[tuple[Any, ...]]]] = {}

    @initialize(fold_floor=st.sampled_from([3, 8, 10_000]))
    def create_tenants(self, fold_floor: int) -> None:
        """A small floor of pipeline_fold_limit sends multi-row statements down the
        rebuild-mark path and larger backlogs through the full scan and a rebuild."""
        self.conn.execute(f"SET crm_pipeline.min_fold_limit = {fold_floor}")
        for tenant in self.tenants:
            create_tenant(self.conn, tenant)

    def refresh(self) -> None:
        """Row ids as committed (rollbacks and deletes included), ordered by the
        tenant's position, not its id, so that a replayed example picks the same rows."""
        position = {tenant: i for i, tenant in enumerate(self.tenants)}

        def rows(table: str) -> list[tuple[str, int]]:
            found = self.conn.execute(
                f"SELECT tenant_id, id FROM {table} WHERE tenant_id = ANY (%s)", (self.tenants,)
            ).fetchall()
            return sorted(((t, i) for t, i in found), key=lambda r: (position[r[0]], r[1]))

        self.clients = rows("clients")
        self.quotes = rows("quotes")

    # Writes, each one statement (several rows where it says so). A write to
    # a tenant being deprovisioned must be refused by the write guard.

    def write(self, tenants: Iterable[str], sql: str, params: Any) -> None:
        if any(t in self.frozen for t in tenants):
            with pytest.raises(psycopg.Error) as refused:
                self.conn.execute(sql, params)
            assert refused.value.sqlstate == "CRM01", refused.value
            return
        self.conn.execute(sql, params)

    def _insert_clients(self, conn: psycopg.Connection[Any], tenant: str, rows: list[Any]) -> None:
        values = ", ".join(["(%s, %s, %s)"] * len(rows))
        params = [v for email, stage in rows for v in (tenant, email, stage)]
        sql = f"INSERT INTO clients (tenant_id, email, pipeline_stage) VALUES {values}"
        if conn is self.conn:
            self.write([tenant], sql, params)
        else:
            conn.execute(sql, params)

    def _insert_quotes(self, conn: psycopg.Connection[Any], tenant: str, rows: list[Any]) -> None:
        values = ", ".join(["(%s, %s, %s, %s)"] * len(rows))
        params = [v for email, price, currency in rows for v in (tenant, email, price, currency)]
        sql = (
            f"INSERT INTO quotes (tenant_id, customer_email, total_price, currency) VALUES {values}"
        )
        if conn is self.conn:
            self.write([tenant], sql, params)
        else:
            conn.execute(sql, params)

    @rule(
        tenant=st.integers(0, 2),
        rows=st.lists(client_rows, min_size=1, max_size=4),
    )
    def insert_clients(self, tenant: int, rows: list[Any]) -> None:
        self._insert_clients(self.conn, self.tenants[tenant], rows)

    @rule(
        tenant=st.integers(0, 2),
        rows=st.lists(quote_rows, min_size=1, max_size=4),
    )
    def insert_quotes(self, tenant: int, rows: list[Any]) -> None:
        self._insert_quotes(self.conn, self.tenants[tenant], rows)

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), change=client_changes)
    def update_client(self, data: st.DataObject, change: tuple[str, Any]) -> None:
        tenant, client_id = data.draw(st.sampled_from(self.clients))
        column, value = change
        self.write(
            [tenant],
            f"UPDATE clients SET {column} = %s WHERE tenant_id = %s AND id = %s",
            (value, tenant, client_id),
        )

    @precondition(lambda self: self.clients)
    @rule(data=st.data(), to_tenant=st.integers(0, 2))
    def move_client_to_another_tenant(self, data: st.DataObject, to_tenant: int) -> None:
        tenant, client_id = data.draw(st.sampled_from(self.clients))
        self.write(  # the guard checks where rows go: moving one out is allowed
            [self.tenants[to_tenant]],
            "UPDATE clients SET tenant_id = %s WHERE tenant_id = %s AND id = %s",
            (self.tenants[to_tenant], tenant, client_id),
        )

    @precondition(lambda self: self.quotes)
    @rule(data=st.data(), change=quote_changes)
    def update_quote(self, data: st.DataObject, change: tuple[str, Any]) -> None:
        tenant, quote_id = data.draw(st.sampled_from(self.quotes))
        column, value = change
        self.write(
            [tenant],
            f"UPDATE quotes SET {column} = %s WHERE tenant_id = %s AND id = %s",
            (value, tenant, quote_id),
        )

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def delete_client(self, data: st.DataObject) -> None:
        tenant, client_id = data.draw(st.sampled_from(self.clients))
        self.conn.execute(
            "DELETE FROM clients WHERE tenant_id = %s AND id = %s", (tenant, client_id)
        )

    @precondition(lambda self: self.quotes)
    @rule(data=st.data())
    def delete_quote(self, data: st.DataObject) -> None:
        tenant, quote_id = data.draw(st.sampled_from(self.quotes))
        self.conn.execute("DELETE FROM quotes WHERE tenant_id = %s AND id = %s", (tenant, quote_id))

    @rule(tenant=st.integers(0, 2), stage=st.sampled_from(STAGES), parity=st.integers(0, 1))
    def move_every_other_client(self, tenant: int, stage: str, parity: int) -> None:
        """One UPDATE of several rows (every other client of the tenant, by position)."""
        tenant_id = self.tenants[tenant]
        ids = [i for t, i in self.clients if t == tenant_id][parity::2]
        if not ids:
            return  # an UPDATE of no rows is refused by nothing
        self.write(
            [tenant_id],
            "UPDATE clients SET pipeline_stage = %s WHERE tenant_id = %s AND id = ANY (%s)",
            (stage, tenant_id, ids),
        )

    @rule(tenant=st.integers(0, 2), delta=st.sampled_from(["1.00", "-0.01", "0.00"]))
    def reprice_all_quotes(self, tenant: int, delta: str) -> None:
        if self.tenants[tenant] in self.frozen:
            return  # refused or not depending on whether it has quotes left
        self.conn.execute(
            # Rows at the edge of numeric(14, 2) would overflow.
            "UPDATE quotes SET total_price = total_price + %s::numeric"
            " WHERE tenant_id = %s AND abs(total_price) < 999999999990",
            (delta, self.tenants[tenant]),
        )

    @rule(tenant=st.integers(0, 2), currency=st.sampled_from(CURRENCIES))
    def delete_quotes_in_a_currency(self, tenant: int, currency: str) -> None:
        self.conn.execute(
            "DELETE FROM quotes WHERE tenant_id = %s AND currency = %s",
            (self.tenants[tenant], currency),
        )

    @rule(tenant=st.integers(0, 2), client=client_rows, quote=quote_rows, same_email=st.booleans())
    def insert_client_and_quote_in_one_statement(
        self, tenant: int, client: tuple[Any, str], quote: tuple[Any, Any, str], same_email: bool
    ) -> None:
        """Both tables' triggers fire in one statement (a data-modifying CTE)."""
        email, stage = client
        quote_email, price, currency = quote
        self.write(
            [self.tenants[tenant]],
            "WITH c AS (INSERT INTO clients (tenant_id, email, pipeline_stage)"
            " VALUES (%(t)s, %(e)s, %(s)s) RETURNING id)"
            " INSERT INTO quotes (tenant_id, customer_email, total_price, currency)"
            " SELECT %(t)s, %(qe)s, %(p)s, %(c)s FROM c",
            {
                "t": self.tenants[tenant],
                "e": email,
                "s": stage,
                "qe": email if same_email else quote_email,
                "p": price,
                "c": currency,
            },
        )

    @rule(
        tenant=st.integers(0, 2),
        steps=st.lists(
            st.tuples(
                st.sampled_from(
                    ["client", "client", "quote", "quote", "savepoint", "rollback_to", "compact"]
                ),
                st.booleans(),
                client_rows,
                quote_rows,
            ),
            min_size=1,
            max_size=6,
        ),
        shared_email=emails(),
        commit=st.booleans(),
    )
    def transaction(
        self, tenant: int, steps: list[Any], shared_email: str | None, commit: bool
    ) -> None:
        """Several statements in one transaction, mostly about one address (so that
        the transaction's own clients and quotes match): savepoints rolled back, a
        compaction in the middle (of its own deltas too), committed or not."""
        tenant_id = self.tenants[tenant]
        if tenant_id in self.frozen:
            return  # its writes are refused; the single-statement rules check that
        self.conn.autocommit = False
        try:
            savepoint = False
            for kind, use_shared, (email, stage), (quote_email, price, currency) in steps:
                if kind == "client":
                    row = (shared_email if use_shared else email, stage)
                    self._insert_clients(self.conn, tenant_id, [row])
                elif kind == "quote":
                    quote = (shared_email if use_shared else quote_email, price, currency)
                    self._insert_quotes(self.conn, tenant_id, [quote])
                elif kind == "savepoint":
                    self.conn.execute("SAVEPOINT step")
                    savepoint = True
                elif kind == "rollback_to" and savepoint:
                    self.conn.execute("ROLLBACK TO SAVEPOINT step")
                elif kind == "compact":
                    compact(self.conn)
            if commit:
                self.conn.commit()
            else:
                self.conn.rollback()
        except BaseException:
            self.conn.rollback()
            raise
        finally:
            self.conn.autocommit = True

    @rule(tenant=st.integers(0, 2))
    def toggle_deprovisioning(self, tenant: int) -> None:
        """Mark a tenant 'deprovisioning' (its aggregates must then stay as they
        are) or back 'active' (they are rebuilt)."""
        tenant_id = self.tenants[tenant]
        if tenant_id in self.frozen:
            self.conn.execute("UPDATE tenants SET status = 'active' WHERE id = %s", (tenant_id,))
            del self.frozen[tenant_id]
        else:
            self.conn.execute(
                "UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (tenant_id,)
            )
            self.frozen[tenant_id] = aggregate_rows(self.conn, tenant_id)

    @rule()
    def compact_the_log(self) -> None:
        """What the CRM service's compactor does in the background; tenants
        being deprovisioned are skipped."""
        compact(self.conn)
        for tenant in self.tenants:
            if tenant not in self.frozen:
                assert pending_deltas(self.conn, tenant) == 0

    @invariant()
    def aggregates_equal_the_recomputation(self) -> None:
        self.refresh()
        for tenant in self.tenants:
            if tenant in self.frozen:
                assert aggregate_rows(self.conn, tenant) == self.frozen[tenant]
            else:
                assert_exact(self.conn, tenant, compacted=False)

    def teardown(self) -> None:
        """Remove the tenants the way deprovisioning does: mark them, delete their
        rows (no aggregate work), then the aggregate rows, then the tenant rows."""
        try:
            self.conn.execute(
                "UPDATE tenants SET status = 'deprovisioning' WHERE id = ANY (%s)", (self.tenants,)
            )
            frozen = {tenant: aggregate_rows(self.conn, tenant) for tenant in self.tenants}
            self.conn.execute("DELETE FROM quotes WHERE tenant_id = ANY (%s)", (self.tenants,))
            self.conn.execute("DELETE FROM clients WHERE tenant_id = ANY (%s)", (self.tenants,))
            assert {t: aggregate_rows(self.conn, t) for t in self.tenants} == frozen
            for table in (
                "pipeline_stage_values",
                "pipeline_stage_clients",
                "pipeline_deltas",
                "tenant_settings",
            ):
                self.conn.execute(
                    f"DELETE FROM {table} WHERE tenant_id = ANY (%s)", (self.tenants,)
                )
            self.conn.execute("DELETE FROM tenants WHERE id = ANY (%s)", (self.tenants,))
        finally:
            self.conn.close()


# A pass takes well under a minute; a failure is then shrunk, which takes longer.
@pytest.mark.timeout(900)
def test_aggregates_equal_the_recomputation_after_every_step(database_url: str) -> None:
    class Machine(AggregatesMachine):
        pass

    Machine.database_url = database_url
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
