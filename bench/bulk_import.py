"""The "bulk import" section of `bench pipeline`: a tenant loaded with N clients
and 2N quotes while PipelineSummary is read, as a new user would do it.

Each scenario runs in a fresh database of its own (`crm_bulk`) holding three
small neighbour tenants (1k clients, 2k quotes each) and the empty tenant
`bulk-import`, with crm_svc on the direct transport and its background
compactor as in production:

- statements / batches: the load is one INSERT ... SELECT for the clients and
  one for the quotes, or 10k-row INSERT ... SELECT batches, each committed;
- running / started after: crm_svc serves during the load, or is started once
  the load has committed.

Two readers call PipelineSummary back to back with no deadline (the server's
default applies): one reads `bulk-import`, the other the neighbours in turn.
The table reports, counted from the commit of the load's last statement: when
the answer to a read sent right then arrived, OK (and whether every read after the commit equals the full scan,
`pipeline_summary_recompute`, computed once the load committed), the reads
that failed during the whole scenario (any tenant), and the time until the
bulk tenant's reads are back under 2x their steady-state p50 (the median of
the last 30 reads, taken once nothing is pending for the tenant and the log
is vacuumed): the first 5 reads in a row under it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg

from bench.common import (
    BENCH_DATA_DIR,
    BenchServer,
    create_fresh_database,
    drain_backlog,
    format_ms,
    markdown_table,
    percentile,
    say,
    service_process,
    write_tokens_file,
)
from shared.auth import SCOPE_PIPELINE_READ
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc

BULK_DB = "crm_bulk"
BULK_TENANT = "bulk-import"
NEIGHBOURS = ("bulk-neighbour-1", "bulk-neighbour-2", "bulk-neighbour-3")
NEIGHBOUR_CLIENTS = 1_000
BATCH_ROWS = 10_000
SCENARIOS = ("statements-running", "statements-started-after", "batches-running",
             "batches-started-after")  # fmt: skip
# How long to keep reading after the commit before giving up on recovery.
MAX_WATCH_S = 120.0
STEADY_READS = 30
# Reads are back to steady from the first WINDOW consecutive reads under the limit.
WINDOW = 5
# A reader's own timeout: well past the server's default deadline (10 s), so
# that what is measured is the server's answer, never the client giving up.
READ_TIMEOUT_S = 30.0

# Addresses vary in case and carry whitespace at the ends, as spreadsheets do.
CLIENTS_SQL = """
INSERT INTO clients (tenant_id, email, name, pipeline_stage)
SELECT %(tenant)s,
       CASE WHEN i %% 50 = 0 THEN NULL
            WHEN i %% 10 = 0 THEN E'\\t C' || i || '@Bulk.example ' || E'\\r\\n'
            ELSE 'c' || i || '@bulk.example' END,
       'Client ' || i,
       (ARRAY['QUOTED', 'NEGOTIATING', 'BOOKED', 'PAID', 'TRAVELLED', 'LOST'])[1 + i %% 6]
FROM generate_series(%(first)s::int, %(last)s::int) i
"""
# Two quotes per client number; one in 20 has no price.
QUOTES_SQL = """
INSERT INTO quotes (tenant_id, customer_email, total_price, currency)
SELECT %(tenant)s,
       'C' || ((i + 1) / 2) || '@bulk.example',
       CASE WHEN i %% 20 = 0 THEN NULL ELSE ((i::bigint * 7919) %% 99991) / 100.0 + 1 END,
       (ARRAY['EUR', 'USD', 'GBP'])[1 + i %% 3]
