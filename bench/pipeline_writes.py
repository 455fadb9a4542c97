"""Write throughput with and without the pipeline aggregate triggers (issue 6).

Client and quote inserts and updates through psycopg, the way the application
writes (prepared statements, one connection per writer):

- `single`: one row per statement, autocommit: every write is its own
  transaction, so every write pays the commit-time apply;
- `batch`: 100 rows per statement, one statement per transaction;
- `bulk`: one statement of 50,000 clients, then one of 100,000 quotes;
- `concurrent`: 1 and 4 writers in ONE tenant, mixed single-row writes for a
  few seconds each; reports throughput, commit latency and the share of the
  writers' active time spent waiting for a lock (sampled from pg_stat_activity):
  the contention on the tenant's aggregate rows.

Every workload runs with the six `pipeline_track_*` triggers enabled ("on")
and disabled ("off", what writes cost without the aggregates), alternating
on/off rounds so that neighbours' load hits both alike, each mode in its own
tenant of the same starting size. The "on" tenants are checked against the
full recomputation at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg

from bench.common import (
    BENCH_DATA_DIR,
    bench_server,
    create_fresh_database,
    markdown_table,
    percentile,
    say,
    server_facts,
)

BENCH_DB = "crm_bench_writes"
TRIGGERS = (
    ("clients", "pipeline_track_insert"),
    ("clients", "pipeline_track_update"),
    ("clients", "pipeline_track_delete"),
    ("quotes", "pipeline_track_insert"),
    ("quotes", "pipeline_track_update"),
    ("quotes", "pipeline_track_delete"),
)
MODES = ("off", "on")
STAGES = ("QUOTED", "NEGOTIATING", "BOOKED", "PAID", "TRAVELLED", "LOST")
CURRENCIES = ("EUR", "USD", "GBP")
BATCH_ROWS = 100
WRITER_APP = "bench_writer"
OVERHEAD_TARGET = 1.5


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--writes-ops",
        type=int,
        default=2000,
        metavar="N",
        help="single-row writes per workload, mode and round (default: %(default)s)",
    )
    group.add_argument(
        "--writes-base",
        type=int,
        default=20_000,
        metavar="N",
        help="clients each tenant holds before the timed writes, two quotes each"
        " (default: %(default)s)",
    )
    group.add_argument(
        "--writes-seconds",
        type=float,
        default=4.0,
        metavar="S",
        help="duration of each concurrent run (default: %(default)s)",
    )


async def set_triggers(conn: psycopg.AsyncConnection[Any], enabled: bool) -> None:
    verb = "ENABLE" if enabled else "DISABLE"
    for table, trigger in TRIGGERS:
        await conn.execute(f"ALTER TABLE {table} {verb} TRIGGER {trigger}")


async def create_tenant(conn: psycopg.AsyncConnection[Any], tenant: str, clients: int) -> None:
    """A tenant with `clients` clients in all stages and two quotes each (the
    quotes' addresses re-cased so that they match their client's)."""
    await conn.execute("INSERT INTO tenants (id, name) VALUES (%s, 'writes bench')", (tenant,))
    await conn.execute(
        "INSERT INTO clients (tenant_id, email, pipeline_stage)"
        " SELECT %s, 'c' || g || '@x.io', (%s::text[])[1 + g %% 6]"
        " FROM generate_series(1, %s) g",
        (tenant, list(STAGES), clients),
    )
    await conn.execute(
        "INSERT INTO quotes (tenant_id, customer_email, total_price, currency)"
        " SELECT %s, 'C' || (1 + g %% %s) || '@X.io', 10 + (g %% 997) * 1.01, (%s::text[])[1 + g %% 3]"
        " FROM generate_series(1, %s) g",
        (tenant, clients, list(CURRENCIES), 2 * clients),
    )


@dataclass
class Tenant:
    """A tenant's row ids, refreshed before each round of updates."""

    tenant_id: str
    clients: list[int] = field(default_factory=list)
    quotes: list[int] = field(default_factory=list)

    async def refresh(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute("SELECT id FROM clients WHERE tenant_id = %s", (self.tenant_id,))
        self.clients = [r[0] for r in await cur.fetchall()]
        cur = await conn.execute("SELECT id FROM quotes WHERE tenant_id = %s", (self.tenant_id,))
        self.quotes = [r[0] for r in await cur.fetchall()]


# One write of each kind; `rows` rows in one statement.
Write = Callable[[psycopg.AsyncConnection[Any], Tenant, random.Random, int], Awaitable[None]]


def _email(rng: random.Random, tenant: Tenant) -> str:
    # An existing client's address, so that the aggregates' cross term is exercised.
    return f"c{rng.randint(1, max(len(tenant.clients), 1))}@x.io"


async def insert_clients(
    conn: psycopg.AsyncConnection[Any], tenant: Tenant, rng: random.Random, rows: int
) -> None:
    values = [(tenant.tenant_id, _email(rng, tenant), rng.choice(STAGES)) for _ in range(rows)]
    await conn.execute(
        "INSERT INTO clients (tenant_id, email, pipeline_stage) VALUES "
        + ", ".join(["(%s, %s, %s)"] * rows),
        [v for row in values for v in row],
    )


async def insert_quotes(
    conn: psycopg.AsyncConnection[Any], tenant: Tenant, rng: random.Random, rows: int
) -> None:
    values = [
        (
            tenant.tenant_id,
            _email(rng, tenant).upper(),
            Decimal(rng.randint(1000, 999_999)) / 100,
            rng.choice(CURRENCIES),
        )
        for _ in range(rows)
    ]
    await conn.execute(
        "INSERT INTO quotes (tenant_id, customer_email, total_price, currency) VALUES "
        + ", ".join(["(%s, %s, %s, %s)"] * rows),
        [v for row in values for v in row],
    )


async def update_clients(
    conn: psycopg.AsyncConnection[Any], tenant: Tenant, rng: random.Random, rows: int
) -> None:
    ids = rng.sample(tenant.clients, rows) if rows > 1 else [rng.choice(tenant.clients)]
    await conn.execute(
        "UPDATE clients SET pipeline_stage = %s WHERE tenant_id = %s AND id = ANY (%s)",
        (rng.choice(STAGES), tenant.tenant_id, ids),
    )


async def update_quotes(
    conn: psycopg.AsyncConnection[Any], tenant: Tenant, rng: random.Random, rows: int
) -> None:
    ids = rng.sample(tenant.quotes, rows) if rows > 1 else [rng.choice(tenant.quotes)]
    await conn.execute(
        "UPDATE quotes SET total_price = %s WHERE tenant_id = %s AND id = ANY (%s)",
        (Decimal(rng.randint(1000, 999_999)) / 100, tenant.tenant_id, ids),
    )


WRITES: dict[str, Write] = {
    "insert client": insert_clients,
    "insert quote": insert_quotes,
    "update client stage": update_clients,
    "update quote price": update_quotes,
}


@dataclass
class Result:
    """Rows written per second, per mode, one value per round."""

    rates: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})

    def rate(self, mode: str) -> float:
        return statistics.median(self.rates[mode])

    def overhead(self) -> float:
        return self.rate("off") / self.rate("on")


