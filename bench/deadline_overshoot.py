"""Deadline overshoot: how late a blocked PipelineSummary answers, per transport,
and whether any of its work is still running in the database afterwards.

Another connection holds `LOCK TABLE pipeline_stage_clients IN ACCESS EXCLUSIVE MODE`, so every
summary waits on the lock. For each transport (direct psycopg; Supabase REST
through the PostgREST stand-in) N calls go through a real `python -m crm_svc`
subprocess, one at a time, with deadlines spread evenly over 50 ms..1 s
(shuffled with a fixed seed, so drift does not line up with the deadline).
For each call:

- overshoot = time the status arrived - deadline (negative: before it);
- 100 ms after the status arrived, that transport's statements still active in
  `pg_stat_activity` (direct: the service pool's `application_name`, "crm_svc";
  REST: the stand-in's, which like PostgREST never cancels a query when its
  HTTP client goes away, so only the pre-request statement_timeout stops it).

Calls run one at a time, so a leftover statement can only be the last call's.
The database is a small one of its own (`crm_bench_overshoot`), rebuilt each run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg

from bench.common import (
    BENCH_DATA_DIR,
    STANDIN_NOTE,
    bench_server,
    create_fresh_database,
    error_reason,
    markdown_table,
    percentile,
    postgrest_standin,
    rest_service_env,
    say,
    write_tokens_file,
)
from devkit.postgrest_standin import APP_NAME as STANDIN_APP_NAME
from devkit.processes import running_service
from shared.auth import SCOPE_PIPELINE_READ
from shared.deadline import SAFETY_MARGIN_S
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc

OVERSHOOT_DB = "crm_bench_overshoot"
TENANT = "bench-overshoot"
# crm_svc/__main__.py opens its pool with this application_name.
SERVICE_APP_NAME = "crm_svc"
LOCK_HOLDER_APP_NAME = "bench_lock_holder"
SHORTEST_DEADLINE_S = 0.05
LONGEST_DEADLINE_S = 1.0
CHECK_AFTER_S = 0.1
SHUFFLE_SEED = 4
# Reason shown when the status came from the client's own deadline timer.
CLIENT_TIMER = "(client timer, no server status)"
DEADLINE_RANGES_MS = ((50, 250), (250, 500), (500, 1000))


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--overshoot-calls",
        type=int,
        default=200,
        metavar="N",
        help="blocked calls per transport (default: %(default)s)",
    )


@dataclass(frozen=True)
class Transport:
    name: str
    label: str
    app_name: str  # application_name of the connections that run its statements


TRANSPORTS = (
    Transport("direct", "direct PostgreSQL (psycopg pool)", SERVICE_APP_NAME),
    Transport("rest", "Supabase REST (stand-in)", STANDIN_APP_NAME),
)


@dataclass(frozen=True)
class BlockedCall:
    deadline_s: float
    overshoot_s: float  # status arrival - deadline
    code: str
    reason: str
    active_after: int  # the transport's statements in state 'active' 100 ms later
    other_after: int  # not idle and not active (e.g. idle in transaction) 100 ms later
    leftovers: tuple[str, ...]  # "state: query" of what was found
    # Active statements seen halfway to the deadline: shows that the check
    # does see this transport's statement while the call waits.
    active_midway: int


def spread_deadlines(count: int) -> list[float]:
    """`count` deadlines evenly over [50 ms, 1 s], in a fixed shuffled order."""
    if count < 2:
        return [SHORTEST_DEADLINE_S] * count
    step = (LONGEST_DEADLINE_S - SHORTEST_DEADLINE_S) / (count - 1)
    deadlines = [SHORTEST_DEADLINE_S + i * step for i in range(count)]
    random.Random(SHUFFLE_SEED).shuffle(deadlines)
    return deadlines


def prepare_database() -> str:
    server = bench_server()
    url = create_fresh_database(server, OVERSHOOT_DB)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO tenants (id, name) VALUES (%s, %s)", (TENANT, TENANT))
        conn.execute("INSERT INTO tenant_settings (tenant_id) VALUES (%s)", (TENANT,))
    return url


async def leftover_statements(
    monitor: psycopg.AsyncConnection[Any], app_name: str
) -> list[tuple[str, str]]:
    """(state, query) of every connection of `app_name` that is not idle."""
    cursor = await monitor.execute(
        "SELECT state, left(regexp_replace(query, '\\s+', ' ', 'g'), 100)"
        " FROM pg_stat_activity WHERE application_name = %s AND state <> 'idle'",
        (app_name,),
    )
    return [(str(state), str(query)) for state, query in await cursor.fetchall()]


async def blocked_call(
    stub: crm_pb2_grpc.CrmServiceStub,
    metadata: tuple[tuple[str, str], ...],
    monitor: psycopg.AsyncConnection[Any],
    transport: Transport,
    deadline_s: float,
) -> BlockedCall:
    async def count_active_midway() -> int:
        await asyncio.sleep(deadline_s / 2)
        found = await leftover_statements(monitor, transport.app_name)
        return sum(1 for state, _ in found if state == "active")

    started = time.perf_counter()
    midway = asyncio.create_task(count_active_midway())
    try:
        await stub.PipelineSummary(
            crm_pb2.PipelineSummaryRequest(tenant_id=TENANT), metadata=metadata, timeout=deadline_s
        )
        code, reason = "OK", "-"
    except grpc.aio.AioRpcError as exc:
        code, reason = exc.code().name, error_reason(exc) or CLIENT_TIMER
    arrived = time.perf_counter()
    active_midway = await midway
    await asyncio.sleep(max(0.0, arrived + CHECK_AFTER_S - time.perf_counter()))
    found = await leftover_statements(monitor, transport.app_name)
    active = sum(1 for state, _ in found if state == "active")
    return BlockedCall(
        deadline_s=deadline_s,
        overshoot_s=arrived - (started + deadline_s),
        code=code,
        reason=reason,
        active_after=active,
        other_after=len(found) - active,
        leftovers=tuple(f"{state}: {query}" for state, query in found),
        active_midway=active_midway,
    )


async def sanity_call(
    stub: crm_pb2_grpc.CrmServiceStub, metadata: tuple[tuple[str, str], ...], transport: Transport
) -> None:
    """One unblocked call must succeed (also warms the channel and the pool)."""
    try:
        await stub.PipelineSummary(
            crm_pb2.PipelineSummaryRequest(tenant_id=TENANT), metadata=metadata, timeout=5.0
        )
    except grpc.aio.AioRpcError as exc:
        raise RuntimeError(
            f"{transport.name}: unblocked call failed: {exc.code().name}: {exc.details()}"
        ) from None


def _counted(values: Sequence[str]) -> str:
    return ", ".join(f"{value} x{n}" for value, n in Counter(values).most_common())


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:+,.1f}"


def _deadline_range(deadline_s: float) -> str:
    """The DEADLINE_RANGES_MS bucket of a deadline; the last one includes its top."""
    ms = deadline_s * 1000
    for low, high in DEADLINE_RANGES_MS:
        if ms < high:
            return f"{low}-{high} ms"
    low, high = DEADLINE_RANGES_MS[-1]
    return f"{low}-{high} ms"


def report(results: dict[str, list[BlockedCall]], calls: int) -> None:
    command = shlex.join([os.path.relpath(sys.executable), "-m", "bench", *sys.argv[1:]])
    print()
    print("## Deadline overshoot: PipelineSummary against a blocked database")
    print()
    print(f"- command: `{command}`")
    print(
        f"- {calls} calls per transport, one at a time, deadlines evenly spread over"
        f" {SHORTEST_DEADLINE_S * 1000:.0f}..{LONGEST_DEADLINE_S * 1000:.0f} ms (shuffled);"
        " `pipeline_stage_clients` (read by every summary) held in ACCESS EXCLUSIVE mode by another connection throughout;"
        " real crm_svc subprocess per transport"
    )
    print(
        "- overshoot = time the status arrived at the caller - the call's deadline;"
        f" negative = answered before the deadline (the service keeps a {SAFETY_MARGIN_S * 1000:.0f} ms"
        " safety margin for its answer)"
    )
    print(
        f"- leftover = the transport's statements still `active` in pg_stat_activity"
        f" {CHECK_AFTER_S * 1000:.0f} ms after the status arrived"
        f" (direct: application_name {SERVICE_APP_NAME}; REST: {STANDIN_APP_NAME})"
    )
    print(
        "- seen active midway = calls whose statement the same check found `active` halfway"
        " to the deadline (the check can see it; a leftover would show)"
    )
    print(f"- {STANDIN_NOTE}")
    print(
        f"- {os.cpu_count()} CPUs shared with other work; machine load average (1 min)"
        f" at the end {os.getloadavg()[0]:.1f}"
    )
    print()
    rows = []
    for transport in TRANSPORTS:
        done = results.get(transport.name)
        if not done:
            continue
        overshoots = [c.overshoot_s for c in done]
        rows.append(
            [
                transport.label,
                len(done),
                _ms(percentile(overshoots, 50)),
                _ms(percentile(overshoots, 99)),
                _ms(max(overshoots)),
                _ms(min(overshoots)),
                sum(1 for c in done if c.active_midway),
                sum(c.active_after for c in done),
                sum(1 for c in done if c.active_after),
                sum(c.other_after for c in done),
                _counted([c.code for c in done]),
            ]
        )
    print(
        markdown_table(
            [
                "transport",
                "calls",
                "p50 overshoot ms",
                "p99 ms",
                "max ms",
                "min ms",
                "calls seen active midway",
                "leftover active statements",
                "calls with leftovers",
                "other non-idle (e.g. idle in tx)",
                "status codes",
            ],
            rows,
            right=(1, 2, 3, 4, 5, 6, 7, 8, 9),
        )
    )
    print()
    range_rows = []
    for transport in TRANSPORTS:
        by_range: dict[str, list[float]] = {}
        for c in results.get(transport.name, []):
            by_range.setdefault(_deadline_range(c.deadline_s), []).append(c.overshoot_s)
        for low, high in DEADLINE_RANGES_MS:
            in_range = by_range.get(f"{low}-{high} ms")
            if in_range:
                range_rows.append(
                    [
                        transport.label,
                        f"{low}-{high} ms",
                        len(in_range),
                        _ms(percentile(in_range, 50)),
                        _ms(max(in_range)),
                    ]
                )
    print("By deadline range:")
    print()
    print(
        markdown_table(
            ["transport", "deadline", "calls", "p50 overshoot ms", "max ms"],
            range_rows,
            right=(2, 3, 4),
        )
    )
    print()
    for transport in TRANSPORTS:
        done = results.get(transport.name, [])
        print(f"- {transport.label}: who answered: {_counted([c.reason for c in done])}")
        found = [line for c in done for line in c.leftovers]
        if found:
            print(f"  - found 100 ms later: {_counted(found)}")
    print()


async def run(args: argparse.Namespace) -> None:
    calls = args.overshoot_calls
    deadlines = spread_deadlines(calls)
    say(f"overshoot: fresh database {OVERSHOOT_DB}")
    url = await asyncio.to_thread(prepare_database)

    token = secrets.token_urlsafe(24)
    tokens_file = BENCH_DATA_DIR / "tokens-overshoot.toml"
    write_tokens_file(tokens_file, token, [SCOPE_PIPELINE_READ])
    metadata = (("authorization", f"Bearer {token}"),)
    direct_env = {"DATABASE_URL": url, "AUTH_TOKENS_FILE": str(tokens_file)}
    results: dict[str, list[BlockedCall]] = {}
    with postgrest_standin(url) as standin:
        rest_env = {**direct_env, **rest_service_env(standin)}
        async with (
            running_service(
                "crm_svc",
                listen_var="CRM_LISTEN",
                env=direct_env,
                log_path=BENCH_DATA_DIR / "crm_svc_overshoot.log",
            ) as direct_service,
            running_service(
                "crm_svc",
                listen_var="CRM_LISTEN",
                env=rest_env,
                log_path=BENCH_DATA_DIR / "crm_svc_overshoot_rest.log",
            ) as rest_service,
            grpc.aio.insecure_channel(direct_service.address) as direct_channel,
            grpc.aio.insecure_channel(rest_service.address) as rest_channel,
            await psycopg.AsyncConnection.connect(
                url, autocommit=True, application_name="bench_monitor"
            ) as monitor,
            await psycopg.AsyncConnection.connect(
                url, application_name=LOCK_HOLDER_APP_NAME
            ) as lock_holder,
        ):
            stubs = {
                "direct": crm_pb2_grpc.CrmServiceStub(direct_channel),
                "rest": crm_pb2_grpc.CrmServiceStub(rest_channel),
            }
            for transport in TRANSPORTS:
                await sanity_call(stubs[transport.name], metadata, transport)
            say(
                "overshoot: both services answer; locking pipeline_stage_clients (ACCESS EXCLUSIVE)"
            )
            await lock_holder.execute("LOCK TABLE pipeline_stage_clients IN ACCESS EXCLUSIVE MODE")
            try:
                for transport in TRANSPORTS:
                    done = results.setdefault(transport.name, [])
                    started = time.monotonic()
                    for index, deadline_s in enumerate(deadlines, start=1):
                        done.append(
                            await blocked_call(
                                stubs[transport.name], metadata, monitor, transport, deadline_s
                            )
                        )
                        if index % 25 == 0 or index == calls:
                            worst = max(c.overshoot_s for c in done)
                            left = sum(c.active_after for c in done)
                            say(
                                f"overshoot: {transport.name}: {index}/{calls} calls"
                                f" ({time.monotonic() - started:.0f}s), max overshoot"
                                f" {_ms(worst)} ms, leftover statements {left}"
                            )
            finally:
                # Ends the transaction, which releases the lock.
                await lock_holder.rollback()
                say("overshoot: lock released")
            for transport in TRANSPORTS:
                await sanity_call(stubs[transport.name], metadata, transport)
            say("overshoot: both services answer again after the lock")
    report(results, calls)
