"""Rows for tests, inserted with plain SQL into the real database."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import psycopg

_counter = itertools.count(1)


def unique_tenant(prefix: str = "t") -> str:
    """A tenant id no other test uses (tests share one database)."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


def create_tenant(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    *,
    status: str = "active",
    sendgrid_username: str | None = None,
) -> None:
    """A tenant and its settings row, then `status` (a tenant being
    deprovisioned accepts no new rows, its settings included)."""
    conn.execute("INSERT INTO tenants (id, name) VALUES (%s, %s)", (tenant_id, tenant_id))
    conn.execute(
        "INSERT INTO tenant_settings (tenant_id, sendgrid_username) VALUES (%s, %s)",
        (tenant_id, sendgrid_username),
    )
    if status != "active":
        conn.execute("UPDATE tenants SET status = %s WHERE id = %s", (status, tenant_id))


def add_clients(
    conn: psycopg.Connection[Any], tenant_id: str, clients: Iterable[tuple[str | None, str]]
) -> list[int]:
    """(email, stage) pairs; returns the new ids."""
    ids = []
    for email, stage in clients:
        row = conn.execute(
            "INSERT INTO clients (tenant_id, email, pipeline_stage) VALUES (%s, %s, %s) RETURNING id",
            (tenant_id, email, stage),
        ).fetchone()
        assert row is not None
        ids.append(row[0])
    return ids


def add_quotes(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    quotes: Iterable[tuple[str | None, Decimal | None, str]],
) -> None:
    """(customer_email, total_price, currency) triples."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO quotes (tenant_id, customer_email, total_price, currency) VALUES (%s, %s, %s, %s)",
            [(tenant_id, e, p, c) for e, p, c in quotes],
        )
