"""Which tables are the tenant's: found by foreign keys, not by column names.

A throwaway database gets the real migrations and then tests/sql/discovery_tables.sql:
a tenant column under another name (trips.owner_tenant), a grandchild without one
(trip_legs, through its trip's key), a self-referencing great-grandchild (leg_stops)
and a derived table added later (trip_leg_counts). A table whose rows cannot be
attributed to one tenant refuses the dry run and the run before anything is touched.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import pytest_asyncio

from devkit.databases import throwaway_database
from shared.auth import TokenRegistry
from shared.database import Database
from shared.proto_gen.provisioning.v1 import provisioning_pb2 as pb
from tests.factories import unique_tenant
from tests.provisioning_fixtures import (
    DERIVED_TABLES,
    FakeSendGrid,
    adapter_on,
    provisioning_server,
    seed_tenant,
    tenant_status,
)
from tests.rpc import error_info

DISCOVERY_TABLES = Path(__file__).parent / "sql" / "discovery_tables.sql"
# The tables discovery_tables.sql adds, each with the column that selects a tenant's rows.
ADDED = {
    "trips": "SELECT * FROM trips WHERE owner_tenant = %(t)s",
    "trip_legs": "SELECT l.* FROM trip_legs l JOIN trips t ON t.id = l.trip_id"
    " WHERE t.owner_tenant = %(t)s",
    "leg_stops": "SELECT s.* FROM leg_stops s JOIN trip_legs l ON l.id = s.leg_id"
    " JOIN trips t ON t.id = l.trip_id WHERE t.owner_tenant = %(t)s",
    "trip_leg_counts": "SELECT * FROM trip_leg_counts WHERE owner_tenant = %(t)s",
}


@pytest.fixture(scope="module")
def discovery_name() -> str:
    return f"crm_discovery_{os.getpid()}"


@pytest.fixture(scope="module")
def discovery_url(pg_server_url: str, discovery_name: str) -> Iterator[str]:
    with throwaway_database(pg_server_url, discovery_name) as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(DISCOVERY_TABLES.read_text())
        yield url


@pytest.fixture
def discovery_sql(discovery_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(discovery_url, autocommit=True, application_name="tests") as conn:
        yield conn


@pytest_asyncio.fixture
async def discovery_db(
    transport: str, discovery_url: str, discovery_name: str, request: pytest.FixtureRequest
) -> AsyncIterator[Database]:
    """The service's database adapter on the throwaway database, per transport."""
    async with adapter_on(transport, discovery_url, discovery_name, request) as db:
        yield db


def seed_trips(conn: psycopg.Connection[Any], tenant: str, trips: int) -> dict[str, int]:
    """Trips of the tenant, 3 legs each, 2 chained stops per leg, a count per trip."""
    seed_tenant(conn, tenant, clients=2)
    args = {"t": tenant, "n": trips}
    conn.execute(
        "INSERT INTO trips (owner_tenant, title)"
        " SELECT %(t)s, format('trip %%s', g) FROM generate_series(1, %(n)s) g",
        args,
    )
    conn.execute(
        "INSERT INTO trip_legs (trip_id, destination) SELECT id, format('leg %%s', g)"
        " FROM trips, generate_series(1, 3) g WHERE owner_tenant = %(t)s",
        args,
    )
    for (leg_id,) in conn.execute(
        "SELECT l.id FROM trip_legs l JOIN trips t ON t.id = l.trip_id"
        " WHERE t.owner_tenant = %(t)s",
        args,
    ).fetchall():
        first = conn.execute(
            "INSERT INTO leg_stops (leg_id, place) VALUES (%s, 'a') RETURNING id", (leg_id,)
        ).fetchone()
        assert first is not None
        conn.execute(
            "INSERT INTO leg_stops (leg_id, after_id, place) VALUES (%s, %s, 'b')",
            (leg_id, first[0]),
        )
    conn.execute(
        "INSERT INTO trip_leg_counts (owner_tenant, trip_id, legs)"
        " SELECT owner_tenant, id, 3 FROM trips WHERE owner_tenant = %(t)s",
        args,
    )
    return {
        "trips": trips,
        "trip_legs": 3 * trips,
        "leg_stops": 6 * trips,
        "trip_leg_counts": trips,
    }


def added_rows(conn: psycopg.Connection[Any], tenant: str) -> dict[str, list[Any]]:
    return {
        table: sorted(conn.execute(query, {"t": tenant}).fetchall(), key=repr)
        for table, query in ADDED.items()
    }


def data_step(response: pb.DeprovisionResponse) -> pb.StepResult:
    (found,) = [s for s in response.steps if s.step == pb.STEP_TENANT_DATA]
    return found


def test_tables_are_attributed_by_foreign_keys_and_ordered_children_first(
    discovery_sql: psycopg.Connection[Any],
) -> None:
    tables = {
        row[0]: row[1:]
        for row in discovery_sql.execute(
            "SELECT table_name, delete_order, self_referencing, derived, tenant_path, refusal"
            " FROM deprovision_tables()"
        ).fetchall()
    }
    assert tables["trips"][3] == "trips.owner_tenant"
    assert tables["trip_legs"][3] == "trip_legs(trip_id) -> trips(id); trips.owner_tenant"
    assert tables["leg_stops"][3].startswith("leg_stops(leg_id) -> trip_legs(id); ")
    assert tables["leg_stops"][1] is True
    assert {name for name, row in tables.items() if row[2]} == DERIVED_TABLES | {"trip_leg_counts"}
    assert all(row[4] is None for row in tables.values())
    order = {name: row[0] for name, row in tables.items()}
    assert order["leg_stops"] < order["trip_legs"] < order["trips"]
    assert order["trip_leg_counts"] < order["trips"]
    assert not {"tenants", "deprovision_jobs", "deprovision_requests", "pipeline_stages"} & set(
        tables
    )


