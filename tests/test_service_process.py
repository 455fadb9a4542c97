"""`python -m crm_svc` as a real process: tokens reloaded on SIGHUP without a
restart, the caller in its log lines, no bearer token in any of them, and a
clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest_asyncio

import devkit.tokens
from devkit.tokens import TokenCaller
from shared.auth import SCOPE_PIPELINE_READ, token_sha256
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc
from tests.factories import create_tenant, unique_tenant
from tests.rpc import bearer, error_info

TOKEN_A = "process-token-aaaaaaaaaaaaaaaa"
TOKEN_B = "process-token-bbbbbbbbbbbbbbbb"


def tokens_toml(name: str, token: str) -> str:
    return devkit.tokens.tokens_toml([TokenCaller(name, token, [SCOPE_PIPELINE_READ])])


@dataclass
class Service:
    process: asyncio.subprocess.Process
    port: int
    tokens_file: Path
    log: list[str] = field(default_factory=list)

    async def read_until(self, pattern: str, timeout_s: float = 10.0) -> re.Match[str]:
        assert self.process.stderr is not None
        async with asyncio.timeout(timeout_s):
            while True:
                for line in self.log:
                    if match := re.search(pattern, line):
                        return match
                raw = await self.process.stderr.readline()
                if not raw:
                    raise AssertionError(f"service exited before logging {pattern!r}: {self.log}")
                self.log.append(raw.decode())

    async def stop(self) -> None:
        """SIGTERM, then the rest of its log; it must exit cleanly."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.stderr is not None
        async with asyncio.timeout(15):
            rest = await self.process.stderr.read()
            assert await self.process.wait() == 0
        self.log += [line + "\n" for line in rest.decode().splitlines()]


async def start_service_process(module: str, env: dict[str, str], tokens_file: Path) -> Service:
    """`python -m module` with `env` (listening on port 0), once it serves on the
    port it logged."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, env=env, stderr=asyncio.subprocess.PIPE
    )
    service = Service(process, 0, tokens_file)
    match = await service.read_until(r"serving \S+ on port (\d+)", timeout_s=30.0)
    service.port = int(match.group(1))
    return service


async def start_crm_process(env: dict[str, str], tokens_file: Path) -> Service:
    return await start_service_process("crm_svc", env, tokens_file)


async def kill_if_running(service: Service) -> None:
    if service.process.returncode is None:
        service.process.kill()
        await service.process.wait()


@pytest_asyncio.fixture
async def service(direct_url: str, tmp_path: Path) -> AsyncIterator[Service]:
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(tokens_toml("caller-a", TOKEN_A))
    env = {
        **os.environ,
        "DATABASE_URL": direct_url,
        "AUTH_TOKENS_FILE": str(tokens_file),
        "CRM_LISTEN": "127.0.0.1:0",
    }
    service = await start_crm_process(env, tokens_file)
    yield service
    await kill_if_running(service)


async def summary(port: int, tenant: str, token: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            await crm_pb2_grpc.CrmServiceStub(channel).PipelineSummary(
                crm_pb2.PipelineSummaryRequest(tenant_id=tenant), metadata=bearer(token), timeout=5
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                assert error_info(error).reason == "INVALID_CREDENTIALS"
            return error.code()
    return grpc.StatusCode.OK


async def test_tokens_reload_on_sighup_and_logs_stay_clean(
    service: Service, sql: psycopg.Connection[object]
) -> None:
    tenant = unique_tenant()
    create_tenant(sql, tenant)
    assert await summary(service.port, tenant, TOKEN_A) == grpc.StatusCode.OK
    assert await summary(service.port, tenant, TOKEN_B) == grpc.StatusCode.UNAUTHENTICATED

    service.tokens_file.write_text(tokens_toml("caller-b", TOKEN_B))
    service.process.send_signal(signal.SIGHUP)
    await service.read_until(r"tokens file reloaded: 1 caller")
    assert await summary(service.port, tenant, TOKEN_A) == grpc.StatusCode.UNAUTHENTICATED
    assert await summary(service.port, tenant, TOKEN_B) == grpc.StatusCode.OK

    # A broken file keeps the callers that work.
    service.tokens_file.write_text("[[callers]\n")
    service.process.send_signal(signal.SIGHUP)
    await service.read_until(r"tokens file not reloaded")
    assert await summary(service.port, tenant, TOKEN_B) == grpc.StatusCode.OK

    await service.stop()

    rpc_lines = [line for line in service.log if " rpc method=" in line]
    assert any("caller=caller-a" in line and "code=OK" in line for line in rpc_lines)
    assert any("caller=caller-b" in line and "code=OK" in line for line in rpc_lines)
    assert any("caller=- " in line and "code=UNAUTHENTICATED" in line for line in rpc_lines)
    log_text = "".join(service.log)
    for secret in (TOKEN_A, TOKEN_B, token_sha256(TOKEN_A), token_sha256(TOKEN_B)):
        assert secret not in log_text
