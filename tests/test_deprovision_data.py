"""Step 3, the tenant's rows: committed batches under a deadline, the lease,
and the catalog-driven table list (tables added later go too)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from shared.auth import TokenRegistry
from shared.errors import DeadlineExceeded
from shared.proto_gen.provisioning.v1 import provisioning_pb2 as pb
from tests.factories import unique_tenant
from tests.provisioning_fixtures import (
    FakeReply,
    FakeSendGrid,
    Provisioning,
    RacingWriter,
    jobs_of,
    partial_response,
    provisioning_server,
    remaining_rows,
    reported_rows,
    seed_tenant,
    snapshot_except,
    split_rows,
    tree,
)
from tests.rpc import error_info


def data_step(response: pb.DeprovisionResponse) -> pb.StepResult:
    (found,) = [s for s in response.steps if s.step == pb.STEP_TENANT_DATA]
    return found


def recorded_rows(sql: psycopg.Connection[Any], tenant: str) -> int:
    """Rows the tenant's job has recorded as deleted (its own data and our derived rows)."""
    row = sql.execute(
        "SELECT coalesce(sum(value::bigint), 0) FROM deprovision_jobs,"
        " unnest(ARRAY['rows', 'derived_rows']) AS counts(kind),"
        " jsonb_each_text(coalesce(steps -> 'TENANT_DATA' -> kind, '{}')) WHERE tenant_id = %s",
        (tenant,),
    ).fetchone()
    assert row is not None
    return int(row[0])


async def test_deadline_cuts_row_deletion_part_way_and_repeated_calls_finish(
    database: Any,
    tokens: TokenRegistry,
    sendgrid: FakeSendGrid,
    tmp_path: Path,
    sql: Any,
    transport: str,
) -> None:
    # Large enough that a 0.5 s call cannot finish it; each call over the REST
    # stand-in deletes far less (an HTTP round trip per batch), so it gets fewer.
    clients = 25_000 if transport in ("postgres", "pooled") else 12_000
    async with provisioning_server(
        database, tokens, sendgrid, tmp_path, max_batch_rows=2000
    ) as provisioning:
        tenant = unique_tenant("large")
        expected = seed_tenant(
            sql, tenant, clients=clients, tenant_config_root=provisioning.tenant_config_root
        )
        total = sum(expected.values())
        other = unique_tenant("other")
        seed_tenant(sql, other, clients=50, tenant_config_root=provisioning.tenant_config_root)
        others_before = snapshot_except(sql, tenant)
        other_dir = tree(provisioning.tenant_config_root / other)
        request_id = str(uuid.uuid4())

        left = total
        cut_part_way = 0
        # The same request again and again, each with a deadline far too short for the lot.
        for _ in range(100):
            try:
                reply = await provisioning.deprovision(
                    tenant, request_id=request_id, deadline_s=0.5
                )
                break
            except grpc.aio.AioRpcError as cut:
                # A loaded machine may let the caller's deadline pass before the answer
                # (then grpc reports it without our details), or a retry may come while
                # the cut call still holds the lease.
                assert cut.code() in {
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.ABORTED,
                }, cut
                if cut.code() == grpc.StatusCode.DEADLINE_EXCEEDED and cut.trailing_metadata():
                    partial = partial_response(cut)
                    assert partial.state == pb.JOB_STATE_FAILED
                    # DONE when the last batch made it and a later step did not.
                    assert data_step(partial).outcome in {
                        pb.STEP_OUTCOME_FAILED,
                        pb.STEP_OUTCOME_PENDING,
                        pb.STEP_OUTCOME_DONE,
                    }
                now_left = sum(remaining_rows(sql, tenant).values()) - 1  # the tenants row
                # Committed batches: every deleted row is counted in the job, none is lost.
                assert recorded_rows(sql, tenant) + now_left == total
                assert now_left <= left
                cut_part_way += 0 < now_left < total
                left = now_left
        else:
            pytest.fail("deprovisioning did not finish in 100 calls")

        assert cut_part_way >= 1
        assert reply.state == pb.JOB_STATE_COMPLETED
        assert reported_rows(data_step(reply)) == split_rows(expected)
        assert remaining_rows(sql, tenant) == {}
        assert not (provisioning.tenant_config_root / tenant).exists()
        assert snapshot_except(sql, tenant) == others_before
        assert tree(provisioning.tenant_config_root / other) == other_dir
        assert len(jobs_of(sql, tenant)) == 1


