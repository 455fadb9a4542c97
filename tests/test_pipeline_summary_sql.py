"""pipeline_summary (the SQL function) against an independent Python reference
over hypothesis-generated data, several tenants side by side."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import add_clients, add_quotes, create_tenant, unique_tenant

STAGES = ["QUOTED", "NEGOTIATING", "BOOKED", "PAID", "TRAVELLED", "LOST"]
OPEN = {"QUOTED", "NEGOTIATING", "BOOKED", "PAID"}

# A small pool of addresses so that matches are frequent, written with
# varying case and padding, plus NULL and blank.
BASE_EMAILS = ["ann@x.io", "bob@x.io", "cy@y.org"]


@st.composite
def email(draw: st.DrawFn) -> str | None:
    kind = draw(st.sampled_from(["null", "blank", "address", "address", "address"]))
    if kind == "null":
        return None
    if kind == "blank":
        return draw(st.sampled_from(["", "  ", "\t"]))
    base = draw(st.sampled_from(BASE_EMAILS))
    cased = "".join(c.upper() if draw(st.booleans()) else c for c in base)
    return draw(st.sampled_from(["", " ", "  "])) + cased + draw(st.sampled_from(["", " ", "\t"]))


prices = st.one_of(
    st.none(),
    st.decimals(min_value=Decimal("-1000.00"), max_value=Decimal("999999999999.99"), places=2),
)
clients = st.lists(st.tuples(email(), st.sampled_from(STAGES)), max_size=8)
quotes = st.lists(st.tuples(email(), prices, st.sampled_from(["EUR", "USD", "JPY"])), max_size=10)
tenant_data = st.tuples(clients, quotes)


def normalise(value: str | None) -> str | None:
    if value is None:
        return None
    # btrim() without characters strips spaces only: a tab is not blank.
    key = value.strip(" ").lower()
    return key or None


def reference(data: tuple[list[Any], list[Any]]) -> dict[str, Any]:
    """design §6, computed directly in Python."""
    client_rows, quote_rows = data
    counts: dict[str, int] = defaultdict(int)
    values: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for client_email, stage in client_rows:
        counts[stage] += 1
        key = normalise(client_email)
        for quote_email, price, currency in quote_rows:
            if key is not None and price is not None and normalise(quote_email) == key:
                values[stage][currency] += price
    open_value: dict[str, Decimal] = defaultdict(Decimal)
    for stage in OPEN:
        for currency, amount in values[stage].items():
            open_value[currency] += amount
    return {
        "stages": [
            {
                "stage": s,
                "open": s in OPEN,
                "client_count": counts[s],
                "value": [{"currency": c, "amount": values[s][c]} for c in sorted(values[s])],
            }
            for s in STAGES
        ],
        "total_clients": len(client_rows),
        "open_value": [{"currency": c, "amount": open_value[c]} for c in sorted(open_value)],
    }


def from_database(document: dict[str, Any]) -> dict[str, Any]:
    def amounts(items: list[dict[str, str]]) -> list[dict[str, Any]]:
        return [{"currency": i["currency"], "amount": Decimal(i["amount"])} for i in items]

    return {
        "stages": [
            {
                "stage": s["stage"],
                "open": s["open"],
                "client_count": s["client_count"],
                "value": amounts(s["value"]),
            }
            for s in document["stages"]
        ],
        "total_clients": document["total_clients"],
        "open_value": amounts(document["open_value"]),
    }


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tenants=st.lists(tenant_data, min_size=1, max_size=3))
def test_matches_reference_across_tenants(sql: psycopg.Connection[Any], tenants: list[Any]) -> None:
    ids = [unique_tenant("hyp") for _ in tenants]
    for tenant_id, (client_rows, quote_rows) in zip(ids, tenants, strict=True):
        create_tenant(sql, tenant_id)
        add_clients(sql, tenant_id, client_rows)
        add_quotes(sql, tenant_id, quote_rows)
    for tenant_id, data in zip(ids, tenants, strict=True):
        row = sql.execute("SELECT pipeline_summary(%s)", (tenant_id,)).fetchone()
        assert row is not None
        assert from_database(row[0]) == reference(data)


def test_two_clients_sharing_an_email_each_count_the_quotes(sql: psycopg.Connection[Any]) -> None:
    tenant_id = unique_tenant()
    create_tenant(sql, tenant_id)
    add_clients(sql, tenant_id, [("Pat@x.io", "QUOTED"), (" pat@X.IO ", "LOST")])
    add_quotes(sql, tenant_id, [("pat@x.io", Decimal("10.05"), "EUR")])
    row = sql.execute("SELECT pipeline_summary(%s)", (tenant_id,)).fetchone()
    assert row is not None
    doc = from_database(row[0])
    by_stage = {s["stage"]: s for s in doc["stages"]}
    assert by_stage["QUOTED"]["value"] == [{"currency": "EUR", "amount": Decimal("10.05")}]
    assert by_stage["LOST"]["value"] == [{"currency": "EUR", "amount": Decimal("10.05")}]
    assert doc["open_value"] == [{"currency": "EUR", "amount": Decimal("10.05")}]


def test_large_sums_stay_exact(sql: psycopg.Connection[Any]) -> None:
    """Amounts beyond float precision come back to the cent."""
    tenant_id = unique_tenant()
    create_tenant(sql, tenant_id)
    add_clients(sql, tenant_id, [("big@x.io", "PAID")] * 3)
    add_quotes(sql, tenant_id, [("big@x.io", Decimal("999999999999.99"), "USD")] * 4)
    row = sql.execute("SELECT pipeline_summary(%s)", (tenant_id,)).fetchone()
    assert row is not None
    paid = next(s for s in row[0]["stages"] if s["stage"] == "PAID")
    assert paid["value"] == [{"currency": "USD", "amount": "11999999999999.88"}]