async def timed_writes(
    conn: psycopg.AsyncConnection[Any],
    tenant: Tenant,
    write: Write,
    *,
    statements: int,
    rows: int,
    seed: int,
) -> float:
    """Rows per second over `statements` autocommit statements of `rows` rows."""
    rng = random.Random(seed)
    started = time.perf_counter()
    for _ in range(statements):
        await write(conn, tenant, rng, rows)
    return statements * rows / (time.perf_counter() - started)


@dataclass
class ConcurrentRun:
    ops_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    lock_wait_share: float  # of the writers' active samples


async def concurrent_run(
    url: str, tenant: Tenant, writers: int, seconds: float, seed: int
) -> ConcurrentRun:
    """`writers` connections writing single-row transactions (a mix of the four
    kinds) into one tenant for `seconds`, while another connection samples
    what they wait for."""
    latencies: list[float] = []
    stop = asyncio.Event()
    samples = {"active": 0, "lock": 0}

    async def writer(index: int) -> None:
        rng = random.Random(seed * 100 + index)
        kinds = list(WRITES.values())
        async with await psycopg.AsyncConnection.connect(
            url, autocommit=True, application_name=WRITER_APP
        ) as conn:
            while not stop.is_set():
                t0 = time.perf_counter()
                await rng.choice(kinds)(conn, tenant, rng, 1)
                latencies.append(time.perf_counter() - t0)

    async def sampler() -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            while not stop.is_set():
                cur = await conn.execute(
                    "SELECT count(*) FILTER (WHERE state = 'active'),"
                    " count(*) FILTER (WHERE state = 'active' AND wait_event_type = 'Lock')"
                    " FROM pg_stat_activity WHERE application_name = %s",
                    (WRITER_APP,),
                )
                row = await cur.fetchone()
                assert row is not None
                samples["active"] += row[0]
                samples["lock"] += row[1]
                await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(writer(i)) for i in range(writers)]
    tasks.append(asyncio.create_task(sampler()))
    await asyncio.sleep(0.3)  # connected and warm
    latencies.clear()
    samples.update(active=0, lock=0)
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - started
    await asyncio.gather(*tasks)
    return ConcurrentRun(
        ops_per_s=len(latencies) / elapsed,
        latency_p50_ms=statistics.median(latencies) * 1000,
        latency_p95_ms=percentile(latencies, 95) * 1000,
        lock_wait_share=samples["lock"] / max(samples["active"], 1),
    )


