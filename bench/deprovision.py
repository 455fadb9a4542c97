"""Deprovision: removing one tenant end to end over gRPC, and under short deadlines.

Against a real `python -m provisioning_svc` subprocess (auth, deadline, pool,
the SQL batches, the config directory; DEV_MODE without a SendGrid key, so the
SendGrid step is skipped: one HTTP call is not what scales with rows):

1. one tenant holding ~10k, ~100k and ~1M rows across its tables (clients,
   quotes, invoices, two activities per client, notifications, settings),
   deprovisioned by one call with a generous deadline: seconds, rows/s, and
   business rows/s (the tenant's own data, without our derived rows); while
   another tenant reads its summary and writes, whose latencies before and
   during each deprovisioning are reported;
2. another ~1M-row tenant under 2 s deadlines, the same request retried until
   it completes: calls, total time, what each cut call answered.

Every tenant's rows are interleaved on the heap with the others and with two
noise tenants, whose rows (a checksum per table) and directories are verified
unchanged at the end; each deprovisioned tenant is verified to have no row
left and no directory.

The load's writes log deltas (`pipeline_deltas`, a tenant
table); they are compacted into the pipeline aggregates after loading, as the
background compactor would have done long before a tenant is deprovisioned.
So every tenant also owns aggregate rows, all deleted with it: the rows
expected are counted per tenant before its deprovisioning. Deleting the rows
of a tenant being deprovisioned must log no delta: the log's sequence is
checked unchanged across every call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
from google.rpc import status_pb2
from psycopg import sql

from bench.common import (
    BENCH_DATA_DIR,
    PIPELINE_AGGREGATE_TABLES,
    Drain,
    bench_server,
    create_fresh_database,
    deltas_logged,
    drain_backlog,
    markdown_table,
    percentile,
    say,
    server_facts,
    service_process,
    write_tokens_file,
)
from shared.auth import SCOPE_TENANTS_DELETE
from shared.proto_gen.provisioning.v1 import provisioning_pb2, provisioning_pb2_grpc

BENCH_DB = "deprovision_bench"
CLIENTS_DIR = BENCH_DATA_DIR / "deprovision-clients"
# Rows a tenant holds per client: the client, a quote, an invoice, two
# activities and a notification (plus its tenant_settings and tenants rows).
ROWS_PER_CLIENT = 6
SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000}
DEFAULT_REPS = {"10k": 5, "100k": 3, "1m": 1}
NOISE_ROWS = 200_000  # per noise tenant
# How long the neighbour's calls are watched before each deprovisioning.
NEIGHBOUR_BASELINE_S = 3.0
FULL_DEADLINE_S = 300.0
CUT_TENANT_ROWS = 1_000_000
PIPELINE_TABLES = frozenset({"pipeline_deltas", *PIPELINE_AGGREGATE_TABLES})


@dataclass(frozen=True)
class BenchTenant:
    tenant_id: str
    clients: int

    @property
    def rows(self) -> int:
        """The rows loaded for it: its clients' rows, its settings and its tenant row
        (the pipeline aggregate rows its clients and quotes produce come on top)."""
        return self.clients * ROWS_PER_CLIENT + 2


@dataclass(frozen=True)
class Owned:
    rows: int  # everything the tenant owns, its tenants row included
    pipeline: int  # of which rows of pipeline_deltas and the pipeline aggregates


@dataclass
class FullRun:
    label: str
    rows: int
    pipeline_rows: int
    seconds: list[float] = field(default_factory=list)
    # The neighbour's calls (kind -> seconds) in the same span before each
    # deprovisioning, and during it.
    before: dict[str, list[float]] = field(default_factory=dict)
    during: dict[str, list[float]] = field(default_factory=dict)

    @property
    def business_rows(self) -> int:
        """The tenant's own data: not our derived rows, not its tenants row."""
        return self.rows - self.pipeline_rows - 1


NEIGHBOUR = "bench-neighbour"
NEIGHBOUR_CLIENTS = 10_000


@dataclass(frozen=True)
class NeighbourCall:
    kind: str  # "read" (SELECT pipeline_summary) or "write" (a notification INSERT)
    started: float
    seconds: float