async def test_a_crashed_callers_lease_expires_and_the_job_resumes(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant("crash")
    seed_tenant(sql, tenant, sendgrid_username="crash-mail")
    provisioning.sendgrid.script(FakeReply(500))
    error = await provisioning.failure(tenant)
    job_id = partial_response(error).job_id
    # A call that died holding the lease: another owner, expiring shortly.
    sql.execute(
        "UPDATE deprovision_jobs SET state = 'RUNNING', lease_owner = gen_random_uuid(),"
        " lease_expires_at = clock_timestamp() + interval '0.6 seconds' WHERE id = %s",
        (job_id,),
    )

    blocked = await provisioning.failure(tenant)
    assert blocked.code() == grpc.StatusCode.ABORTED
    assert error_info(blocked).reason == "DEPROVISION_IN_PROGRESS"

    await asyncio.sleep(0.7)
    reply = await provisioning.deprovision(tenant)
    assert reply.state == pb.JOB_STATE_COMPLETED
    assert reply.job_id == job_id


async def test_tables_added_later_are_deprovisioned_children_first(
    provisioning: Provisioning, sql: psycopg.Connection[Any], later_tables: None
) -> None:
    tenant, other = unique_tenant("later"), unique_tenant("later")
    for t in (tenant, other):
        seed_tenant(sql, t, clients=3)
        sql.execute(
            "INSERT INTO later_bookings (tenant_id, client_id)"
            " SELECT tenant_id, id FROM clients WHERE tenant_id = %s",
            (t,),
        )
        sql.execute(
            "INSERT INTO later_booking_notes (tenant_id, booking_id, note)"
            " SELECT tenant_id, id, 'n' FROM later_bookings WHERE tenant_id = %s",
            (t,),
        )
        # A chain of referrals inside one table.
        sql.execute(
            "INSERT INTO later_referrals (tenant_id, id, referred_by) VALUES"
            " (%(t)s, 1, NULL), (%(t)s, 2, 1), (%(t)s, 3, 2)",
            {"t": t},
        )
    others_before = snapshot_except(sql, tenant)
    dry = await provisioning.deprovision(tenant, validate_only=True)
    assert {k: v for k, v in data_step(dry).rows.items() if k.startswith("later_")} == {
        "later_bookings": 3,
        "later_booking_notes": 3,
        "later_referrals": 3,
    }

    reply = await provisioning.deprovision(tenant)

    assert reply.state == pb.JOB_STATE_COMPLETED
    rows = data_step(reply).rows
    assert (rows["later_bookings"], rows["later_booking_notes"], rows["later_referrals"]) == (
        3,
        3,
        3,
    )
    assert remaining_rows(sql, tenant) == {}
    assert snapshot_except(sql, tenant) == others_before


@pytest.fixture
def later_tables(database_url: str) -> Iterator[None]:
    """Tenant tables another engineer might add after this code was written."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            """
            CREATE TABLE later_bookings (
                tenant_id text NOT NULL REFERENCES tenants (id),
                id bigint GENERATED BY DEFAULT AS IDENTITY,
                client_id bigint NOT NULL,
                PRIMARY KEY (tenant_id, id),
                FOREIGN KEY (tenant_id, client_id) REFERENCES clients (tenant_id, id));
            CREATE TABLE later_booking_notes (
                tenant_id text NOT NULL REFERENCES tenants (id),
                id bigint GENERATED BY DEFAULT AS IDENTITY,
                booking_id bigint NOT NULL,
                note text,
                PRIMARY KEY (tenant_id, id),
                FOREIGN KEY (tenant_id, booking_id) REFERENCES later_bookings (tenant_id, id));
            CREATE TABLE later_referrals (
                tenant_id text NOT NULL REFERENCES tenants (id),
                id bigint,
                referred_by bigint,
                PRIMARY KEY (tenant_id, id),
                FOREIGN KEY (tenant_id, referred_by) REFERENCES later_referrals (tenant_id, id));
            """
        )
        for table in ("later_bookings", "later_booking_notes", "later_referrals"):
            conn.execute("SELECT tenant_write_guard_attach(%s, 'tenant_id')", (table,))
        try:
            yield
        finally:
            conn.execute("DROP TABLE later_booking_notes, later_bookings, later_referrals")


async def test_a_tenant_table_without_the_write_guard_is_refused_before_anything_is_touched(
    provisioning: Provisioning, sql: psycopg.Connection[Any], database_url: str
) -> None:
    tenant = unique_tenant("unguarded")
    seed_tenant(sql, tenant, clients=1)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE later_unguarded (tenant_id text NOT NULL REFERENCES tenants (id),"
            " id bigint, PRIMARY KEY (tenant_id, id))"
        )
        try:
            for validate_only in (True, False):
                failure = await provisioning.failure(tenant, validate_only=validate_only)
                assert failure.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert error_info(failure).reason == "TENANT_TABLE_UNGUARDED"
                assert "later_unguarded" in (failure.details() or "")
            assert remaining_rows(sql, tenant)["clients"] == 1
            status = sql.execute("SELECT status FROM tenants WHERE id = %s", (tenant,)).fetchone()
            assert status == ("active",)
        finally:
            conn.execute("DROP TABLE later_unguarded")


def test_every_table_that_references_tenants_has_the_write_guard(
    sql: psycopg.Connection[Any],
) -> None:
    rows = sql.execute("SELECT rel::text, guarded FROM tenant_write_guard_coverage()").fetchall()
    assert {"clients", "quotes", "invoices", "activities", "notifications"} <= {r[0] for r in rows}
    assert [r for r in rows if not r[1]] == []


def test_delete_order_puts_every_child_before_its_parent(
    sql: psycopg.Connection[Any], later_tables: None
) -> None:
    order = {
        name: position
        for name, position, in_cycle in sql.execute(
            "SELECT table_name, delete_order, in_cycle FROM deprovision_tables()"
        ).fetchall()
        if not in_cycle
    }
    assert {
        "clients",
        "quotes",
        "invoices",
        "activities",
        "notifications",
        "tenant_settings",
    } <= set(order)
    assert {"later_bookings", "later_booking_notes", "later_referrals"} <= set(order)
    assert not {"tenants", "deprovision_jobs", "deprovision_requests"} & set(order)
    edges = sql.execute(
        "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint"
        " WHERE contype = 'f' AND conrelid <> confrelid"
    ).fetchall()
    checked = [(child, parent) for child, parent in edges if child in order and parent in order]
    assert ("invoices", "quotes") in checked
    assert ("later_booking_notes", "later_bookings") in checked
    for child, parent in checked:
        assert order[child] < order[parent], (child, parent)


def test_our_foreign_keys_between_tenant_tables_are_on_delete_restrict(
    sql: psycopg.Connection[Any],
) -> None:
    """NO ACTION would double the cost of the check deprovisioning pays for
    every deleted row that others reference (docs/design.md, "Deprovisioning")."""
    actions = dict(
        sql.execute(
            "SELECT format('%s -> %s', conrelid::regclass, confrelid::regclass), confdeltype"
            " FROM pg_constraint"
            " WHERE contype = 'f' AND confrelid IN ('clients'::regclass, 'quotes'::regclass)"
        ).fetchall()
    )
    assert actions == {
        "quotes -> clients": "r",
        "invoices -> clients": "r",
        "invoices -> quotes": "r",
        "activities -> clients": "r",
    }


def test_a_foreign_key_cycle_between_tenant_tables_is_refused(
    sql: psycopg.Connection[Any],
) -> None:
    sql.execute(
        """
        CREATE TABLE cycle_a (tenant_id text REFERENCES tenants (id), id int, b_id int,
            PRIMARY KEY (tenant_id, id));
        CREATE TABLE cycle_b (tenant_id text, id int, a_id int, PRIMARY KEY (tenant_id, id),
            FOREIGN KEY (tenant_id, a_id) REFERENCES cycle_a (tenant_id, id));
        ALTER TABLE cycle_a ADD FOREIGN KEY (tenant_id, b_id) REFERENCES cycle_b (tenant_id, id);
        """
    )
    try:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as caught:
            sql.execute("SELECT deprovision_assert_tables()")
        assert caught.value.diag.message_hint == "TENANT_TABLES_CYCLE"
    finally:
        sql.execute("DROP TABLE cycle_a, cycle_b CASCADE")
    sql.execute("SELECT deprovision_assert_tables()")


# -- the SQL functions on their own ------------------------------------------


def claim(sql: psycopg.Connection[Any], tenant: str, owner: uuid.UUID, lease_s: float) -> Any:
    row = sql.execute(
        "SELECT deprovision_claim(%s, %s, 'sql-test', %s, %s)",
        (tenant, uuid.uuid4(), owner, lease_s),
    ).fetchone()
    assert row is not None
    return row[0]


def test_a_writer_that_ignores_the_mark_is_refused(sql: psycopg.Connection[Any]) -> None:
    """Once the tenant is marked, no row of it can be written (the write
    guard); deleting stays allowed, and the job finishes with what it found."""
    tenant = unique_tenant("late")
    seed_tenant(sql, tenant, clients=2)
    owner = uuid.uuid4()
    job = claim(sql, tenant, owner, 30)["job"]["id"]
    for statement in (
        "INSERT INTO clients (tenant_id, email) VALUES (%s, 'late@x.io')",
        "UPDATE clients SET name = 'renamed' WHERE tenant_id = %s",
        "INSERT INTO notifications (tenant_id, message) VALUES (%s, 'late')",
    ):
        with pytest.raises(psycopg.Error) as refused:
            sql.execute(statement, (tenant,))
        assert refused.value.sqlstate == "CRM01"
        assert tenant in str(refused.value)
        assert refused.value.diag.message_hint == "TENANT_DEPROVISIONING"
    while True:
        (batch,) = sql.execute(
            "SELECT deprovision_delete_batch(%s, %s, 3)", (job, owner)
        ).fetchone() or (None,)
        if batch["done"]:
            break
    for step in ("SENDGRID_SUBUSER", "CONFIG_DIRECTORY"):
        sql.execute(
            "SELECT deprovision_record_step(%s, %s, %s, 'ALREADY_ABSENT', 'none')",
            (job, owner, step),
        )
    (document,) = sql.execute("SELECT deprovision_finish(%s, %s)", (job, owner)).fetchone() or (
        None,
    )
    assert document["state"] == "COMPLETED"
    assert document["steps"]["TENANT_DATA"]["rows"]["clients"] == 2
    assert remaining_rows(sql, tenant) == {}


async def test_a_writer_during_a_real_deprovisioning_sees_only_the_guard(
    provisioning: Provisioning, sql: psycopg.Connection[Any], database_url: str
) -> None:
    """A writer keeps inserting clients and quotes (one per transaction, and
    several per transaction) while the tenant is deprovisioned: after COMPLETED
    no row of the tenant exists anywhere, and the only error it saw until the
    tenant was gone is the guard's."""
    tenant = unique_tenant("racing")
    seed_tenant(sql, tenant, clients=2000)
    with RacingWriter(database_url, tenant) as writer:
        await asyncio.sleep(0.3)  # the writer is writing before the mark
        reply = await provisioning.deprovision(tenant, deadline_s=30)
        await asyncio.sleep(0.3)  # and keeps trying after COMPLETED
    assert reply.state == pb.JOB_STATE_COMPLETED
    writer.assert_saw_only_the_guard()
    assert remaining_rows(sql, tenant) == {}


def test_a_call_whose_lease_passed_can_no_longer_write(sql: psycopg.Connection[Any]) -> None:
    tenant = unique_tenant("lease")
    seed_tenant(sql, tenant, clients=2)
    owner = uuid.uuid4()
    job = claim(sql, tenant, owner, 0.2)["job"]["id"]
    time.sleep(0.3)
    # Someone else resumes the job...
    other = uuid.uuid4()
    assert claim(sql, tenant, other, 30)["job"]["id"] == job
    # ...and the first call's writes are refused.
    for statement in (
        "SELECT deprovision_delete_batch(%s, %s, 10)",
        "SELECT deprovision_finish(%s, %s)",
    ):
        with pytest.raises(psycopg.errors.ObjectInUse) as caught:
            sql.execute(statement, (job, owner))
        assert caught.value.diag.message_hint == "LEASE_LOST"
    assert remaining_rows(sql, tenant)["clients"] == 2
    # Its failure report changes nothing either.
    (document,) = sql.execute(
        "SELECT deprovision_fail(%s, %s, 'TENANT_DATA', 'X', 'x')", (job, owner)
    ).fetchone() or (None,)
    assert document["state"] == "RUNNING"


def test_finish_refuses_unfinished_steps(sql: psycopg.Connection[Any]) -> None:
    tenant = unique_tenant("order")
    seed_tenant(sql, tenant, clients=1)
    owner = uuid.uuid4()
    job = claim(sql, tenant, owner, 30)["job"]["id"]
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as caught:
        sql.execute("SELECT deprovision_finish(%s, %s)", (job, owner))
    assert caught.value.diag.message_hint == "STEP_NOT_FINISHED"
    assert remaining_rows(sql, tenant)["tenants"] == 1


class CommitsThenTimesOut:
    """The real database, but one function's call times out on our side after it
    committed on the database's (PostgREST does not cancel abandoned queries)."""

    def __init__(self, real: Any, function: str) -> None:
        self.real = real
        self.name = real.name
        self.function = function

    async def call(self, function: str, args: Any, deadline: Any, **kwargs: Any) -> Any:
        result = await self.real.call(function, args, deadline, **kwargs)
        if function == self.function:
            raise DeadlineExceeded("database call timed out", reason="DB_TIMEOUT")
        return result

    async def ping(self, deadline: Any) -> None:
        await self.real.ping(deadline)

    async def close(self) -> None:
        pass


async def test_a_finish_that_committed_after_our_timeout_is_reported_completed(
    database: Any, tokens: TokenRegistry, sendgrid: FakeSendGrid, tmp_path: Path, sql: Any
) -> None:
    flaky = CommitsThenTimesOut(database, "deprovision_finish")
    async with provisioning_server(flaky, tokens, sendgrid, tmp_path) as provisioning:
        tenant = unique_tenant("latecommit")
        seed_tenant(sql, tenant, clients=2)
        reply = await provisioning.deprovision(tenant)
    assert reply.state == pb.JOB_STATE_COMPLETED
    assert remaining_rows(sql, tenant) == {}
    ((_, state, *_),) = jobs_of(sql, tenant)
    assert state == "COMPLETED"
