"""Deprovision over a real grpc.aio server, real PostgreSQL, a real local
SendGrid stand-in and a real CLIENTS_DIR: the full run, idempotency, dry runs,
hostile ids, symlinks, concurrency and auth."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2

from provisioning_svc.servicer import ERROR_DOMAIN
from shared.errors import Unavailable
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc
from shared.proto_gen.provisioning.v1 import provisioning_pb2 as pb
from shared.rpc_clients import ProvisioningClient
from tests import polling
from tests.conftest import (
    LIMITED_TENANT,
    TOKEN_ADMIN,
    TOKEN_LIMITED,
    TOKEN_NO_SCOPE,
    TOKEN_READER,
)
from tests.factories import unique_tenant
from tests.provisioning_fixtures import (
    DERIVED_TABLES,
    SENDGRID_KEY,
    FakeReply,
    Provisioning,
    jobs_of,
    make_config_directory,
    partial_response,
    remaining_rows,
    reported_rows,
    seed_tenant,
    snapshot_except,
    split_rows,
    tenant_data,
    tenant_status,
    tree,
)
from tests.rpc import bearer, detail, error_info

STEPS = [
    pb.STEP_MARK_TENANT,
    pb.STEP_SENDGRID_SUBUSER,
    pb.STEP_TENANT_DATA,
    pb.STEP_CONFIG_DIRECTORY,
    pb.STEP_TENANT_RECORD,
]


def outcomes(response: pb.DeprovisionResponse) -> dict[int, int]:
    assert [s.step for s in response.steps] == STEPS
    return {s.step: s.outcome for s in response.steps}


def step(response: pb.DeprovisionResponse, which: int) -> pb.StepResult:
    (found,) = [s for s in response.steps if s.step == which]
    return found


def neighbours(sql: psycopg.Connection[Any], tenant_config_root: Path) -> list[str]:
    """Two other tenants with data and directories, to prove they are left alone."""
    others = [unique_tenant("other"), unique_tenant("other")]
    for other in others:
        seed_tenant(
            sql,
            other,
            clients=4,
            sendgrid_username=f"{other}-mail",
            tenant_config_root=tenant_config_root,
        )
    return others


async def test_full_deprovision_removes_everything_of_the_tenant_and_nothing_else(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant("full")
    others = neighbours(sql, provisioning.tenant_config_root)
    expected_rows = seed_tenant(
        sql,
        tenant,
        clients=5,
        sendgrid_username="full-mail.sub_user",
        tenant_config_root=provisioning.tenant_config_root,
    )
    provisioning.sendgrid.subusers.update({"full-mail.sub_user", *(f"{o}-mail" for o in others)})
    others_before = snapshot_except(sql, tenant)
    other_dirs_before = {o: tree(provisioning.tenant_config_root / o) for o in others}
    request_id = str(uuid.uuid4())

    reply = await provisioning.deprovision(tenant, request_id=request_id)

    assert reply.state == pb.JOB_STATE_COMPLETED
    assert not reply.validate_only
    assert reply.tenant_id == tenant
    assert uuid.UUID(reply.job_id)
    assert outcomes(reply) == {s: pb.STEP_OUTCOME_DONE for s in STEPS}
    assert reported_rows(step(reply, pb.STEP_TENANT_DATA)) == split_rows(expected_rows)
    assert dict(step(reply, pb.STEP_TENANT_RECORD).rows) == {"tenants": 1}
    assert reply.started_at.ToDatetime() <= reply.finished_at.ToDatetime()
    # The tenant: no row anywhere, directory gone, subuser deleted exactly once.
    assert remaining_rows(sql, tenant) == {}
    assert not (provisioning.tenant_config_root / tenant).exists()
    assert sorted(p.name for p in provisioning.tenant_config_root.iterdir()) == sorted(others)
    deletes = provisioning.sendgrid.deletes()
    assert [(r.path, r.authorization) for r in deletes] == [
        ("/v3/subusers/full-mail.sub_user", f"Bearer {SENDGRID_KEY}")
    ]
    assert provisioning.sendgrid.requests == deletes
    # Everyone else: every row of every table unchanged, directories intact.
    assert snapshot_except(sql, tenant) == others_before
    assert {o: tree(provisioning.tenant_config_root / o) for o in others} == other_dirs_before
    # The audit trail survives the tenant.
    ((job_id, state, actor, recorded_request, username),) = jobs_of(sql, tenant)
    assert (str(job_id), state, actor, str(recorded_request), username) == (
        reply.job_id,
        "COMPLETED",
        "admin",
        request_id,
        "full-mail.sub_user",
    )


async def test_crm_reads_fail_while_the_tenant_is_being_deprovisioned(
    provisioning: Provisioning, sql: psycopg.Connection[Any], crm_stub: crm_pb2_grpc.CrmServiceStub
) -> None:
    tenant = unique_tenant("crm")
    seed_tenant(sql, tenant, sendgrid_username="crm-mail")
    provisioning.sendgrid.script(FakeReply(503))
    error = await provisioning.failure(tenant)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert tenant_status(sql, tenant) == "deprovisioning"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await crm_stub.PipelineSummary(
            crm_pb2.PipelineSummaryRequest(tenant_id=tenant),
            metadata=bearer(TOKEN_READER),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_repeating_the_request_or_sending_a_new_one_returns_the_completed_result(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant("twice")
    seed_tenant(
        sql,
        tenant,
        sendgrid_username="twice-mail",
        tenant_config_root=provisioning.tenant_config_root,
    )
    provisioning.sendgrid.subusers.add("twice-mail")
    request_id = str(uuid.uuid4())
    first = await provisioning.deprovision(tenant, request_id=request_id)
    assert first.state == pb.JOB_STATE_COMPLETED
    everything = snapshot_except(sql, "no-tenant-excluded")

    again = await provisioning.deprovision(tenant, request_id=request_id)
    new_request = await provisioning.deprovision(tenant, request_id=str(uuid.uuid4()))
    no_request_id = await provisioning.deprovision(tenant)

    assert again == first
    assert new_request == first
    assert no_request_id == first
    # Nothing else happened: not a row changed anywhere (jobs included), one DELETE only.
    assert snapshot_except(sql, "no-tenant-excluded") == everything
    assert len(provisioning.sendgrid.deletes()) == 1
    assert len(jobs_of(sql, tenant)) == 1


async def test_dry_run_reports_what_would_go_and_changes_nothing(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant("dry")
    expected_rows = seed_tenant(
        sql,
        tenant,
        clients=7,
        sendgrid_username="dry-mail",
        tenant_config_root=provisioning.tenant_config_root,
    )
    everything = snapshot_except(sql, "no-tenant-excluded")
    directory = tree(provisioning.tenant_config_root)

    # The subuser need not exist in SendGrid for a dry run: it is not asked.
    reply = await provisioning.deprovision(tenant, request_id=str(uuid.uuid4()), validate_only=True)

    assert reply.state == pb.JOB_STATE_VALIDATED
    assert reply.validate_only
    assert reply.job_id == ""
    assert outcomes(reply) == {s: pb.STEP_OUTCOME_WOULD_DELETE for s in STEPS}
    assert reported_rows(step(reply, pb.STEP_TENANT_DATA)) == split_rows(expected_rows)
    assert dict(step(reply, pb.STEP_TENANT_RECORD).rows) == {"tenants": 1}
    assert "dry-mail" in step(reply, pb.STEP_SENDGRID_SUBUSER).detail
    assert snapshot_except(sql, "no-tenant-excluded") == everything
    assert tree(provisioning.tenant_config_root) == directory
    assert provisioning.sendgrid.requests == []
    assert tenant_status(sql, tenant) == "active"


async def test_dry_run_of_a_tenant_without_subuser_or_directory(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant("drybare")
    expected = seed_tenant(sql, tenant, clients=0)
    reply = await provisioning.deprovision(tenant, validate_only=True)
    assert outcomes(reply) == {
        pb.STEP_MARK_TENANT: pb.STEP_OUTCOME_WOULD_DELETE,
        pb.STEP_SENDGRID_SUBUSER: pb.STEP_OUTCOME_ALREADY_ABSENT,
        pb.STEP_TENANT_DATA: pb.STEP_OUTCOME_WOULD_DELETE,
        pb.STEP_CONFIG_DIRECTORY: pb.STEP_OUTCOME_ALREADY_ABSENT,
        pb.STEP_TENANT_RECORD: pb.STEP_OUTCOME_WOULD_DELETE,
    }
    assert reported_rows(step(reply, pb.STEP_TENANT_DATA)) == split_rows(expected)
    assert {table for table, rows in expected.items() if rows} == {"tenant_settings"}


async def test_unknown_tenant_is_not_found_unless_allow_missing(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    everything = snapshot_except(sql, "no-tenant-excluded")
    for validate_only in (False, True):
        error = await provisioning.failure("never-existed", validate_only=validate_only)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        info = error_info(error)
        assert (info.reason, info.domain) == ("TENANT_NOT_FOUND", ERROR_DOMAIN)
        reply = await provisioning.deprovision(
            "never-existed", allow_missing=True, validate_only=validate_only
        )
        assert reply.state == (pb.JOB_STATE_VALIDATED if validate_only else pb.JOB_STATE_COMPLETED)
        assert outcomes(reply) == {s: pb.STEP_OUTCOME_ALREADY_ABSENT for s in STEPS}
    assert snapshot_except(sql, "no-tenant-excluded") == everything


async def test_tenant_without_subuser_directory_or_rows(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant("bare")
    sql.execute("INSERT INTO tenants (id) VALUES (%s)", (tenant,))
    reply = await provisioning.deprovision(tenant)
    assert outcomes(reply) == {
        pb.STEP_MARK_TENANT: pb.STEP_OUTCOME_DONE,
        pb.STEP_SENDGRID_SUBUSER: pb.STEP_OUTCOME_ALREADY_ABSENT,
        pb.STEP_TENANT_DATA: pb.STEP_OUTCOME_DONE,
        pb.STEP_CONFIG_DIRECTORY: pb.STEP_OUTCOME_ALREADY_ABSENT,
        pb.STEP_TENANT_RECORD: pb.STEP_OUTCOME_DONE,
    }
    assert set(step(reply, pb.STEP_TENANT_DATA).rows.values()) == {0}
    assert dict(step(reply, pb.STEP_TENANT_DATA).derived_rows) == dict.fromkeys(DERIVED_TABLES, 0)
    assert remaining_rows(sql, tenant) == {}
    assert provisioning.sendgrid.requests == []


HOSTILE_TENANT_IDS = [
    "..",
    "../x",
    "a/b",
    "%2e%2e",
    "x\x00",
    "a" * 64,
    "b" * 1000,
    "café",
    "租户",
    "",
    ".",
    "/",
    "/etc",
    "..\\x",
    "x/..",
    "Acme",
    "-x",
    "acme\n",
]


async def test_hostile_tenant_ids_are_invalid_argument_and_touch_nothing(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    # Targets a traversal would reach: a sibling of CLIENTS_DIR and CLIENTS_DIR itself.
    (provisioning.outside_dir / "keep.txt").write_text("keep")
    victim = provisioning.tenant_config_root.parent / "x"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    make_config_directory(provisioning.tenant_config_root / "a")
    everything = snapshot_except(sql, "no-tenant-excluded")
    files = tree(provisioning.tenant_config_root.parent)

    for hostile in HOSTILE_TENANT_IDS:
        for validate_only in (False, True):
            error = await provisioning.failure(hostile, validate_only=validate_only)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(hostile)
            assert error_info(error).reason == "INVALID_TENANT_ID"
            violation = detail(error, error_details_pb2.BadRequest)
            assert isinstance(violation, error_details_pb2.BadRequest)
            assert violation.field_violations[0].field == "tenant_id"

    assert snapshot_except(sql, "no-tenant-excluded") == everything
    assert tree(provisioning.tenant_config_root.parent) == files
    assert provisioning.sendgrid.requests == []


@pytest.mark.parametrize("request_id", ["not-a-uuid", "123", "{" + str(uuid.UUID(int=1)) + "}"])
async def test_malformed_request_id_is_invalid_argument(
    provisioning: Provisioning, sql: psycopg.Connection[Any], request_id: str
) -> None:
    tenant = unique_tenant("rid")
    seed_tenant(sql, tenant)
    error = await provisioning.failure(tenant, request_id=request_id)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "INVALID_REQUEST_ID"
    assert tenant_status(sql, tenant) == "active"
    assert jobs_of(sql, tenant) == []


async def test_request_id_of_another_tenant_is_invalid_argument(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    first, second = unique_tenant("rid"), unique_tenant("rid")
    seed_tenant(sql, first)
    seed_tenant(sql, second)
    request_id = str(uuid.uuid4())
    await provisioning.deprovision(first, request_id=request_id)
    error = await provisioning.failure(second, request_id=request_id)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "REQUEST_ID_REUSED"
    assert tenant_status(sql, second) == "active"
    assert jobs_of(sql, second) == []


async def test_tenant_directory_that_is_a_symlink_is_refused_and_its_target_survives(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant("link")
    seed_tenant(sql, tenant, sendgrid_username="link-mail")
    provisioning.sendgrid.subusers.add("link-mail")
    target = provisioning.outside_dir / "precious"
    make_config_directory(target)
    (provisioning.tenant_config_root / tenant).symlink_to(target, target_is_directory=True)
    target_before = tree(target)
    data_before = tenant_data(sql, tenant)

    for validate_only in (True, False):
        error = await provisioning.failure(tenant, validate_only=validate_only)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(error).reason == "CONFIG_DIRECTORY_SYMLINK"

    assert tree(target) == target_before
    assert (provisioning.tenant_config_root / tenant).is_symlink()
    # Refused before anything was touched.
    assert tenant_data(sql, tenant) == data_before
    assert tenant_status(sql, tenant) == "active"
    assert provisioning.sendgrid.requests == []


async def test_symlinked_subdirectory_is_unlinked_not_followed(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant("sublink")
    seed_tenant(sql, tenant, tenant_config_root=provisioning.tenant_config_root)
    target = provisioning.outside_dir / "shared-assets"
    make_config_directory(target)
    (provisioning.tenant_config_root / tenant / "assets").symlink_to(
        target, target_is_directory=True
    )
    (provisioning.tenant_config_root / tenant / "templates" / "logo.png").symlink_to(
        target / "branding.toml"
    )
    target_before = tree(target)

    reply = await provisioning.deprovision(tenant)

    assert reply.state == pb.JOB_STATE_COMPLETED
    assert step(reply, pb.STEP_CONFIG_DIRECTORY).outcome == pb.STEP_OUTCOME_DONE
    assert not (provisioning.tenant_config_root / tenant).exists()
    assert list(provisioning.tenant_config_root.iterdir()) == []
    assert tree(target) == target_before


async def test_file_in_place_of_the_directory_is_refused(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant("file")
    seed_tenant(sql, tenant)
    (provisioning.tenant_config_root / tenant).write_text("not a directory")
    error = await provisioning.failure(tenant)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(error).reason == "CONFIG_DIRECTORY_NOT_A_DIRECTORY"
    assert (provisioning.tenant_config_root / tenant).read_text() == "not a directory"
    assert tenant_status(sql, tenant) == "active"


async def test_two_simultaneous_calls_one_proceeds_the_other_is_aborted(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant("race")
    seed_tenant(
        sql,
        tenant,
        sendgrid_username="race-mail",
        tenant_config_root=provisioning.tenant_config_root,
    )
    provisioning.sendgrid.subusers.add("race-mail")
    # A slow SendGrid keeps the first call busy while the second arrives.
    provisioning.sendgrid.script(FakeReply(204, delay_s=1.0))

    results = await asyncio.gather(
        provisioning.deprovision(tenant, request_id=str(uuid.uuid4())),
        provisioning.deprovision(tenant, request_id=str(uuid.uuid4())),
        return_exceptions=True,
    )

    replies = [r for r in results if isinstance(r, pb.DeprovisionResponse)]
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(replies) == 1 and len(errors) == 1, results
    assert replies[0].state == pb.JOB_STATE_COMPLETED
    assert errors[0].code() == grpc.StatusCode.ABORTED
    assert error_info(errors[0]).reason == "DEPROVISION_IN_PROGRESS"
    assert len(jobs_of(sql, tenant)) == 1
    (requests,) = sql.execute(
        "SELECT count(*) FROM deprovision_requests r JOIN deprovision_jobs j ON j.id = r.job_id"
        " WHERE j.tenant_id = %s",
        (tenant,),
    ).fetchone() or (None,)
    assert requests == 1
    assert len(provisioning.sendgrid.deletes()) == 1
    assert remaining_rows(sql, tenant) == {}


def lease_of(sql: psycopg.Connection[Any], tenant: str) -> tuple[Any, ...]:
    """The tenant's open job: (state, error, lease_owner, lease seconds left)."""
    row = sql.execute(
        "SELECT state, error, lease_owner,"
        " extract(epoch FROM lease_expires_at - clock_timestamp())::float8"
        " FROM deprovision_jobs WHERE tenant_id = %s AND state <> 'COMPLETED'",
        (tenant,),
    ).fetchone()
    assert row is not None, "no open job"
    return tuple(row)