def test_the_write_guard_covers_a_tenant_column_of_another_name(
    discovery_sql: psycopg.Connection[Any],
) -> None:
    """trips.owner_tenant goes through the guard's dynamic query: once the
    tenant is marked, inserting or updating its trips fails; deleting works."""
    tenant = unique_tenant("guarded")
    seed_trips(discovery_sql, tenant, trips=1)
    discovery_sql.execute("UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (tenant,))
    for statement in (
        "INSERT INTO trips (owner_tenant, title) VALUES (%s, 'late')",
        "UPDATE trips SET title = 'renamed' WHERE owner_tenant = %s",
    ):
        with pytest.raises(psycopg.Error) as refused:
            discovery_sql.execute(statement, (tenant,))
        assert refused.value.sqlstate == "CRM01"
        assert tenant in str(refused.value)


async def test_dry_run_counts_and_a_run_deletes_rows_found_through_foreign_keys(
    discovery_db: Database,
    discovery_sql: psycopg.Connection[Any],
    tokens: TokenRegistry,
    sendgrid: FakeSendGrid,
    tmp_path: Path,
) -> None:
    tenant, neighbour = unique_tenant("trips"), unique_tenant("trips")
    expected = seed_trips(discovery_sql, tenant, trips=4)
    seed_trips(discovery_sql, neighbour, trips=3)
    neighbour_before = added_rows(discovery_sql, neighbour)
    # Small batches: the grandchildren are deleted across several of them.
    async with provisioning_server(
        discovery_db, tokens, sendgrid, tmp_path, max_batch_rows=5
    ) as provisioning:
        dry = await provisioning.deprovision(tenant, validate_only=True)
        dry_data = data_step(dry)
        assert {t: dry_data.rows[t] for t in ("trips", "trip_legs", "leg_stops")} == {
            t: expected[t] for t in ("trips", "trip_legs", "leg_stops")
        }
        assert dry_data.derived_rows["trip_leg_counts"] == expected["trip_leg_counts"]
        assert "trip_leg_counts" not in dry_data.rows
        assert dry_data.rows["clients"] == 2
        assert all(added_rows(discovery_sql, tenant).values())

        done = await provisioning.deprovision(tenant)

    assert done.state == pb.JOB_STATE_COMPLETED
    data = data_step(done)
    assert (dict(data.rows), dict(data.derived_rows)) == (
        dict(dry_data.rows),
        dict(dry_data.derived_rows),
    )
    assert added_rows(discovery_sql, tenant) == {table: [] for table in ADDED}
    assert tenant_status(discovery_sql, tenant) is None
    assert added_rows(discovery_sql, neighbour) == neighbour_before


UNATTRIBUTABLE = {
    # A tenant-like column that nothing ties to tenants.
    "loose_notes": "CREATE TABLE loose_notes (id int PRIMARY KEY, owner_tenant text)",
    # Two tenant columns: a row could belong to two tenants.
    "tenant_links": "CREATE TABLE tenant_links (tenant_id text REFERENCES tenants (id),"
    " partner_tenant text REFERENCES tenants (id))",
    # Two chains to a tenant: the trips of a swap may belong to different tenants.
    "trip_swaps": "CREATE TABLE trip_swaps (from_trip bigint REFERENCES trips (id),"
    " to_trip bigint REFERENCES trips (id))",
}


@pytest.mark.parametrize("table", sorted(UNATTRIBUTABLE))
async def test_a_table_that_cannot_be_attributed_refuses_dry_run_and_run(
    table: str,
    discovery_db: Database,
    discovery_sql: psycopg.Connection[Any],
    tokens: TokenRegistry,
    sendgrid: FakeSendGrid,
    tmp_path: Path,
) -> None:
    tenant = unique_tenant("refused")
    seed_trips(discovery_sql, tenant, trips=2)
    before = added_rows(discovery_sql, tenant)
    discovery_sql.execute(UNATTRIBUTABLE[table])
    try:
        async with provisioning_server(discovery_db, tokens, sendgrid, tmp_path) as provisioning:
            for validate_only in (True, False):
                error = await provisioning.failure(tenant, validate_only=validate_only)
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert error_info(error).reason == "TENANT_TABLE_UNATTRIBUTED"
                assert table in (error.details() or "")
    finally:
        discovery_sql.execute(f"DROP TABLE {table}")
    # Nothing was touched: not marked, no job, every row still there.
    assert tenant_status(discovery_sql, tenant) == "active"
    assert discovery_sql.execute(
        "SELECT count(*) FROM deprovision_jobs WHERE tenant_id = %s", (tenant,)
    ).fetchone() == (0,)
    assert added_rows(discovery_sql, tenant) == before
