"""Write throughput with and without the pipeline aggregate triggers (docs/pipeline.md).

Client and quote inserts and updates through psycopg, the way the application
writes (prepared statements, one connection per writer):

- `single`: one row per statement, autocommit: every write is its own
  transaction;
- `batch`: 100 rows per statement, one statement per transaction;
- `bulk`: one statement of 50,000 clients, then one of 100,000 quotes;
- `concurrent`: 1 and 4 writers in ONE tenant, mixed single-row writes for a
  few seconds each; reports throughput, commit latency and the share of the
  writers' active time spent waiting for a lock (sampled from pg_stat_activity).

Every workload runs with the six `pipeline_track_*` triggers enabled ("on")
and disabled ("off", what writes cost without the aggregates), alternating
on/off rounds so that neighbours' load hits both alike, each mode in its own
tenant of the same starting size.

Since the delta log (docs/pipeline.md) a write only appends deltas to `pipeline_deltas`; the
aggregates are brought up to date by a background compactor in crm_svc. "on"
therefore includes that compactor, as production runs it: while an "on"
workload runs, another connection loops `SELECT pipeline_compact(10000)`,
again at once while it answers "more", else after 0.2 s, so its CPU competes
with the writers' (the machine has 2). Per "on" workload the compactor's work
is reported: deltas logged and compacted per second, the share of the time it
spent inside pipeline_compact, the backlog (rows in pipeline_deltas) when the
writes ended, and how long it then took to empty the log (the compactor going
on as in production). The log is empty when each workload starts.

At the end, with the compactor stopped, more writes go into the "on" tenants
so that deltas are pending; both are checked against the full recomputation
(`pipeline_verify`: summary and every aggregate row, pending deltas included),
then every delta is compacted and both are checked again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from bench.common import (
    BENCH_DATA_DIR,
    COMPACT_BATCH,
    COMPACT_IDLE_S,
    Drain,
    bench_server,
    create_fresh_database,
    drain_backlog,
    markdown_table,
    percentile,
    say,
    server_facts,
)

BENCH_DB = "crm_bench_writes"
TRIGGERS = tuple(
    (table, f"pipeline_track_{table}_{event}")
    for table in ("clients", "quotes")
    for event in ("insert", "update", "delete")
)
MODES = ("off", "on")
# The write guard (0006_tenant_write_guard.sql), measured on its own.
GUARD_TRIGGERS = tuple(
    (table, f"tenant_write_guard_{event}")
    for table in ("clients", "quotes", "notifications")
    for event in ("insert", "update")
)
# The guard's own cost per statement, without the round trip and the commit
# that hide it in the single-row rates: one DO block of single-row INSERTs.
GUARD_STATEMENTS = 10_000
GUARD_LOOPS = {
    "insert client": "INSERT INTO clients (tenant_id, email) VALUES ({tenant}, 'g' || i || '@x.io')",
    "insert notification": "INSERT INTO notifications (tenant_id, message) VALUES ({tenant}, 'g')",
}
STAGES = ("QUOTED", "NEGOTIATING", "BOOKED", "PAID", "TRAVELLED", "LOST")
CURRENCIES = ("EUR", "USD", "GBP")
BATCH_ROWS = 100
WRITER_APP = "bench_writer"
COMPACTOR_APP = "bench_compactor"
OVERHEAD_TARGET = 1.5
# Single-row writes of each kind per "on" tenant left for the final check.
FINAL_OPS = 200
# How long the compactor may take to empty the log after a workload.
DRAIN_GIVE_UP_S = 600.0

T = TypeVar("T")


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


async def set_triggers(
    conn: psycopg.AsyncConnection[Any],
    enabled: bool,
    triggers: tuple[tuple[str, str], ...] = TRIGGERS,
) -> None:
    verb = "ENABLE" if enabled else "DISABLE"
    for table, trigger in triggers:
        await conn.execute(f"ALTER TABLE {table} {verb} TRIGGER {trigger}")


async def guard_rates(
    conn: psycopg.AsyncConnection[Any], tenant: Tenant, rounds: int, ops: int
) -> dict[str, dict[str, list[float]]]:
    """Single-row writes with the write guard on and off (the pipeline
    triggers on), alternating which goes first: {write: {mode: rates}}."""
    rates: dict[str, dict[str, list[float]]] = {name: {"off": [], "on": []} for name in WRITES}
    for round_index in range(rounds):
        for mode in ("off", "on") if round_index % 2 == 0 else ("on", "off"):
            await set_triggers(conn, mode == "on", GUARD_TRIGGERS)
            await tenant.refresh(conn)
            for i, (name, write) in enumerate(WRITES.items()):
                rate = await timed_writes(
                    conn, tenant, write, statements=ops, rows=1, seed=100 + round_index * 10 + i
                )
                rates[name][mode].append(rate)
    await set_triggers(conn, True, GUARD_TRIGGERS)
    return rates


async def guard_statement_costs(
    conn: psycopg.AsyncConnection[Any], tenant: Tenant, rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Server-side µs per single-row INSERT with the guard on and off,
    alternating which goes first: {write: {mode: µs per statement}}."""
    costs: dict[str, dict[str, list[float]]] = {n: {"off": [], "on": []} for n in GUARD_LOOPS}
    for round_index in range(rounds):
        for mode in ("off", "on") if round_index % 2 == 0 else ("on", "off"):
            await set_triggers(conn, mode == "on", GUARD_TRIGGERS)
            for name, statement in GUARD_LOOPS.items():
                loop = sql.SQL(
                    "DO $$ BEGIN FOR i IN 1..{n} LOOP " + statement + "; END LOOP; END $$"
                ).format(n=GUARD_STATEMENTS, tenant=sql.Literal(tenant.tenant_id))
                started = time.perf_counter()
                await conn.execute(loop)
                costs[name][mode].append((time.perf_counter() - started) / GUARD_STATEMENTS * 1e6)
    await set_triggers(conn, True, GUARD_TRIGGERS)
    return costs


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
class Compaction:
    """What the compactor did during one "on" workload."""

    seconds: float  # the workload, from starting the compactor to the writes' end
    logged: int  # deltas the writes appended to pipeline_deltas
    compacted: int  # deltas the compactor folded into the aggregates meanwhile
    busy_s: float  # time the compactor spent inside pipeline_compact meanwhile
    backlog: int  # rows in pipeline_deltas when the writes ended
    drain_s: float  # from the writes' end until the log was empty (compactor going on)
    # CPU seconds of the compactor's PostgreSQL backend from the workload's
    # start until the log was empty: what folding these deltas cost in all.
    # None when the server's processes cannot be seen (DATABASE_URL elsewhere).
    cpu_s: float | None

    @property
    def logged_per_s(self) -> float:
        return self.logged / self.seconds

    @property
    def compacted_per_s(self) -> float:
        return self.compacted / self.seconds

    @property
    def busy_share(self) -> float:
        return self.busy_s / self.seconds