class Neighbour:
    """Another tenant going on meanwhile: its summary read and a notification
    inserted (a write through the write guard that logs no pipeline delta, so
    that "no delta logged while deprovisioning" still holds), back to back, on
    a connection of its own."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.calls: list[NeighbourCall] = []
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.url, autocommit=True, application_name="bench_neighbour"
        ) as conn:
            n = 0
            while True:
                n += 1
                for kind, query, params in (
                    ("read", "SELECT pipeline_summary(%s)", (NEIGHBOUR,)),
                    (
                        "write",
                        "INSERT INTO notifications (tenant_id, message) VALUES (%s, %s)",
                        (NEIGHBOUR, f"note {n}"),
                    ),
                ):
                    started = time.monotonic()
                    await conn.execute(query, params)
                    self.calls.append(NeighbourCall(kind, started, time.monotonic() - started))

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def between(self, start: float, end: float) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {"read": [], "write": []}
        for call in self.calls:
            if start <= call.started and call.started + call.seconds <= end:
                found[call.kind].append(call.seconds)
        return found


@dataclass
class CutRun:
    rows: int
    pipeline_rows: int
    deadline_s: float
    calls: int = 0
    seconds: float = 0.0
    answers: Counter[str] = field(default_factory=Counter)
    deleted_per_cut_call: list[int] = field(default_factory=list)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--deprovision-sizes",
        default=",".join(SIZES),
        help="tenant sizes (rows) to deprovision in one call (default: %(default)s)",
    )
    group.add_argument(
        "--cut-rows",
        type=int,
        default=CUT_TENANT_ROWS,
        metavar="N",
        help="rows of the tenant deprovisioned under short deadlines (default: %(default)s)",
    )
    group.add_argument(
        "--cut-deadline",
        type=float,
        default=2.0,
        metavar="S",
        help="deadline of each call of the retried 1M-row deprovision (default: %(default)s)",
    )


def _clients_for(rows: int) -> int:
    return max(round((rows - 2) / ROWS_PER_CLIENT), 1)


def load(url: str, tenants: Sequence[BenchTenant]) -> None:
    """All tenants' rows in one statement per table, interleaved on the heap."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE bench_tenants (id text PRIMARY KEY, clients int NOT NULL)")
        with conn.cursor().copy("COPY bench_tenants (id, clients) FROM STDIN") as copy:
            for tenant in tenants:
                copy.write_row((tenant.tenant_id, tenant.clients))
        conn.execute("INSERT INTO tenants (id, name) SELECT id, 'bench ' || id FROM bench_tenants")
        conn.execute(
            "INSERT INTO tenant_settings (tenant_id, sendgrid_username)"
            " SELECT id, id || '-mail' FROM bench_tenants"
        )
        started = time.monotonic()
        statements = [
            (
                "clients",
                "INSERT INTO clients (tenant_id, email, name, pipeline_stage)"
                " SELECT t.id, format('c%s@%s.example', g, t.id), format('Client %s', g),"
                " (ARRAY['QUOTED','NEGOTIATING','BOOKED','PAID','TRAVELLED','LOST'])[1 + g % 6]"
                " FROM bench_tenants t, generate_series(1, t.clients) g ORDER BY g, t.id",
            ),
            (
                "quotes",
                "INSERT INTO quotes (tenant_id, client_id, customer_email, total_price, currency)"
                " SELECT tenant_id, id, email, 100 + id % 900, 'EUR' FROM clients",
            ),
            (
                "invoices",
                "INSERT INTO invoices (tenant_id, quote_id, client_id, amount, currency)"
                " SELECT tenant_id, id, client_id, total_price, currency FROM quotes",
            ),
            (
                "activities",
                "INSERT INTO activities (tenant_id, client_id, kind)"
                " SELECT c.tenant_id, c.id, k FROM clients c,"
                " unnest(ARRAY['created', 'called']) k",
            ),
            (
                "notifications",
                "INSERT INTO notifications (tenant_id, message)"
                " SELECT tenant_id, 'note ' || id FROM clients",
            ),
        ]
        for table, statement in statements:
            conn.execute(statement)
            say(f"loaded {table} ({time.monotonic() - started:.1f}s)")
        conn.execute("ANALYZE")
        say(f"loaded {sum(t.rows for t in tenants):,} rows for {len(tenants)} tenants")
    for tenant in tenants:
        directory = CLIENTS_DIR / tenant.tenant_id
        (directory / "templates").mkdir(parents=True, exist_ok=True)
        (directory / "branding.toml").write_text(f'tenant = "{tenant.tenant_id}"\n')
        (directory / "templates" / "welcome.html").write_text("<p>welcome</p>\n")


