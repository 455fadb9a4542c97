"""pipeline_summary (the SQL function) against an independent Python reference
over hypothesis-generated data, several tenants side by side; the email key
against Python's str.strip().lower() for every whitespace character."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import add_clients, add_quotes, create_tenant, unique_tenant
from tests.pipeline_reference import WHITESPACE, email_key, reference, tenant_data


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


def test_the_email_key_strips_what_python_strips(sql: psycopg.Connection[Any]) -> None:
    samples = [f"{ws}Ann@X.io{ws}" for ws in WHITESPACE] + [ws * 2 for ws in WHITESPACE]
    samples += ["\u200bann@x.io", "ann@x.io\ufeff", " \t\r\n", "", None]
    rows = sql.execute(
        "SELECT e, pipeline_email_key(e) FROM unnest(%s::text[]) WITH ORDINALITY AS u(e, n)"
        " ORDER BY n",
        (samples,),
    ).fetchall()
    assert [key for _, key in rows] == [email_key(e) for e in samples]
    assert {key for _, key in rows[: len(WHITESPACE)]} == {"ann@x.io"}
