"""The write guard's flag (database/migrations/0006_tenant_write_guard.sql).

It is up exactly while some tenant is marked 'deprovisioning' (then writes
take the full check), down otherwise (writes pay one read of it), and a
lowering never loses a marking in flight. A throwaway database of its own, so
that no other test's tenants are left deprovisioning while these look.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from devkit.databases import throwaway_database
from shared.auth import TokenRegistry
from shared.database import Database
from shared.proto_gen.provisioning.v1 import provisioning_pb2 as pb
from tests.factories import unique_tenant
from tests.polling import wait_until
from tests.provisioning_fixtures import (
    FakeSendGrid,
    RacingWriter,
    adapter_on,
    provisioning_server,
    remaining_rows,
    seed_tenant,
)

LOWER = "SELECT tenant_write_guard_lower()"


@pytest.fixture(scope="module")
def guard_name() -> str:
    return f"crm_write_guard_{os.getpid()}"


@pytest.fixture(scope="module")
def guard_url(pg_server_url: str, guard_name: str) -> Iterator[str]:
    with throwaway_database(pg_server_url, guard_name) as url:
        yield url


@pytest.fixture
def guard_sql(guard_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(guard_url, autocommit=True, application_name="tests") as conn:
        yield conn
        # Each test leaves no tenant marked, so the next starts with the flag down.
        conn.execute("UPDATE tenants SET status = 'active' WHERE status = 'deprovisioning'")
        conn.execute(LOWER)


@pytest_asyncio.fixture
async def guard_db(
    transport: str, guard_url: str, guard_name: str, request: pytest.FixtureRequest
) -> AsyncIterator[Database]:
    async with adapter_on(transport, guard_url, guard_name, request) as db:
        yield db


def flag(conn: psycopg.Connection[Any]) -> int | None:
    row = conn.execute("SELECT pg_sequence_last_value('tenant_write_guard_flag')").fetchone()
    assert row is not None
    return row[0]


def lower(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(LOWER).fetchone()
    assert row is not None
    return bool(row[0])


def add_tenant(conn: psycopg.Connection[Any], prefix: str) -> str:
    tenant = unique_tenant(prefix)
    conn.execute("INSERT INTO tenants (id, name) VALUES (%s, 'guard test')", (tenant,))
    return tenant


def write_notification(conn: psycopg.Connection[Any], tenant: str) -> None:
    conn.execute("INSERT INTO notifications (tenant_id, message) VALUES (%s, 'hi')", (tenant,))


def test_the_flag_is_up_exactly_while_some_tenant_is_marked(
    guard_sql: psycopg.Connection[Any],
) -> None:
    assert flag(guard_sql) == 0
    first, second = add_tenant(guard_sql, "flag-a"), add_tenant(guard_sql, "flag-b")
    write_notification(guard_sql, first)
    assert flag(guard_sql) == 0

    guard_sql.execute(
        "UPDATE tenants SET status = 'deprovisioning' WHERE id IN (%s, %s)", (first, second)
    )
    assert flag(guard_sql) == 1
    with pytest.raises(psycopg.Error) as caught:
        write_notification(guard_sql, first)
    assert caught.value.sqlstate == "CRM01"
    assert not lower(guard_sql)  # both are marked

    guard_sql.execute("DELETE FROM notifications WHERE tenant_id = %s", (first,))
    guard_sql.execute("DELETE FROM tenants WHERE id = %s", (first,))
    assert not lower(guard_sql)  # the second still is
    assert flag(guard_sql) == 1

    guard_sql.execute("UPDATE tenants SET status = 'active' WHERE id = %s", (second,))
    assert lower(guard_sql)
    assert flag(guard_sql) == 0
    write_notification(guard_sql, second)


def test_a_marking_rolled_back_leaves_the_flag_up_until_the_next_lowering(
    guard_sql: psycopg.Connection[Any],
) -> None:
    tenant = add_tenant(guard_sql, "flag-rollback")
    with pytest.raises(RuntimeError), guard_sql.transaction():
        guard_sql.execute("UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (tenant,))
        raise RuntimeError("roll back")
    # Up for nothing costs speed, not safety: writes pass the full check.
    assert flag(guard_sql) == 1
    write_notification(guard_sql, tenant)
    assert lower(guard_sql)
    assert flag(guard_sql) == 0


async def test_a_lowering_waits_for_a_marking_in_flight_and_then_sees_it(
    guard_sql: psycopg.Connection[Any], guard_url: str
) -> None:
    tenant = add_tenant(guard_sql, "flag-race")
    lowered: list[bool] = []

    def lower_meanwhile() -> None:
        with psycopg.connect(guard_url, autocommit=True, application_name="lowering") as conn:
            lowered.append(lower(conn))

    with psycopg.connect(guard_url) as marking:
        marking.execute("UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (tenant,))
        lowering = threading.Thread(target=lower_meanwhile)
        lowering.start()
        # It waits on the marking's advisory lock, not before it.
        await wait_until(
            lambda: guard_sql.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'lowering'"
                " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
            ).fetchone(),
            "the lowering waits on the advisory lock",
            timeout_s=10,
        )
        assert lowered == []
        marking.commit()
    lowering.join(timeout=10)
    assert lowered == [False]
    assert flag(guard_sql) == 1


def test_a_lowering_outside_read_committed_is_refused(
    guard_sql: psycopg.Connection[Any],
) -> None:
    guard_sql.execute("SELECT setval('tenant_write_guard_flag', 1)")
    with pytest.raises(psycopg.errors.InvalidTransactionState), guard_sql.transaction():
        guard_sql.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        lower(guard_sql)
    assert flag(guard_sql) == 1
    assert lower(guard_sql)


def test_a_resumed_job_raises_a_flag_lost_meanwhile(guard_sql: psycopg.Connection[Any]) -> None:
    """As after restoring a dump taken while a lowering ran: the tenant is
    marked but the flag is down. The next claim of its job raises it."""
    tenant = add_tenant(guard_sql, "flag-resumed")

    def claim() -> None:
        guard_sql.execute(
            "SELECT deprovision_claim(%s, %s, 'guard-test', %s, 0.001)",
            (tenant, uuid.uuid4(), uuid.uuid4()),
        )

    claim()
    guard_sql.execute("SELECT setval('tenant_write_guard_flag', 0)")
    claim()  # the first lease (1 ms) has passed: this resumes the job
    assert flag(guard_sql) == 1
    with pytest.raises(psycopg.Error) as caught:
        write_notification(guard_sql, tenant)
    assert caught.value.sqlstate == "CRM01"


def test_a_marking_replayed_as_a_replica_raises_the_flag(
    guard_sql: psycopg.Connection[Any],
) -> None:
    tenant = add_tenant(guard_sql, "flag-replica")
    with guard_sql.transaction():
        guard_sql.execute("SET LOCAL session_replication_role = replica")
        guard_sql.execute("UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (tenant,))
    assert flag(guard_sql) == 1


def test_a_writers_search_path_cannot_stand_in_for_the_flag_or_the_tenants(
    guard_sql: psycopg.Connection[Any],
) -> None:
    """A writer whose search_path puts its own schema first, with a flag that
    reads 0 and an empty `tenants`, is refused all the same."""
    tenant = add_tenant(guard_sql, "flag-path")
    guard_sql.execute("UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (tenant,))
    guard_sql.execute("CREATE SCHEMA IF NOT EXISTS decoy")
    try:
        guard_sql.execute(
            "CREATE SEQUENCE decoy.tenant_write_guard_flag MINVALUE 0;"
            " SELECT setval('decoy.tenant_write_guard_flag', 0);"
            " CREATE TABLE decoy.tenants (id text, status text);"
            " SET search_path = decoy, public"
        )
        with pytest.raises(psycopg.Error) as caught:
            write_notification(guard_sql, tenant)
        assert caught.value.sqlstate == "CRM01"
    finally:
        guard_sql.execute("RESET search_path; DROP SCHEMA decoy CASCADE")


@pytest.mark.parametrize(
    "weakening",
    [
        "ALTER TABLE guard_weakened DISABLE TRIGGER tenant_write_guard_insert",
        "ALTER TABLE guard_weakened ALTER CONSTRAINT guard_weakened_tenant_id_fkey"
        " DEFERRABLE INITIALLY DEFERRED",
        "ALTER TABLE tenants ENABLE TRIGGER tenant_write_guard_raise",  # not ALWAYS
    ],
)
def test_deprovisioning_refuses_to_start_while_the_guard_is_weakened(
    guard_sql: psycopg.Connection[Any], weakening: str
) -> None:
    guard_sql.execute(
        "CREATE TABLE guard_weakened (tenant_id text NOT NULL REFERENCES tenants (id));"
        " SELECT tenant_write_guard_attach('guard_weakened', 'tenant_id')"
    )
    try:
        guard_sql.execute("SELECT tenant_write_guard_assert()")
        guard_sql.execute(weakening)
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as caught:
            guard_sql.execute("SELECT tenant_write_guard_assert()")
        assert caught.value.diag.message_hint == "TENANT_TABLE_UNGUARDED"
    finally:
        guard_sql.execute(
            "DROP TABLE guard_weakened; ALTER TABLE tenants ENABLE ALWAYS TRIGGER"
            " tenant_write_guard_raise"
        )


async def test_a_completed_deprovisioning_lowers_the_flag_once_no_tenant_is_left(
    guard_db: Database,
    guard_sql: psycopg.Connection[Any],
    tokens: TokenRegistry,
    sendgrid: FakeSendGrid,
    tmp_path: Path,
) -> None:
    first, second = unique_tenant("flag-done"), unique_tenant("flag-left")
    for tenant in (first, second):
        seed_tenant(guard_sql, tenant, clients=5)
    guard_sql.execute("UPDATE tenants SET status = 'deprovisioning' WHERE id = %s", (second,))
    async with provisioning_server(guard_db, tokens, sendgrid, tmp_path) as provisioning:
        reply = await provisioning.deprovision(first)
        assert reply.state == pb.JOB_STATE_COMPLETED
        assert flag(guard_sql) == 1  # the second tenant is still marked
        reply = await provisioning.deprovision(second)
        assert reply.state == pb.JOB_STATE_COMPLETED
    assert flag(guard_sql) == 0
    assert remaining_rows(guard_sql, first) == remaining_rows(guard_sql, second) == {}


async def test_a_writer_racing_the_first_marking_sees_only_the_guard(
    guard_db: Database,
    guard_sql: psycopg.Connection[Any],
    guard_url: str,
    tokens: TokenRegistry,
    sendgrid: FakeSendGrid,
    tmp_path: Path,
) -> None:
    """The flag is down when the writer starts: the marking raises it while
    the writer is writing, and no row of the tenant survives."""
    tenant = unique_tenant("flag-racing")
    seed_tenant(guard_sql, tenant, clients=500)
    assert flag(guard_sql) == 0
    async with provisioning_server(guard_db, tokens, sendgrid, tmp_path) as provisioning:
        with RacingWriter(guard_url, tenant) as writer:
            await asyncio.sleep(0.3)
            reply = await provisioning.deprovision(tenant, deadline_s=30)
            await asyncio.sleep(0.3)
    assert reply.state == pb.JOB_STATE_COMPLETED
    writer.assert_saw_only_the_guard()
    assert remaining_rows(guard_sql, tenant) == {}
    assert flag(guard_sql) == 0