def tenant_tables(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.columns"
        " WHERE table_schema = 'public' AND column_name = 'tenant_id'"
        " AND table_name <> 'deprovision_jobs' ORDER BY table_name"
    ).fetchall()
    return [str(r[0]) for r in rows]


def checksums(url: str, tenant_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Per table: (rows, sum of a hash of every row) of these tenants."""
    result = {}
    with psycopg.connect(url) as conn:
        for table in [*tenant_tables(conn), "tenants"]:
            key = "id" if table == "tenants" else "tenant_id"
            row = conn.execute(
                sql.SQL(
                    "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)"
                    " FROM {} t WHERE {} = ANY(%s)"
                ).format(sql.Identifier(table), sql.Identifier(key)),
                (list(tenant_ids),),
            ).fetchone()
            assert row is not None
            result[table] = (int(row[0]), int(row[1]))
    return result


def owned_rows(url: str, tenant_id: str) -> Owned:
    """What the tenant owns now, counted table by table."""
    with psycopg.connect(url) as conn:
        total = pipeline = 0
        for table in [*tenant_tables(conn), "tenants"]:
            key = "id" if table == "tenants" else "tenant_id"
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE {} = %s").format(
                    sql.Identifier(table), sql.Identifier(key)
                ),
                (tenant_id,),
            ).fetchone()
            count = int(row[0]) if row else 0
            total += count
            if table in PIPELINE_TABLES:
                pipeline += count
        return Owned(total, pipeline)


def rows_left(url: str, tenant_id: str) -> int:
    return owned_rows(url, tenant_id).rows


def logged_deltas(url: str) -> int:
    with psycopg.connect(url) as conn:
        return deltas_logged(conn)


def check_nothing_logged(url: str, before: int, tenant_id: str) -> None:
    """Deprovisioning deletes log no delta (and nothing else writes meanwhile)."""
    logged = logged_deltas(url) - before
    if logged:
        raise SystemExit(f"{tenant_id}: {logged:,} deltas logged while deprovisioning")


def directory_tree(path: Path) -> list[tuple[str, str]]:
    return sorted(
        (str(p.relative_to(path)), p.read_text() if p.is_file() else "dir") for p in path.rglob("*")
    )


def _rows_deleted(response: provisioning_pb2.DeprovisionResponse) -> int:
    return sum(sum(step.rows.values()) + sum(step.derived_rows.values()) for step in response.steps)


def _partial(error: grpc.aio.AioRpcError) -> provisioning_pb2.DeprovisionResponse | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for packed in status_pb2.Status.FromString(value).details:
                if packed.Is(provisioning_pb2.DeprovisionResponse.DESCRIPTOR):
                    response = provisioning_pb2.DeprovisionResponse()
                    packed.Unpack(response)
                    return response
    return None


async def deprovision_once(
    stub: provisioning_pb2_grpc.ProvisioningServiceStub,
    metadata: tuple[tuple[str, str], ...],
    url: str,
    tenant: BenchTenant,
    owned: Owned,
) -> tuple[float, float]:
    """(when it started, how long it took)."""
    logged_before = logged_deltas(url)
    started = time.monotonic()
    reply = await stub.Deprovision(
        provisioning_pb2.DeprovisionRequest(
            tenant_id=tenant.tenant_id, request_id=str(uuid.uuid4())
        ),
        metadata=metadata,
        timeout=FULL_DEADLINE_S,
    )
    elapsed = time.monotonic() - started
    if reply.state != provisioning_pb2.JOB_STATE_COMPLETED:
        raise SystemExit(f"{tenant.tenant_id}: not completed: {reply}")
    if _rows_deleted(reply) != owned.rows:
        raise SystemExit(f"{tenant.tenant_id}: deleted {_rows_deleted(reply)} of {owned.rows}")
    if rows_left(url, tenant.tenant_id) or (CLIENTS_DIR / tenant.tenant_id).exists():
        raise SystemExit(f"{tenant.tenant_id}: rows or directory left behind")
    check_nothing_logged(url, logged_before, tenant.tenant_id)
    return started, elapsed


async def deprovision_under_deadlines(
    stub: provisioning_pb2_grpc.ProvisioningServiceStub,
    metadata: tuple[tuple[str, str], ...],
    url: str,
    tenant: BenchTenant,
    owned: Owned,
    deadline_s: float,
) -> CutRun:
    run = CutRun(owned.rows, owned.pipeline, deadline_s)
    logged_before = logged_deltas(url)
    request = provisioning_pb2.DeprovisionRequest(
        tenant_id=tenant.tenant_id, request_id=str(uuid.uuid4())
    )
    started = time.monotonic()
    while True:
        run.calls += 1
        if run.calls > 10_000:
            raise SystemExit("the retried deprovision does not finish")
        try:
            reply = await stub.Deprovision(request, metadata=metadata, timeout=deadline_s)
        except grpc.aio.AioRpcError as error:
            partial = _partial(error)
            run.answers[error.code().name + ("" if partial else " (no details)")] += 1
            if error.code() not in {
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.ABORTED,
                grpc.StatusCode.UNAVAILABLE,
            }:
                raise SystemExit(f"unexpected answer: {error.code()} {error.details()}") from None
            if partial is not None:
                run.deleted_per_cut_call.append(_rows_deleted(partial))
            continue
        run.answers["OK"] += 1
        break
    run.seconds = time.monotonic() - started
    if reply.state != provisioning_pb2.JOB_STATE_COMPLETED or _rows_deleted(reply) != owned.rows:
        raise SystemExit(f"{tenant.tenant_id}: not completed correctly: {reply}")
    if rows_left(url, tenant.tenant_id) or (CLIENTS_DIR / tenant.tenant_id).exists():
        raise SystemExit(f"{tenant.tenant_id}: rows or directory left behind")
    check_nothing_logged(url, logged_before, tenant.tenant_id)
    return run


def report(
    full: Sequence[FullRun],
    cut: CutRun,
    intact: bool,
    facts: dict[str, str],
    where: str,
    noise: Sequence[BenchTenant],
    drain: Drain,
) -> None:
    command = shlex.join([os.path.relpath(sys.executable), "-m", "bench", *sys.argv[1:]])
    print()
    print("## Deprovision: one tenant end to end over gRPC")
    print()
    print(f"- command: `{command}`")
    print(
        f"- PostgreSQL {facts['server_version']} ({where}); shared_buffers={facts['shared_buffers']};"
        f" {os.cpu_count()} CPUs shared with other work"
    )
    print(
        f"- each tenant: {ROWS_PER_CLIENT} rows per client (client, quote, invoice, 2 activities,"
        " notification) + its settings row, interleaved on the heap with every other tenant"
        f" and {len(noise)} noise tenants of {noise[0].rows:,} rows each (plus their"
        " pipeline aggregate rows)"
    )
    print(
        "- after loading, the load's deltas were compacted into the pipeline aggregates"
        f" (as the background compactor would have): {drain.describe()}"
    )
    print(
        "- one Deprovision call per tenant (deadline"
        f" {FULL_DEADLINE_S:g}s), SendGrid step skipped (DEV_MODE); rows = everything deleted,"
        " tenant row and pipeline aggregate rows included (counted before); each run verified:"
        " no row left, directory gone, no delta logged"
    )
    print()
    rows = []
    for run in full:
        best = min(run.seconds)
        median = sorted(run.seconds)[len(run.seconds) // 2]
        rows.append(
            [
                run.label,
                f"{run.rows:,}",
                f"{run.business_rows:,}",
                f"{run.pipeline_rows:,}",
                len(run.seconds),
                f"{median:.2f}",
                f"{best:.2f}",
                f"{run.rows / median:,.0f}",
                f"{run.business_rows / median:,.0f}",
            ]
        )
    print(
        markdown_table(
            [
                "size",
                "rows",
                "business rows",
                "derived rows",
                "n",
                "median s",
                "min s",
                "rows/s (median)",
                "business rows/s",
            ],
            rows,
            right=(1, 2, 3, 4, 5, 6, 7, 8),
        )
    )
    print()
    print(
        f"Another tenant ({NEIGHBOUR}, {NEIGHBOUR_CLIENTS:,} clients) goes on meanwhile: its"
        " summary (`SELECT pipeline_summary`) and a single-row notification insert, back to back on a"
        f" connection of its own; its calls in the {NEIGHBOUR_BASELINE_S:g} s before each"
        " deprovisioning (or as long as it took, if shorter) and during it, in ms:"
    )
    print()
    neighbour_rows = []
    for run in full:
        for kind in ("read", "write"):
            before, during = run.before.get(kind, []), run.during.get(kind, [])
            if not before or not during:
                continue
            neighbour_rows.append(
                [
                    run.label,
                    kind,
                    len(before),
                    f"{percentile(before, 50) * 1000:.1f}",
                    f"{percentile(before, 99) * 1000:.1f}",
                    len(during),
                    f"{percentile(during, 50) * 1000:.1f}",
                    f"{percentile(during, 99) * 1000:.1f}",
                ]
            )
    print(
        markdown_table(
            [
                "size",
                "call",
                "n before",
                "p50 before",
                "p99 before",
                "n during",
                "p50 during",
                "p99 during",
            ],
            neighbour_rows,
            right=(2, 3, 4, 5, 6, 7),
        )
    )
    print()
    print(
        f"### The same {cut.rows:,}-row tenant under {cut.deadline_s:g} s deadlines,"
        " one request retried until it completes"
    )
    print()
    answers = ", ".join(f"{name} x{n}" for name, n in sorted(cut.answers.items()))
    per_call = cut.deleted_per_cut_call
    print(
        markdown_table(
            [
                "rows",
                "of which pipeline",
                "deadline s",
                "calls",
                "total s",
                "rows/s",
                "answers",
                "other tenants",
            ],
            [
                [
                    f"{cut.rows:,}",
                    f"{cut.pipeline_rows:,}",
                    f"{cut.deadline_s:g}",
                    cut.calls,
                    f"{cut.seconds:.1f}",
                    f"{cut.rows / cut.seconds:,.0f}",
                    answers,
                    "intact" if intact else "CHANGED",
                ]
            ],
            right=(0, 1, 2, 3, 4, 5),
        )
    )
    if per_call:
        print()
        print(
            f"Rows recorded as deleted after each cut call (cumulative): first {per_call[0]:,},"
            f" then {', '.join(f'{n:,}' for n in per_call[1:6])}"
            + (" ..." if len(per_call) > 6 else "")
        )
    print()
    print(
        f"Other tenants after everything: {'intact' if intact else 'CHANGED'}"
        " (row count and row-hash sum per table, and their directories)"
    )
    print()


async def run(args: argparse.Namespace) -> None:
    labels = [s.strip().lower() for s in args.deprovision_sizes.split(",") if s.strip()]
    unknown = [s for s in labels if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; known: {', '.join(SIZES)}")
    server = bench_server()
    where = f"embedded, {BENCH_DATA_DIR}" if server.embedded else "DATABASE_URL"
    say(f"PostgreSQL: {where}")
    url = create_fresh_database(server, BENCH_DB)
    facts = server_facts(url)

    measured: dict[str, list[BenchTenant]] = {}
    for label in labels:
        reps = args.reps or DEFAULT_REPS[label]
        measured[label] = [
            BenchTenant(f"bench-{label}-{i + 1}", _clients_for(SIZES[label])) for i in range(reps)
        ]
    cut_tenant = BenchTenant("bench-cut", _clients_for(args.cut_rows))
    noise = [BenchTenant(f"bench-noise-{i + 1}", _clients_for(NOISE_ROWS)) for i in range(2)]
    everyone = [*(t for ts in measured.values() for t in ts), cut_tenant, *noise]
    shutil.rmtree(CLIENTS_DIR, ignore_errors=True)
    CLIENTS_DIR.mkdir(parents=True)
    load(url, everyone)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO tenants (id, name) VALUES (%s, 'neighbour')", (NEIGHBOUR,))
        conn.execute(
            "INSERT INTO clients (tenant_id, email) SELECT %s, 'c' || g || '@neighbour.example'"
            " FROM generate_series(1, %s) g",
            (NEIGHBOUR, NEIGHBOUR_CLIENTS),
        )
    # What the background compactor would long have done: the tenants own
    # aggregate rows, not a backlog of deltas.
    drain = drain_backlog(url, label="deprovision: data")
    owned = {t.tenant_id: owned_rows(url, t.tenant_id) for t in everyone if t not in noise}
    noise_ids = [t.tenant_id for t in noise]
    noise_before = checksums(url, noise_ids)
    noise_dirs = {t.tenant_id: directory_tree(CLIENTS_DIR / t.tenant_id) for t in noise}

    token = secrets.token_urlsafe(24)
    tokens_file = BENCH_DATA_DIR / "deprovision-tokens.toml"
    write_tokens_file(tokens_file, token, [SCOPE_TENANTS_DELETE])
    env = {
        "DATABASE_URL": url,
        "AUTH_TOKENS_FILE": str(tokens_file),
        "CLIENTS_DIR": str(CLIENTS_DIR),
        "DEV_MODE": "1",
        "SENDGRID_API_KEY": "",
    }
    log_path = BENCH_DATA_DIR / "provisioning_svc.log"
    metadata = (("authorization", f"Bearer {token}"),)
    full: list[FullRun] = []
    async with (
        service_process(
            "provisioning_svc", listen_var="PROVISIONING_LISTEN", env=env, log_path=log_path
        ) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        say(f"provisioning_svc serving on {address} (log: {log_path})")
        stub = provisioning_pb2_grpc.ProvisioningServiceStub(channel)
        neighbour = Neighbour(url)
        neighbour.start()
        for label, tenants in measured.items():
            first = owned[tenants[0].tenant_id]
            result = FullRun(label, first.rows, first.pipeline)
            for tenant in tenants:
                if owned[tenant.tenant_id] != first:
                    raise SystemExit(
                        f"{tenant.tenant_id} owns {owned[tenant.tenant_id]}, not {first}"
                    )
                # The same span of the neighbour's calls before, for comparison.
                await asyncio.sleep(NEIGHBOUR_BASELINE_S)
                started, elapsed = await deprovision_once(stub, metadata, url, tenant, first)
                result.seconds.append(elapsed)
                for kind, seconds in neighbour.between(
                    started - min(elapsed, NEIGHBOUR_BASELINE_S), started
                ).items():
                    result.before.setdefault(kind, []).extend(seconds)
                for kind, seconds in neighbour.between(started, started + elapsed).items():
                    result.during.setdefault(kind, []).extend(seconds)
                say(f"{label}: {tenant.tenant_id} {first.rows:,} rows in {elapsed:.2f}s")
            full.append(result)
        say(
            f"{cut_tenant.tenant_id}: {owned[cut_tenant.tenant_id].rows:,} rows under"
            f" {args.cut_deadline:g}s deadlines"
        )
        await neighbour.stop()
        cut = await deprovision_under_deadlines(
            stub, metadata, url, cut_tenant, owned[cut_tenant.tenant_id], args.cut_deadline
        )
        say(f"{cut_tenant.tenant_id}: done in {cut.calls} calls, {cut.seconds:.1f}s")

    intact = checksums(url, noise_ids) == noise_before and all(
        directory_tree(CLIENTS_DIR / t) == tree for t, tree in noise_dirs.items()
    )
    report(full, cut, intact, facts, where, noise, drain)
    if not intact:
        raise SystemExit("other tenants changed")