FROM generate_series(%(first)s::int, %(last)s::int) i
"""


@dataclass(frozen=True)
class Read:
    tenant_id: str
    started: float  # monotonic
    seconds: float
    code: grpc.StatusCode
    total_clients: int | None = None
    summary: Any = None


@dataclass
class ScenarioResult:
    name: str
    load_s: float = 0.0
    first_ok_s: float | None = None
    exact_after_commit: bool = True
    reads_after_commit: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    steady_p50_s: float | None = None
    back_to_steady_s: float | None = None
    peak_read_s: float = 0.0
    rebuilds: str = ""


class Readers:
    """Two loops of PipelineSummary calls, recording every read."""

    def __init__(self, stub: crm_pb2_grpc.CrmServiceStub, metadata: tuple[tuple[str, str], ...]):
        self.stub = stub
        self.metadata = metadata
        self.reads: list[Read] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def read(self, tenant_id: str) -> Read:
        started = time.monotonic()
        try:
            response = await self.stub.PipelineSummary(
                crm_pb2.PipelineSummaryRequest(tenant_id=tenant_id),
                metadata=self.metadata,
                timeout=READ_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            return Read(tenant_id, started, time.monotonic() - started, exc.code())
        read = Read(
            tenant_id,
            started,
            time.monotonic() - started,
            grpc.StatusCode.OK,
            response.total_clients,
            _comparable(response),
        )
        return read

    async def _loop(self, tenants: tuple[str, ...]) -> None:
        turn = 0
        while True:
            self.reads.append(await self.read(tenants[turn % len(tenants)]))
            turn += 1

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop((BULK_TENANT,))),
            asyncio.create_task(self._loop(NEIGHBOURS)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _comparable(response: crm_pb2.PipelineSummaryResponse) -> Any:
    from bench.pipeline_summary import summary_from_response

    return summary_from_response(response)


def _expected(document: dict[str, Any]) -> Any:
    from bench.pipeline_summary import summary_from_document

    return summary_from_document(document)


def prepare(server: BenchServer) -> str:
    url = create_fresh_database(server, BULK_DB)
    with psycopg.connect(url, autocommit=True) as conn:
        for tenant in (*NEIGHBOURS, BULK_TENANT):
            conn.execute(
                "INSERT INTO tenants (id, name) VALUES (%s, 'bench bulk import')", (tenant,)
            )
        for tenant in NEIGHBOURS:
            conn.execute(CLIENTS_SQL, {"tenant": tenant, "first": 1, "last": NEIGHBOUR_CLIENTS})
            conn.execute(QUOTES_SQL, {"tenant": tenant, "first": 1, "last": 2 * NEIGHBOUR_CLIENTS})
    drain_backlog(url, label="bulk: neighbours")
    return url


def load(url: str, clients: int, batch_rows: int | None) -> float:
    """The load, committed statement by statement; returns when the last committed."""
    with psycopg.connect(url, autocommit=True, application_name="bench_bulk_load") as conn:
        for sql, rows in ((CLIENTS_SQL, clients), (QUOTES_SQL, 2 * clients)):
            step = batch_rows or rows
            for first in range(1, rows + 1, step):
                last = min(first + step - 1, rows)
                conn.execute(sql, {"tenant": BULK_TENANT, "first": first, "last": last})
    return time.monotonic()


def vacuum_log(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM pipeline_deltas")


async def pending(url: str, tenant: str) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM pipeline_deltas WHERE tenant_id = %s", (tenant,)
        )
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def recompute(url: str) -> Any:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute("SELECT pipeline_summary_recompute(%s)", (BULK_TENANT,))
        row = await cursor.fetchone()
    assert row is not None
    return _expected(row[0])


async def run_scenario(
    name: str, server: BenchServer, clients: int, log_dir: Path
) -> ScenarioResult:
    result = ScenarioResult(name)
    say(f"bulk: {name}: preparing database {BULK_DB}")
    url = prepare(server)
    token = secrets.token_urlsafe(24)
    tokens_file = log_dir / "bulk_tokens.toml"
    write_tokens_file(tokens_file, token, [SCOPE_PIPELINE_READ])
    env = {"DATABASE_URL": url, "AUTH_TOKENS_FILE": str(tokens_file)}
    metadata = (("authorization", f"Bearer {token}"),)
    batch_rows = BATCH_ROWS if name.startswith("batches") else None
    service_first = name.endswith("running")
    log_path = log_dir / f"crm_svc_bulk_{name}.log"

    async def serve_and_watch(before_load: Callable[[], Awaitable[None]] | None) -> None:
        nonlocal committed
        async with (
            service_process("crm_svc", listen_var="CRM_LISTEN", env=env, log_path=log_path) as addr,
            grpc.aio.insecure_channel(addr) as channel,
        ):
            readers = Readers(crm_pb2_grpc.CrmServiceStub(channel), metadata)
            readers.start()
            try:
                if before_load is not None:
                    await before_load()
                await watch(readers)
            finally:
                await readers.stop()
            collect(readers.reads)

    async def do_load() -> None:
        nonlocal committed
        started = time.monotonic()
        say(f"bulk: {name}: loading {clients:,} clients and {2 * clients:,} quotes")
        committed = await asyncio.to_thread(load, url, clients, batch_rows)
        result.load_s = committed - started
        say(f"bulk: {name}: load committed after {result.load_s:.1f}s")

    committed = 0.0
    expected: Any = None
    first: Read | None = None

    async def watch(readers: Readers) -> None:
        nonlocal expected, first
        # One more read as soon as the load has committed (or the service is
        # up): what a caller asking right then gets.
        first = await readers.read(BULK_TENANT)
        readers.reads.append(first)
        expected = await recompute(url)  # after: it must not slow that read down
        give_up = committed + MAX_WATCH_S
        # Until nothing is pending for the tenant; then, so that the steady
        # state is the true one (what autovacuum leaves eventually), VACUUM the
        # log and take STEADY_READS more reads.
        while time.monotonic() < give_up:
            if await pending(url, BULK_TENANT) == 0:
                break
            await asyncio.sleep(0.5)
        await asyncio.to_thread(vacuum_log, url)
        steady_from = time.monotonic()
        while time.monotonic() < give_up:
            steady = [
                r for r in readers.reads
                if r.tenant_id == BULK_TENANT and r.started >= steady_from
            ]  # fmt: skip
            if len(steady) >= STEADY_READS:
                break
            await asyncio.sleep(0.2)

    def collect(reads: list[Read]) -> None:
        for r in reads:
            if r.code != grpc.StatusCode.OK:
                result.failed[r.code.name] = result.failed.get(r.code.name, 0) + 1
        bulk = [r for r in reads if r.tenant_id == BULK_TENANT]
        after = sorted((r for r in bulk if r.started >= committed), key=lambda r: r.started)
        result.reads_after_commit = len(after)
        ok = [r for r in after if r.code == grpc.StatusCode.OK]
        if first is not None and first.code == grpc.StatusCode.OK:
            result.first_ok_s = first.started + first.seconds - committed
        result.exact_after_commit = all(r.summary == expected for r in ok) and len(ok) == len(after)
        result.peak_read_s = max((r.seconds for r in after), default=0.0)
        steady = [r.seconds for r in after if r.code == grpc.StatusCode.OK][-STEADY_READS:]
        if len(steady) >= STEADY_READS // 2:
            result.steady_p50_s = percentile(steady, 50)
            result.back_to_steady_s = back_to_steady(after, committed, 2 * result.steady_p50_s)

    if service_first:
        await serve_and_watch(do_load)
    else:
        await do_load()
        await serve_and_watch(None)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pipeline_verify(%s)->>'drift', pipeline_summary(%s)->>'total_clients'",
            (BULK_TENANT, BULK_TENANT),
        ).fetchone()
    assert row is not None and row[0] == "false", f"bulk: {name}: drift after the load: {row}"
    assert int(row[1]) == clients, row
    rebuilds = [
        line for line in log_path.read_text(errors="replace").splitlines()
        if "pipeline_rebuild " in line and f"tenant={BULK_TENANT}" in line
    ]  # fmt: skip
    result.rebuilds = f"{len(rebuilds)}"
    say(f"bulk: {name}: {describe(result)}")
    return result


def back_to_steady(reads: list[Read], committed: float, limit_s: float) -> float | None:
    """Seconds from the commit until reads are back under `limit_s`: the end of
    the last read before the first WINDOW consecutive reads that all answered
    OK under the limit (0 when the first ones did; None when none did). A
    lone slow read later (the machine is shared) does not count."""
    for i in range(max(len(reads) - WINDOW + 1, 0)):
        window = reads[i : i + WINDOW]
        if all(r.code == grpc.StatusCode.OK and r.seconds < limit_s for r in window):
            if i == 0:
                return 0.0
            before = reads[i - 1]
            return max(before.started + before.seconds - committed, 0.0)
    return None


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def describe(r: ScenarioResult) -> str:
    failed = ", ".join(f"{n} {c}" for c, n in sorted(r.failed.items())) or "0"
    return (
        f"load {r.load_s:.1f}s, read sent at commit OK after {_seconds(r.first_ok_s)},"
        f" {r.reads_after_commit} reads after it, exact: {r.exact_after_commit},"
        f" failed reads: {failed}, back under 2x steady p50"
        f" ({format_ms(r.steady_p50_s) + ' ms' if r.steady_p50_s else '?'}):"
        f" {_seconds(r.back_to_steady_s)}"
    )


async def run_section(server: BenchServer, clients: int, scenarios: list[str]) -> list[str]:
    """Run the scenarios; return the section's Markdown lines."""
    results = [await run_scenario(name, server, clients, BENCH_DATA_DIR) for name in scenarios]
    rows = [
        [
            r.name,
            f"{r.load_s:.1f} s",
            _seconds(r.first_ok_s),
            "yes" if r.exact_after_commit else "NO",
            ", ".join(f"{n} {c}" for c, n in sorted(r.failed.items())) or "0",
            format_ms(r.steady_p50_s) + " ms" if r.steady_p50_s else "?",
            _seconds(r.back_to_steady_s),
            f"{r.peak_read_s:.2f} s",
            r.rebuilds,
        ]
        for r in results
    ]
    lines = [
        "",
        f"### Bulk import: {clients:,} clients and {2 * clients:,} quotes into one tenant",
        "",
        markdown_table(
            [
                "scenario",
                "load",
                "read sent at commit: OK after",
                "every read after commit exact",
                "failed reads (all tenants)",
                "steady p50",
                "back under 2x steady p50",
                "slowest read after commit",
                "rebuilds",
            ],
            rows,
        ),
        "",
        "- statements: one INSERT ... SELECT for the clients, one for the quotes;"
        f" batches: {BATCH_ROWS:,}-row INSERT ... SELECT statements, each committed.",
        "- running: crm_svc (direct transport, background compactor) serves during the load;"
        " started after: it is started once the load has committed (its start-up is in the"
        " first-read time).",
        "- reads: PipelineSummary back to back with no deadline (server default 10 s), one"
        " reader on the bulk tenant and one on three 1k-client neighbours, plus one read of"
        " the bulk tenant sent as soon as the load committed (or the service was up); times"
        " are from the commit of the load's last statement; exact = equal to"
        " pipeline_summary_recompute computed after the commit.",
    ]
    return lines