@dataclass
class Result:
    """Rows written per second, per mode, one value per round; and what the
    compactor did in each "on" round."""

    rates: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    compaction: list[Compaction] = field(default_factory=list)

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


# --- the compactor, as crm_svc runs it ------------------------------------------------


@dataclass(frozen=True)
class CompactCall:
    started: float  # perf_counter
    ended: float
    compacted: int
    more: bool
    busy: int


def _local_backend_stat(pid: int) -> Path | None:
    """/proc/<pid>/stat of a PostgreSQL backend, if the server runs on this
    machine (the embedded one does); None otherwise."""
    proc = Path(f"/proc/{pid}")
    try:
        is_postgres = (proc / "comm").read_text().startswith("postgres")
    except OSError:
        return None
    return proc / "stat" if is_postgres else None


class Compactor:
    """crm_svc's background compactor, reproduced on a connection of its own:
    `pipeline_compact(COMPACT_BATCH)`, again at once while it answers "more",
    else after COMPACT_IDLE_S. Started and stopped around each "on" workload.

    It is an asyncio task of this process: its Python side is one awaited
    query per call, while its PostgreSQL backend, where the work is, is a
    process of its own competing with the writers' backends for the CPUs.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.calls: list[CompactCall] = []
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._in_call_since: float | None = None
        self._backend_stat: Path | None = None

    async def __aenter__(self) -> Compactor:
        self._conn = await psycopg.AsyncConnection.connect(
            self.url, autocommit=True, application_name=COMPACTOR_APP
        )
        cursor = await self._conn.execute("SELECT pg_backend_pid()")
        row = await cursor.fetchone()
        assert row is not None
        self._backend_stat = _local_backend_stat(int(row[0]))
        return self

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) of the compactor's PostgreSQL backend so far."""
        if self._backend_stat is None:
            return None
        try:
            fields = self._backend_stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        # utime and stime are fields 14 and 15 of /proc/<pid>/stat, in clock ticks.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
        if self._conn is not None:
            await self._conn.close()

    def start(self) -> None:
        assert self._task is None, "the compactor is already running"
        self._stop.clear()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop after the call in progress, if any, has finished."""
        task, self._task = self._task, None
        if task is not None:
            self._stop.set()
            await task

    async def _loop(self) -> None:
        assert self._conn is not None
        while not self._stop.is_set():
            self._in_call_since = started = time.perf_counter()
            cursor = await self._conn.execute("SELECT pipeline_compact(%s)", (COMPACT_BATCH,))
            row = await cursor.fetchone()
            self._in_call_since = None
            assert row is not None
            answer = row[0]
            for tenant in answer["rebuild"]:  # as crm_svc's compactor does
                await self._conn.execute("SELECT pipeline_rebuild_if_needed(%s)", (tenant,))
            more = bool(answer["more"])
            self.calls.append(
                CompactCall(
                    started,
                    time.perf_counter(),
                    int(answer["compacted"]),
                    more,
                    int(answer["busy"]),
                )
            )
            if not more:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(COMPACT_IDLE_S):
                        await self._stop.wait()

    def window(self, start: float, end: float) -> tuple[int, float]:
        """Deltas compacted by the calls that finished within [start, end], and
        the time spent inside pipeline_compact within it (the call in progress
        at `end` included)."""
        compacted = sum(c.compacted for c in self.calls if start <= c.ended <= end)
        spans = [(c.started, c.ended) for c in self.calls]
        if self._in_call_since is not None:
            spans.append((self._in_call_since, end))
        busy = sum(max(0.0, min(e, end) - max(s, start)) for s, e in spans)
        return compacted, busy

    async def wait_drained(
        self, conn: psycopg.AsyncConnection[Any], since: float, backlog: int
    ) -> float:
        """Seconds from `since` (the writes' end, when `backlog` deltas were
        pending) until pipeline_deltas is empty, this compactor going on as in
        production: the end of the call after which the log was found empty."""
        if backlog == 0:
            return 0.0
        checked = len(self.calls)
        while True:
            await asyncio.sleep(0.005)
            new = self.calls[checked:]
            checked += len(new)
            if any(not c.more for c in new) and await count_backlog(conn) == 0:
                return max(new[-1].ended - since, 0.0)
            if time.perf_counter() - since > DRAIN_GIVE_UP_S:
                raise RuntimeError(
                    f"the compactor did not empty the log within {DRAIN_GIVE_UP_S:g}s"
                )


async def count_backlog(conn: psycopg.AsyncConnection[Any]) -> int:
    cursor = await conn.execute("SELECT count(*) FROM pipeline_deltas")
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def deltas_logged(conn: psycopg.AsyncConnection[Any]) -> int:
    """About how many deltas were ever appended: the log's identity sequence
    (no write here rolls back; each session takes ids 1000 at a time, so it
    overcounts by under 1000 per session)."""
    cursor = await conn.execute(
        "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('pipeline_deltas', 'id')), 0)"
    )
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def workload(
    mode: str,
    conn: psycopg.AsyncConnection[Any],
    compactor: Compactor,
    body: Callable[[], Awaitable[T]],
) -> tuple[T, Compaction | None]:
    """Run `body`; in "on" mode with the compactor running alongside, and
    until it has emptied the log afterwards."""
    if mode != "on":
        return await body(), None
    if await count_backlog(conn):
        raise RuntimeError("deltas pending before an 'on' workload: the log should be empty")
    logged_before = await deltas_logged(conn)
    cpu_before = compactor.cpu_seconds()
    started = time.perf_counter()
    compactor.start()
    try:
        value = await body()
        ended = time.perf_counter()
        compacted, busy_s = compactor.window(started, ended)
        backlog = await count_backlog(conn)
        drain_s = await compactor.wait_drained(conn, ended, backlog)
    finally:
        await compactor.stop()
    cpu_after = compactor.cpu_seconds()
    cpu_s = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    logged = await deltas_logged(conn) - logged_before
    return value, Compaction(ended - started, logged, compacted, busy_s, backlog, drain_s, cpu_s)


# --- the run ---------------------------------------------------------------------------


def _fmt_rate(rate: float) -> str:
    return f"{rate:,.0f}"


@dataclass(frozen=True)
class Check:
    tenant_id: str
    pending: int  # deltas pending at the first check
    drift_pending: bool  # drift found with them pending
    drift_compacted: bool  # drift found after compacting everything
    pending_after: int

    def describe(self) -> str:
        def verdict(drift: bool) -> str:
            return "DRIFT" if drift else "exact"

        return (
            f"{self.tenant_id}: {verdict(self.drift_pending)} with {self.pending:,} deltas pending,"
            f" {verdict(self.drift_compacted)} after compacting them"
            f" ({self.pending_after:,} pending)"
        )

    @property
    def ok(self) -> bool:
        return not (self.drift_pending or self.drift_compacted)


async def verify(conn: psycopg.AsyncConnection[Any], tenant_id: str) -> tuple[bool, int]:
    """(drift, pending deltas) from pipeline_verify, in one snapshot."""
    cursor = await conn.execute("SELECT pipeline_verify(%s)", (tenant_id,))
    row = await cursor.fetchone()
    assert row is not None
    return bool(row[0]["drift"]), int(row[0]["pending_deltas"])


async def run(args: argparse.Namespace) -> None:
    server = bench_server()
    where = f"embedded, {BENCH_DATA_DIR}" if server.embedded else "DATABASE_URL"
    say(f"writes: PostgreSQL {where}; fresh database {BENCH_DB}")
    url = create_fresh_database(server, BENCH_DB)
    facts = server_facts(url)
    rounds = args.reps or 2
    ops = args.writes_ops
    base = args.writes_base
    batch_statements = max(ops // BATCH_ROWS * 2, 10)

    async with (
        await psycopg.AsyncConnection.connect(
            url, autocommit=True, application_name=WRITER_APP
        ) as conn,
        Compactor(url) as compactor,
    ):
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
        # The "on" tenant's rows were logged as deltas: fold them in before timing.
        setup_drain = await asyncio.to_thread(drain_backlog, url, label="writes: setup")
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
                    for results, statements, rows in (
                        (single, ops, 1),
                        (batch, batch_statements, BATCH_ROWS),
                    ):
                        body = functools.partial(
                            timed_writes,
                            conn,
                            tenant,
                            write,
                            statements=statements,
                            rows=rows,
                            seed=seed,
                        )
                        rate, compaction = await workload(mode, conn, compactor, body)
                        results[name].rates[mode].append(rate)
                        if compaction is not None:
                            results[name].compaction.append(compaction)
                say(
                    f"writes: round {round_index + 1}/{rounds}, triggers {mode}: "
                    + ", ".join(f"{n} {_fmt_rate(r.rates[mode][-1])}/s" for n, r in single.items())
                )

        bulk: dict[str, dict[str, float]] = {}
        bulk_compaction: Compaction | None = None
        for mode in MODES:
            await set_triggers(conn, mode == "on")
            tenant_id = f"bulk-{mode}"
            await conn.execute(
                "INSERT INTO tenants (id, name) VALUES (%s, 'writes bench')", (tenant_id,)
            )
            body = functools.partial(bulk_inserts, conn, tenant_id)
            bulk[mode], compaction = await workload(mode, conn, compactor, body)
            if compaction is not None:
                bulk_compaction = compaction
            say(
                f"writes: bulk, triggers {mode}: {50_000 / bulk[mode]['clients']:.2f}s clients,"
                f" {100_000 / bulk[mode]['quotes']:.2f}s quotes"
                + (
                    f"; backlog {compaction.backlog:,} deltas at the end, drained in"
                    f" {compaction.drain_s:.2f}s"
                    if compaction
                    else ""
                )
            )

        concurrent: dict[tuple[int, str], ConcurrentRun] = {}
        concurrent_compaction: dict[int, Compaction] = {}
        for writers in (1, 4):
            for mode in MODES:
                await set_triggers(conn, mode == "on")
                tenant = tenants[mode]
                await tenant.refresh(conn)
                body = functools.partial(
                    concurrent_run, url, tenant, writers, args.writes_seconds, seed=writers
                )
                result, compaction = await workload(mode, conn, compactor, body)
                concurrent[(writers, mode)] = result
                if compaction is not None:
                    concurrent_compaction[writers] = compaction
                say(
                    f"writes: {writers} writer(s), triggers {mode}: {result.ops_per_s:,.0f} ops/s,"
                    f" lock waits {result.lock_wait_share:.0%}"
                )
        await set_triggers(conn, True)
        guard = await guard_rates(conn, tenants["on"], rounds + 1, ops)
        guard_costs = await guard_statement_costs(conn, tenants["on"], rounds + 1)
        say(
            "writes: the write guard: "
            + ", ".join(
                f"{n} {statistics.median(r['off']) / statistics.median(r['on']):.2f}x"
                for n, r in guard.items()
            )
        )

        # The timed writes must have left exact aggregates behind, whether or
        # not the deltas have been compacted yet: leave some pending (the
        # compactor is stopped), check, compact everything, check again.
        on_tenants = [tenants["on"], Tenant("bulk-on")]
        for tenant in on_tenants:
            await tenant.refresh(conn)
            for i, write in enumerate(WRITES.values()):
                await timed_writes(conn, tenant, write, statements=FINAL_OPS, rows=1, seed=100 + i)
                await timed_writes(conn, tenant, write, statements=5, rows=BATCH_ROWS, seed=200 + i)
        pending_checks = {t.tenant_id: await verify(conn, t.tenant_id) for t in on_tenants}
        final_drain = await asyncio.to_thread(
            drain_backlog, url, vacuum=False, label="writes: final compaction"
        )
        checks = []
        for tenant in on_tenants:
            drift_pending, pending = pending_checks[tenant.tenant_id]
            drift_compacted, pending_after = await verify(conn, tenant.tenant_id)
            checks.append(
                Check(tenant.tenant_id, pending, drift_pending, drift_compacted, pending_after)
            )
        say("writes: aggregates vs recomputation: " + "; ".join(c.describe() for c in checks))

    assert bulk_compaction is not None
    report_guard(guard, guard_costs, rounds + 1, ops)
    report(
        single,
        batch,
        bulk,
        bulk_compaction,
        concurrent,
        concurrent_compaction,
        facts,
        where,
        checks,
        setup_drain,
        final_drain,
        base,
        rounds,
        ops,
    )
    if not all(check.ok for check in checks):
        raise SystemExit("writes: the aggregates drifted from the recomputation")


async def bulk_inserts(conn: psycopg.AsyncConnection[Any], tenant_id: str) -> dict[str, float]:
    """50,000 clients in one statement, then 100,000 quotes in one: rows/s of each."""
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
    return {"clients": 50_000 / (t1 - t0), "quotes": 100_000 / (t2 - t1)}


# --- the report --------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _compaction_row(label: str, runs: list[Compaction]) -> list[str]:
    """Medians over the rounds (one run for bulk and concurrent)."""
    backlog = _median([r.backlog for r in runs])
    drain_s = _median([r.drain_s for r in runs])
    # Only a backlog of more than one call's batch says how fast the log drains;
    # a smaller one is gone after one call, and the idle sleep dominates.
    drain_rate = _median(
        [r.backlog / r.drain_s for r in runs if r.drain_s > 0 and r.backlog > COMPACT_BATCH]
        or [0.0]
    )
    cpu = [r.cpu_s for r in runs if r.cpu_s is not None]
    return [
        label,
        str(len(runs)),
        _fmt_rate(_median([r.logged for r in runs])),
        _fmt_rate(_median([r.logged_per_s for r in runs])),
        _fmt_rate(_median([r.compacted_per_s for r in runs])),
        f"{_median([r.busy_share for r in runs]):.0%}",
        _fmt_rate(backlog),
        f"{drain_s:.2f}",
        _fmt_rate(drain_rate) if drain_rate else "-",
        f"{_median(cpu):.2f}" if cpu else "-",
    ]


def report_guard(
    guard: dict[str, dict[str, list[float]]],
    costs: dict[str, dict[str, list[float]]],
    rounds: int,
    ops: int,
) -> None:
    print()
    print("## The write guard")
    print()
    print(
        f"Single-row writes to an active tenant, {ops:,} per write, mode and round, {rounds}"
        " rounds alternating which mode goes first, the pipeline triggers on in both: the"
        " guard's two triggers per table (`tenant_write_guard_*`) enabled or disabled."
        " Medians of the rounds."
    )
    print()
    rows = []
    for name, rates in guard.items():
        off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
        rows.append([name, _fmt_rate(off), _fmt_rate(on), f"{off / on:.2f}x"])
    print(
        markdown_table(
            ["write", "guard off rows/s", "guard on rows/s", "slowdown"], rows, right=(1, 2, 3)
        )
    )
    print()
    print(
        f"The guard's own cost: {GUARD_STATEMENTS:,} single-row INSERTs in one DO block"
        " (no round trip, no commit per row), server-side µs per statement, medians of the"
        " rounds; no tenant is being deprovisioned. `insert notification` has no other trigger."
    )
    print()
    rows = []
    for name, micros in costs.items():
        off, on = statistics.median(micros["off"]), statistics.median(micros["on"])
        rows.append([name, f"{off:.1f}", f"{on:.1f}", f"+{on - off:.1f}"])
    print(
        markdown_table(
            ["write", "guard off µs", "guard on µs", "the guard µs"], rows, right=(1, 2, 3)
        )
    )


def report(
    single: dict[str, Result],
    batch: dict[str, Result],
    bulk: dict[str, dict[str, float]],
    bulk_compaction: Compaction,
    concurrent: dict[tuple[int, str], ConcurrentRun],
    concurrent_compaction: dict[int, Compaction],
    facts: dict[str, str],
    where: str,
    checks: list[Check],
    setup_drain: Drain,
    final_drain: Drain,
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
    print(
        f"- on = triggers logging deltas AND the background compactor running alongside"
        f" as crm_svc runs it (its own connection, `pipeline_compact({COMPACT_BATCH})` again at"
        f' once while "more", else after {COMPACT_IDLE_S:g}s), started with an empty log;'
        " off = triggers disabled, no compactor"
    )
    print(f'- setup: the "on" tenant\'s initial rows: {setup_drain.describe()}')
    print(
        '- afterwards, compactor stopped: more writes into the "on" tenants, then'
        " `pipeline_verify` (summary and every aggregate row vs the recomputation, pending"
        f" deltas included), every delta compacted ({final_drain.describe()}), checked again:"
    )
    for check in checks:
        print(f"  - {check.describe()}")
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
    print(
        'The compactor during the "on" workloads (medians over the rounds): deltas the writes'
        " logged; logged and compacted per second of the workload; the share of the workload"
        " it spent inside pipeline_compact; the backlog (rows in pipeline_deltas) when the"
        " writes ended; the time from then until the log was empty, the compactor going on"
        f' (it sleeps {COMPACT_IDLE_S:g}s whenever a call answers no "more"), and the'
        f" backlog / that time when the backlog exceeded one call's {COMPACT_BATCH:,} deltas;"
        " and the CPU time of the compactor's PostgreSQL backend from the workload's start until"
        " the log was empty (/proc), i.e. what folding the workload's deltas cost in all:"
    )
    print()
    krows = []
    for label, results in (("single", single), ("batch", batch)):
        for name, result in results.items():
            krows.append(_compaction_row(f"{name}, {label}", result.compaction))
    krows.append(_compaction_row("bulk: 50k clients + 100k quotes", [bulk_compaction]))
    for writers, compaction in sorted(concurrent_compaction.items()):
        krows.append(_compaction_row(f"concurrent, {writers} writer(s)", [compaction]))
    print(
        markdown_table(
            [
                "workload (on)",
                "n",
                "deltas logged",
                "logged/s",
                "compacted/s",
                "compactor busy",
                "backlog at end",
                "drain s",
                "drained deltas/s",
                "compactor CPU s",
            ],
            krows,
            right=(1, 2, 3, 4, 5, 6, 7, 8, 9),
        )
    )
    print()