def _fmt_rate(rate: float) -> str:
    return f"{rate:,.0f}"


async def run(args: argparse.Namespace) -> None:
    server = bench_server()
    where = f"embedded, {BENCH_DATA_DIR}" if server.embedded else "DATABASE_URL"
    say(f"writes: PostgreSQL {where}; fresh database {BENCH_DB}")
    url = create_fresh_database(server, BENCH_DB)
    facts = server_facts(url)
    rounds = args.reps or 2
    ops = args.writes_ops
    base = args.writes_base

    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, application_name=WRITER_APP
    ) as conn:
        tenants: dict[str, Tenant] = {}
        for mode in MODES:
            started = time.perf_counter()
            await set_triggers(conn, mode == "on")
            tenant_id = f"writes-{mode}"
            await create_tenant(conn, tenant_id, base)
            tenants[mode] = Tenant(tenant_id)
            say(
                f"writes: tenant {tenant_id}: {base:,} clients, {2 * base:,} quotes,"
                f" triggers {mode}, {time.perf_counter() - started:.1f}s"
            )
        await conn.execute("VACUUM (ANALYZE) clients, quotes")

        single = {name: Result() for name in WRITES}
        batch = {name: Result() for name in WRITES}
        for round_index in range(rounds):
            # Alternate which mode goes first.
            order = MODES if round_index % 2 == 0 else MODES[::-1]
            for mode in order:
                await set_triggers(conn, mode == "on")
                tenant = tenants[mode]
                await tenant.refresh(conn)
                for i, (name, write) in enumerate(WRITES.items()):
                    seed = round_index * 10 + i
                    single[name].rates[mode].append(
                        await timed_writes(conn, tenant, write, statements=ops, rows=1, seed=seed)
                    )
                    batch[name].rates[mode].append(
                        await timed_writes(
                            conn,
                            tenant,
                            write,
                            statements=max(ops // BATCH_ROWS * 2, 10),
                            rows=BATCH_ROWS,
                            seed=seed,
                        )
                    )
                say(
                    f"writes: round {round_index + 1}/{rounds}, triggers {mode}: "
                    + ", ".join(f"{n} {_fmt_rate(r.rates[mode][-1])}/s" for n, r in single.items())
                )

        bulk: dict[str, dict[str, float]] = {}
        for mode in MODES:
            await set_triggers(conn, mode == "on")
            tenant_id = f"bulk-{mode}"
            started = time.perf_counter()
            await conn.execute(
                "INSERT INTO tenants (id, name) VALUES (%s, 'writes bench')", (tenant_id,)
            )
            t0 = time.perf_counter()
            await conn.execute(
                "INSERT INTO clients (tenant_id, email, pipeline_stage)"
                " SELECT %s, 'b' || g || '@x.io', (%s::text[])[1 + g %% 6]"
                " FROM generate_series(1, 50000) g",
                (tenant_id, list(STAGES)),
            )
            t1 = time.perf_counter()
            await conn.execute(
                "INSERT INTO quotes (tenant_id, customer_email, total_price, currency)"
                " SELECT %s, ' B' || (1 + g %% 50000) || '@x.io', 10 + (g %% 997) * 1.01,"
                " (%s::text[])[1 + g %% 3] FROM generate_series(1, 100000) g",
                (tenant_id, list(CURRENCIES)),
            )
            t2 = time.perf_counter()
            bulk[mode] = {"clients": 50_000 / (t1 - t0), "quotes": 100_000 / (t2 - t1)}
            say(f"writes: bulk, triggers {mode}: {t1 - t0:.2f}s clients, {t2 - t1:.2f}s quotes")

        concurrent: dict[tuple[int, str], ConcurrentRun] = {}
        for writers in (1, 4):
            for mode in MODES:
                await set_triggers(conn, mode == "on")
                tenant = tenants[mode]
                await tenant.refresh(conn)
                concurrent[(writers, mode)] = await concurrent_run(
                    url, tenant, writers, args.writes_seconds, seed=writers
                )
                result = concurrent[(writers, mode)]
                say(
                    f"writes: {writers} writer(s), triggers {mode}: {result.ops_per_s:,.0f} ops/s,"
                    f" lock waits {result.lock_wait_share:.0%}"
                )
        await set_triggers(conn, True)

        # The timed writes must have left exact aggregates behind.
        checks = []
        for tenant_id in (tenants["on"].tenant_id, "bulk-on"):
            cur = await conn.execute("SELECT pipeline_verify(%s)", (tenant_id,))
            row = await cur.fetchone()
            assert row is not None
            checks.append(f"{tenant_id}: {'DRIFT' if row[0]['drift'] else 'exact'}")
        say("writes: aggregates vs recomputation: " + ", ".join(checks))

    report(single, batch, bulk, concurrent, facts, where, checks, base, rounds, ops)


def report(
    single: dict[str, Result],
    batch: dict[str, Result],
    bulk: dict[str, dict[str, float]],
    concurrent: dict[tuple[int, str], ConcurrentRun],
    facts: dict[str, str],
    where: str,
    checks: list[str],
    base: int,
    rounds: int,
    ops: int,
) -> None:
    command = shlex.join([os.path.relpath(sys.executable), "-m", "bench", *sys.argv[1:]])
    print()
    print("## Writes with and without the pipeline aggregate triggers")
    print()
    print(f"- command: `{command}`")
    print(
        f"- PostgreSQL {facts['server_version']} ({where}); {os.cpu_count()} CPUs shared with"
        " other work; synchronous_commit on; client: one Python asyncio process, psycopg"
    )
    print(
        f"- each mode writes into its own tenant that started with {base:,} clients and"
        f" {2 * base:,} quotes; {rounds} alternating rounds per mode, median shown;"
        f" single = {ops:,} autocommit statements of 1 row, batch = statements of {BATCH_ROWS} rows"
    )
    print(f"- afterwards: {', '.join(checks)}")
    print()
    rows = []
    for label, results in (("single", single), ("batch", batch)):
        for name, result in results.items():
            overhead = result.overhead()
            rows.append(
                [
                    name,
                    label,
                    _fmt_rate(result.rate("off")),
                    _fmt_rate(result.rate("on")),
                    f"{overhead:.2f}x",
                    "met" if overhead <= OVERHEAD_TARGET else "missed",
                ]
            )
    for kind in ("clients", "quotes"):
        overhead = bulk["off"][kind] / bulk["on"][kind]
        rows.append(
            [
                f"insert {kind}",
                "bulk (1 statement)",
                _fmt_rate(bulk["off"][kind]),
                _fmt_rate(bulk["on"][kind]),
                f"{overhead:.2f}x",
                "met" if overhead <= OVERHEAD_TARGET else "missed",
            ]
        )
    print(
        markdown_table(
            ["write", "rows per statement", "off rows/s", "on rows/s", "slowdown", "<= 1.5x"],
            rows,
            right=(2, 3, 4),
        )
    )
    print()
    print("Concurrent single-row writers in one tenant (mixed kinds):")
    print()
    crows = []
    for (writers, mode), run_ in sorted(concurrent.items()):
        crows.append(
            [
                writers,
                mode,
                _fmt_rate(run_.ops_per_s),
                f"{run_.latency_p50_ms:.2f}",
                f"{run_.latency_p95_ms:.2f}",
                f"{run_.lock_wait_share:.0%}",
            ]
        )
    print(
        markdown_table(
            ["writers", "triggers", "writes/s", "p50 ms", "p95 ms", "lock-wait share"],
            crows,
            right=(0, 2, 3, 4, 5),
        )
    )
    print()
