"""Service processes: `python -m crm_svc` or `provisioning_svc` started on a
free loopback port, waited for until gRPC health says SERVING, and stopped
with SIGTERM (the graceful drain) on the way out."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
# The dev stack's fixed ports (`make run`): nothing else may take them.
DEV_STACK_PORTS = frozenset({50051, 50052})
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    """A free ephemeral port on loopback (the dev stack's ports excluded)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port: int = probe.getsockname()[1]
        if port not in DEV_STACK_PORTS:
            return port


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None:
        return "(output not captured)"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def wait_serving(
    address: str,
    *,
    timeout_s: float,
    process: asyncio.subprocess.Process | None = None,
    log_path: Path | None = None,
) -> None:
    """Return once gRPC health at `address` says SERVING.

    Raises RuntimeError after `timeout_s`, or as soon as `process` (the
    service, when we started it) exits, with the tail of its log.
    """
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        give_up = time.monotonic() + timeout_s
        while True:
            if process is not None and process.returncode is not None:
                raise RuntimeError(
                    f"service exited with {process.returncode} before serving; "
                    f"log {log_path}:\n{_tail(log_path)}"
                )
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass  # not listening yet
            if time.monotonic() > give_up:
                raise RuntimeError(
                    f"service at {address} not SERVING after {timeout_s:.0f}s; "
                    f"log {log_path}:\n{_tail(log_path)}"
                )
            await asyncio.sleep(0.1)


async def stop_gracefully(process: asyncio.subprocess.Process) -> None:
    """SIGTERM and wait for the drain; SIGKILL if it takes too long."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_TIMEOUT_S):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()


@dataclass(frozen=True)
class RunningService:
    address: str  # host:port on loopback
    pid: int  # the service's own Python process (for RSS and the like)


@asynccontextmanager
async def running_service(
    module: str,
    *,
    listen_var: str,
    env: Mapping[str, str],
    log_path: Path,
    start_timeout_s: float = 60.0,
) -> AsyncIterator[RunningService]:
    """Run `python -m module` listening on a free loopback port; yield it once
    gRPC health says SERVING; SIGTERM it on the way out.

    Its output goes to `log_path`, so that access logs do not interleave with
    the caller's own lines. An empty value in `env` unsets that variable for
    the service (Settings reads "" as unset).
    """
    address = f"127.0.0.1:{free_port()}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            env={**os.environ, **env, listen_var: address},
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            await wait_serving(
                address, timeout_s=start_timeout_s, process=process, log_path=log_path
            )
            yield RunningService(address, process.pid)
        finally:
            await stop_gracefully(process)
