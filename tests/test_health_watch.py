"""The health watcher of a real server survives any exception: a probe that
fails in a way nobody expected turns health NOT_SERVING and is logged, and the
watcher goes on, so health follows the database again once probes work. A
blocked event loop turns health NOT_SERVING for a round."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.auth import TokenRegistry
from shared.database import Database
from shared.deadline import Deadline
from shared.server import LOOP_BLOCKED_S, create_server

PROBE_INTERVAL_S = 0.05
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class InjectingDatabase:
    """The test database, with a ping that raises `failure` while it is set."""

    real: Database
    failure: BaseException | None = None
    pings: list[bool] = field(default_factory=list)  # whether each ping failed

    @property
    def name(self) -> str:
        return self.real.name

    async def ping(self, deadline: Deadline) -> None:
        self.pings.append(self.failure is not None)
        if self.failure is not None:
            raise self.failure
        await self.real.ping(deadline)


@dataclass
class Watched:
    database: InjectingDatabase
    health: health_pb2_grpc.HealthStub

    async def status(self) -> int:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
        return int(reply.status)


@pytest_asyncio.fixture
async def watched(database: Database, tokens: TokenRegistry) -> AsyncIterator[Watched]:
    injecting = InjectingDatabase(database)
    handle = create_server(
        "127.0.0.1:0",
        [],
        tokens=lambda: tokens,
        error_domain="health.test",
        database=injecting,  # type: ignore[arg-type]
        health_probe_interval_s=PROBE_INTERVAL_S,
    )
    await handle.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
        yield Watched(injecting, health_pb2_grpc.HealthStub(channel))
    await handle.stop(0)


async def wait_for_status(watched: Watched, status: int, what: str, within_s: float = 5.0) -> None:
    seen = None
    try:
        async with asyncio.timeout(within_s):
            while True:
                seen = await watched.status()
                if seen == status:
                    return
                await asyncio.sleep(PROBE_INTERVAL_S)
    except TimeoutError:
        raise AssertionError(f"{what}: health stayed {seen}") from None


async def test_an_unexpected_exception_in_a_probe_does_not_end_the_watch(
    watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    await wait_for_status(watched, SERVING, "a healthy database")
    watched.database.failure = RuntimeError("a probe bug nobody planned for")
    await wait_for_status(watched, NOT_SERVING, "an unexpected probe failure")
    failed = [r for r in caplog.records if "health_probe_failed" in r.getMessage()]
    assert failed and failed[0].levelno == logging.ERROR
    assert failed[0].exc_info is not None and "a probe bug" in str(failed[0].exc_info[1])

    # Only a watcher still running can bring health back.
    watched.database.failure = None
    await wait_for_status(watched, SERVING, "probes that work again")
    assert watched.database.pings[-1] is False


async def test_a_blocked_event_loop_turns_health_not_serving_for_a_round(
    watched: Watched,
) -> None:
    """Nothing is served while the loop is blocked; health says so once it runs
    again, then follows the database as before."""
    await wait_for_status(watched, SERVING, "a healthy database")
    statuses: list[int] = []
    async with asyncio.timeout(10):
        updates = watched.health.Watch(health_pb2.HealthCheckRequest())
        async for update in updates:
            statuses.append(int(update.status))
            if statuses == [SERVING]:
                # On purpose: blocks the server's loop (and ours).
                time.sleep(LOOP_BLOCKED_S + 0.2)  # noqa: ASYNC251
            elif NOT_SERVING in statuses and statuses[-1] == SERVING:
                break
        updates.cancel()
    assert statuses[0] == SERVING and NOT_SERVING in statuses and statuses[-1] == SERVING
