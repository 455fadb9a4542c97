"""`python -m provisioning_svc` as a real process, configured from the
environment: a dry run and a real deprovision through it, a missing SendGrid
key outside dev mode, and a clean stop on SIGTERM with no secret logged."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from devkit.tokens import TokenCaller, write_tokens_file
from shared.auth import SCOPE_TENANTS_DELETE, token_sha256
from shared.proto_gen.provisioning.v1 import provisioning_pb2 as pb
from shared.proto_gen.provisioning.v1 import provisioning_pb2_grpc
from tests.factories import unique_tenant
from tests.provisioning_fixtures import remaining_rows, reported_rows, seed_tenant, split_rows
from tests.rpc import bearer, error_info
from tests.test_service_process import Service, kill_if_running, start_service_process

TOKEN = "process-provisioning-token-0123456789"


@asynccontextmanager
async def provisioning_process(env: dict[str, str], tmp_path: Path) -> AsyncIterator[Service]:
    """`python -m provisioning_svc` serving on a free port; killed if still running at the end."""
    tokens_file = write_tokens_file(
        tmp_path / "tokens.toml", [TokenCaller("ops-console", TOKEN, [SCOPE_TENANTS_DELETE])]
    )
    service = await start_service_process(
        "provisioning_svc",
        {
            **{k: v for k, v in os.environ.items() if k != "SENDGRID_API_KEY"},
            "AUTH_TOKENS_FILE": str(tokens_file),
            "PROVISIONING_LISTEN": "127.0.0.1:0",
            **env,
        },
        tokens_file,
    )
    try:
        yield service
    finally:
        await kill_if_running(service)


async def test_the_service_process_deprovisions_in_dev_mode(
    direct_url: str, sql: psycopg.Connection[Any], tmp_path: Path
) -> None:
    tenant_config_root = tmp_path / "clients"
    tenant_config_root.mkdir()
    tenant = unique_tenant("proc")
    rows = seed_tenant(
        sql, tenant, sendgrid_username="proc-mail", tenant_config_root=tenant_config_root
    )
    env = {"DATABASE_URL": direct_url, "CLIENTS_DIR": str(tenant_config_root), "DEV_MODE": "1"}
    async with provisioning_process(env, tmp_path) as service:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = provisioning_pb2_grpc.ProvisioningServiceStub(channel)
            dry = await stub.Deprovision(
                pb.DeprovisionRequest(tenant_id=tenant, validate_only=True),
                metadata=bearer(TOKEN),
                timeout=10,
            )
            done = await stub.Deprovision(
                pb.DeprovisionRequest(tenant_id=tenant), metadata=bearer(TOKEN), timeout=10
            )
        await service.stop()
    log = "".join(service.log)
    assert dry.state == pb.JOB_STATE_VALIDATED
    assert reported_rows(dry.steps[2]) == split_rows(rows)
    assert done.state == pb.JOB_STATE_COMPLETED
    assert done.steps[1].outcome == pb.STEP_OUTCOME_SKIPPED
    assert remaining_rows(sql, tenant) == {}
    assert not (tenant_config_root / tenant).exists()
    assert "caller=ops-console" in log
    assert "sendgrid_key_missing" in log
    assert TOKEN not in log and token_sha256(TOKEN) not in log


async def test_without_a_key_outside_dev_mode_the_process_refuses_to_start_deprovisioning(
    direct_url: str, sql: psycopg.Connection[Any], tmp_path: Path
) -> None:
    tenant = unique_tenant("proc")
    seed_tenant(sql, tenant)
    env = {"DATABASE_URL": direct_url, "CLIENTS_DIR": str(tmp_path), "DEV_MODE": ""}
    async with provisioning_process(env, tmp_path) as service:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
            stub = provisioning_pb2_grpc.ProvisioningServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Deprovision(
                    pb.DeprovisionRequest(tenant_id=tenant), metadata=bearer(TOKEN), timeout=10
                )
        await service.stop()
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "SENDGRID_NOT_CONFIGURED"
    assert remaining_rows(sql, tenant)["tenants"] == 1