async def test_a_cancelled_call_releases_its_lease_and_a_retry_proceeds(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant("cancel")
    seed_tenant(sql, tenant, sendgrid_username="cancel-mail")
    provisioning.sendgrid.subusers.add("cancel-mail")
    # SendGrid hangs, so the first call is inside its SENDGRID_SUBUSER step when cancelled.
    provisioning.sendgrid.script(FakeReply(204, delay_s=20.0))
    first = provisioning.stub.Deprovision(
        pb.DeprovisionRequest(tenant_id=tenant, request_id=str(uuid.uuid4())),
        metadata=bearer(TOKEN_ADMIN),
        timeout=30.0,
    )
    await polling.wait_until(
        lambda: provisioning.sendgrid.deletes(), "the first call reached SendGrid", 10.0
    )
    state, _, owner, lease_left_s = lease_of(sql, tenant)
    assert state == "RUNNING" and owner is not None and lease_left_s > 20.0

    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await polling.wait_until(
        lambda: lease_of(sql, tenant)[2] is None, "the cancelled call's lease released", 3.0
    )
    assert lease_of(sql, tenant)[:2] == ("FAILED", "CANCELLED")

    retry = await provisioning.deprovision(tenant, request_id=str(uuid.uuid4()))
    assert retry.state == pb.JOB_STATE_COMPLETED
    assert retry.job_id == str(jobs_of(sql, tenant)[0][0])  # the same job, resumed
    assert remaining_rows(sql, tenant) == {}


@pytest.mark.parametrize(
    ("token", "code", "reason"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED, "MISSING_CREDENTIALS"),
        ("not-a-known-token", grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS"),
        (TOKEN_NO_SCOPE, grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE"),
        # The CRM reader's token lacks provisioning.tenants.delete.
        (TOKEN_READER, grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE"),
        (TOKEN_LIMITED, grpc.StatusCode.PERMISSION_DENIED, "TENANT_NOT_ALLOWED"),
    ],
)
async def test_callers_without_the_right_are_refused_and_nothing_changes(
    provisioning: Provisioning,
    sql: psycopg.Connection[Any],
    token: str | None,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    tenant = unique_tenant("auth")
    seed_tenant(
        sql,
        tenant,
        sendgrid_username="auth-mail",
        tenant_config_root=provisioning.tenant_config_root,
    )
    provisioning.sendgrid.subusers.add("auth-mail")
    everything = snapshot_except(sql, "no-tenant-excluded")
    files = tree(provisioning.tenant_config_root)

    for validate_only in (False, True):
        error = await provisioning.failure(tenant, token=token, validate_only=validate_only)
        assert error.code() == code
        assert error_info(error).reason == reason
        assert "not-a-known-token" not in (error.details() or "")

    assert snapshot_except(sql, "no-tenant-excluded") == everything
    assert tree(provisioning.tenant_config_root) == files
    assert provisioning.sendgrid.requests == []


async def test_limited_caller_deprovisions_its_own_tenant(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    sql.execute("DELETE FROM tenant_settings WHERE tenant_id = %s", (LIMITED_TENANT,))
    sql.execute("DELETE FROM tenants WHERE id = %s", (LIMITED_TENANT,))
    seed_tenant(sql, LIMITED_TENANT)
    reply = await provisioning.deprovision(LIMITED_TENANT, token=TOKEN_LIMITED)
    assert reply.state == pb.JOB_STATE_COMPLETED
    assert jobs_of(sql, LIMITED_TENANT)[-1][2] == "limited"


async def test_partial_response_detail_is_readable(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant("partial")
    seed_tenant(sql, tenant, sendgrid_username="partial-mail")
    provisioning.sendgrid.script(FakeReply(500))
    error = await provisioning.failure(tenant)
    partial = partial_response(error)
    assert partial.state == pb.JOB_STATE_FAILED
    info = error_info(error)
    assert info.metadata["job_id"] == partial.job_id
    assert info.metadata["step"] == "SENDGRID_SUBUSER"
    assert info.metadata["tenant_id"] == tenant


async def test_the_python_client_gets_the_partial_response_as_a_typed_error(
    provisioning: Provisioning, sql: psycopg.Connection[Any]
) -> None:
    tenant = unique_tenant("client")
    seed_tenant(sql, tenant, sendgrid_username="client-mail")
    provisioning.sendgrid.script(FakeReply(503))
    request_id = str(uuid.uuid4())
    async with ProvisioningClient.connect(provisioning.address, TOKEN_ADMIN) as client:
        with pytest.raises(Unavailable) as caught:
            await client.deprovision(tenant, request_id)
        (partial,) = [d for d in caught.value.details if isinstance(d, pb.DeprovisionResponse)]
        assert partial.state == pb.JOB_STATE_FAILED
        assert caught.value.reason == "SENDGRID_UNAVAILABLE"
        done = await client.deprovision(tenant, request_id)
    assert done.state == pb.JOB_STATE_COMPLETED
    assert done.job_id == partial.job_id
