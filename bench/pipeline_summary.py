"""PipelineSummary: end to end over gRPC vs the bare SQL call vs the naive way.

For one tenant of 1k, 100k and 1M clients (two quotes per client; a 200k-client
noise tenant and the other sizes share the tables), measured in one run:

- `sql` (the floor): `SELECT pipeline_summary(tenant)` with psycopg; it reads
  the trigger-maintained aggregates (docs/pipeline.md);
- `grpc`: `crm.v1.CrmService/PipelineSummary` against a real `python -m crm_svc`
  subprocess (auth, deadline, pool, transaction, proto conversion included);
- `grpc_rest`: the same against a second `crm_svc` on the Supabase REST
  transport, talking to the PostgREST-protocol stand-in (a thread of this
  process; PostgREST itself cannot be installed here);
- `recompute`: `SELECT pipeline_summary_recompute(tenant)`, the full scan the
  aggregates replace, which a summary falls back to when it is cheaper;
- `naive`: what the service replaces: fetch the tenant's clients and quotes
  with psycopg and aggregate in Python (the same semantics, Decimal).

Once per size all answers are compared and must agree exactly. The methods
are a list (`Contenders.methods`): a new one is one entry there.

Writes log deltas (docs/pipeline.md) that a background compactor folds into
the aggregates, and `pipeline_summary` adds the tenant's pending deltas to
them. Loading the data in bulk statements marks the tenants for a rebuild
instead, so before anything is timed the backlog is drained (pipeline_compact until it says no more; the time and
deltas/s are reported) and the log and the aggregates vacuumed. To show what
a lagging compactor costs a read, the 1k tenant is also measured with
`--backlogs` deltas pending: committed updates (client stage moves and quote
price changes) that no compactor may fold meanwhile (the bench holds the
tenant's compaction lock, which compactors try and skip); afterwards the rows
are restored and the deltas compacted. How a summary with pending deltas is
planned depends on what the log's statistics say, so each backlog is
measured twice: with the statistics of an empty log (ANALYZE before the
backlog is written: what autovacuum mostly sees of a log the compactor keeps
empty, until it analyzes again) and after ANALYZE with the backlog in place.
Only the summary's own methods are timed there (the full scan and the naive
way do not read the log); every method still answers the warm-up, compared.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import shlex
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import grpc
import psycopg

from bench import bulk_import
from bench.common import (
    BENCH_DATA_DIR,
    STANDIN_NOTE,
    BenchServer,
    Drain,
    Stats,
    bench_server,
    create_fresh_database,
    database_exists,
    drain_backlog,
    format_ms,
    markdown_table,
    postgrest_standin,
    rest_service_env,
    say,
    server_facts,
    service_process,
    with_database,
    write_tokens_file,
)
from crm_svc.pipeline import SUMMARY_CAP_S
from shared.auth import SCOPE_PIPELINE_READ
from shared.database.migrations import apply_migrations
from shared.errors import FailedPrecondition
from shared.money import from_money
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc

BENCH_DB = "crm_bench"
# Stored as every bench tenant's name. Change it whenever the generator
# changes, so that old data is regenerated instead of silently reused.
DATASET_MARKER = "pipeline-summary bench data v1"
QUOTES_PER_CLIENT = 2
# Clients inserted per statement (all tenants together), i.e. per progress line.
ROUND_CLIENTS = 100_000
RPC_TIMEOUT_S = 60.0

STAGES = ("QUOTED", "NEGOTIATING", "BOOKED", "PAID", "TRAVELLED", "LOST")
OPEN_STAGES = frozenset(STAGES[:4])


@dataclass(frozen=True)
class TenantSpec:
    tenant_id: str
    clients: int
    salt: int  # seeds this tenant's pseudo-random draws
    label: str | None = None  # the size it is measured as; None for the noise tenant
    reps: int = 0  # default timed repetitions per method


MEASURED = (
    TenantSpec("bench-1k", 1_000, salt=1, label="1k", reps=50),
    TenantSpec("bench-100k", 100_000, salt=2, label="100k", reps=15),
    TenantSpec("bench-1m", 1_000_000, salt=3, label="1m", reps=5),
)
NOISE = TenantSpec("bench-noise", 200_000, salt=4)
ALL_TENANTS = (*MEASURED, NOISE)

# The method every other one is compared with.
FLOOR_METHOD = "sql"
# Issue 6 targets: the summary's median at the largest size within this factor
# of the smallest's, and at least this many times faster than the naive way.
SIZE_TARGET = 2.0
NAIVE_TARGET = 100.0

# The tenant measured again with deltas pending, and how they are made: rows
# per updating statement (a statement logs one delta per key it changes).
BACKLOG_TENANT = "1k"
BACKLOG_CHUNK = 50
# Timed rounds per backlog row (--reps overrides): few, so that autovacuum
# rarely vacuums or analyzes the log in the middle of the "stale" rows (a row
# where it did says so).
BACKLOG_REPS = 15
# The methods a backlog row times: those that read the log.
BACKLOG_METHODS = ("sql", "grpc", "grpc_rest")
# The log's statistics while a backlog row is measured: taken from the empty
# log before the backlog is written, or from the log with the backlog in it.
LOG_STATS = {
    "stale": "statistics of the empty log",
    "analyzed": "ANALYZE with the backlog",
}
# The rows the backlog changes, kept until they are restored (also after a
# crash: prepare_database restores them before anything else).
BACKLOG_UNDO = "bench_backlog_undo"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--sizes",
        default=",".join(t.label for t in MEASURED if t.label),
        help="comma-separated tenant sizes to measure (default: %(default)s)",
    )
    group.add_argument(
        "--backlogs",
        default="1000,10000",
        help=f"pending (uncompacted) deltas to measure the {BACKLOG_TENANT} tenant with as well,"
        " comma-separated; empty: none (default: %(default)s)",
    )
    group.add_argument(
        "--bulk-scenarios",
        default=",".join(bulk_import.SCENARIOS),
        help="bulk-import scenarios to run, comma-separated; empty: none (default: %(default)s)",
    )
    group.add_argument(
        "--bulk-clients",
        type=int,
        default=1_000_000,
        metavar="N",
        help="clients the bulk import loads (and twice as many quotes) (default: %(default)s)",
    )


# --- data --------------------------------------------------------------------------


def _uniform(value_sql: str, draw: int) -> str:
    """SQL for a pseudo-random number in [0, 1) that depends only on the row's
    `value_sql`, the tenant's salt and the `draw` number: every fresh load
    produces the same rows, so runs stay comparable."""
    return (
        f"((hashint8extended(({value_sql})::bigint, salt * 64 + {draw})"
        " & 2147483647)::float8 / 2147483648)"
    )


def _vary_case(text_sql: str, draw_sql: str) -> str:
    return (
        f"CASE WHEN {draw_sql} < 0.15 THEN upper({text_sql})"
        f" WHEN {draw_sql} < 0.30 THEN initcap({text_sql}) ELSE {text_sql} END"
    )


def _vary_padding(text_sql: str, draw_sql: str) -> str:
    # Padding the key strips (spaces, a tab): the row still matches its quotes.
    return (
        f"CASE WHEN {draw_sql} < 0.10 THEN '  ' || {text_sql} || ' '"
        f" WHEN {draw_sql} < 0.11 THEN {text_sql} || E'\\t' ELSE {text_sql} END"
    )


# One statement per round: a slice of every tenant's clients, shuffled so that
# tenants' rows interleave on the heap pages the way years of concurrent use
# leave them, and two quotes per new client. 5% of quotes are leads with no
# client; the rest reuse the client's address, re-cased and re-padded.
LOAD_ROUND_SQL = f"""
WITH slice AS (
    SELECT s.tenant_id, s.salt, n::bigint AS n
    FROM unnest(%(tenant_ids)s::text[], %(salts)s::int[], %(firsts)s::int[], %(lasts)s::int[])
             AS s(tenant_id, salt, first_n, last_n),
         generate_series(s.first_n, s.last_n) AS n
),
drawn AS (
    SELECT tenant_id, n,
           {_uniform("n", 1)} AS r_kind,
           -- 3 in 100 share the previous client's address (couples, families).
           CASE WHEN n > 1 AND {_uniform("n", 2)} < 0.03 THEN n - 1 ELSE n END AS owner_n,
           {_uniform("n", 3)} AS r_case,
           {_uniform("n", 4)} AS r_pad,
           {_uniform("n", 5)} AS r_stage,
           {_uniform("n", 6)} AS r_order
    FROM slice
),
addressed AS (
    SELECT *, 'client' || owner_n || '@'
              || (ARRAY['gmail.com', 'example.com', 'travel.io', 'mail.de', 'yahoo.fr'])[1 + owner_n %% 5]
              AS address
    FROM drawn
),
new_clients AS (
    INSERT INTO clients (tenant_id, email, name, pipeline_stage)
    SELECT tenant_id,
           CASE WHEN r_kind < 0.02 THEN NULL
                WHEN r_kind < 0.03 THEN ''
                WHEN r_kind < 0.035 THEN '   '
                ELSE {_vary_padding(_vary_case("address", "r_case"), "r_pad")} END,
           'Client ' || n,
           CASE WHEN r_stage < 0.30 THEN 'QUOTED'
                WHEN r_stage < 0.50 THEN 'NEGOTIATING'
                WHEN r_stage < 0.65 THEN 'BOOKED'
                WHEN r_stage < 0.75 THEN 'PAID'
                WHEN r_stage < 0.90 THEN 'TRAVELLED'
                ELSE 'LOST' END
    FROM addressed
    ORDER BY r_order
    RETURNING tenant_id, id, email
),
quote_draws AS (
    SELECT c.tenant_id, c.id AS client_id, c.email, k,
           {_uniform("c.id * 2 + k", 11)} AS r_lead,
           {_uniform("c.id * 2 + k", 12)} AS r_case,
           {_uniform("c.id * 2 + k", 13)} AS r_pad,
           {_uniform("c.id * 2 + k", 14)} AS r_price,
           {_uniform("c.id * 2 + k", 15)} AS r_currency
    FROM new_clients c
    JOIN (SELECT id, salt FROM unnest(%(tenant_ids)s::text[], %(salts)s::int[]) AS t(id, salt)) t
      ON t.id = c.tenant_id,
         generate_series(1, {QUOTES_PER_CLIENT}) AS k
)
INSERT INTO quotes (tenant_id, client_id, customer_email, total_price, currency)
SELECT tenant_id,
       CASE WHEN r_lead < 0.05 THEN NULL ELSE client_id END,
       CASE WHEN r_lead < 0.05 THEN 'lead' || client_id || '.' || k || '@example.net'
            ELSE {_vary_padding(_vary_case("lower(btrim(email))", "r_case"), "r_pad")} END,
       CASE WHEN r_price < 0.05 THEN NULL
            ELSE round((20 + r_price * 9980)::numeric, 2) END,
       CASE WHEN r_currency < 0.45 THEN 'EUR'
            WHEN r_currency < 0.70 THEN 'USD'
            WHEN r_currency < 0.85 THEN 'GBP'
            WHEN r_currency < 0.95 THEN 'CHF'
            ELSE 'JPY' END
FROM quote_draws
"""


def dataset_is_complete(url: str) -> bool:
    """True when the database holds exactly the expected bench tenants and rows."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """
            SELECT t.id, t.name,
                   (SELECT count(*) FROM clients c WHERE c.tenant_id = t.id),
                   (SELECT count(*) FROM quotes q WHERE q.tenant_id = t.id)
            FROM tenants t
            """
        ).fetchall()
    expected = {
        (t.tenant_id, DATASET_MARKER, t.clients, t.clients * QUOTES_PER_CLIENT) for t in ALL_TENANTS
    }
    return set(rows) == expected


def load_dataset(url: str) -> None:
    total_clients = sum(t.clients for t in ALL_TENANTS)
    rounds = math.ceil(total_clients / ROUND_CLIENTS)
    started = time.monotonic()
    say(
        f"data: generating {total_clients:,} clients and "
        f"{total_clients * QUOTES_PER_CLIENT:,} quotes in {rounds} rounds "
        f"({', '.join(f'{t.tenant_id}={t.clients:,}' for t in ALL_TENANTS)})"
    )
    with psycopg.connect(url, autocommit=True) as conn:
        # Throwaway data: no need to wait for each round's WAL flush.
        conn.execute("SET synchronous_commit = off")
        with conn.transaction():
            for t in ALL_TENANTS:
                conn.execute(
                    "INSERT INTO tenants (id, name) VALUES (%s, %s)", (t.tenant_id, DATASET_MARKER)
                )
                conn.execute("INSERT INTO tenant_settings (tenant_id) VALUES (%s)", (t.tenant_id,))
        done = 0
        for round_index in range(rounds):
            slices = []
            for t in ALL_TENANTS:
                per_round = math.ceil(t.clients / rounds)
                first = round_index * per_round + 1
                last = min((round_index + 1) * per_round, t.clients)
                if first <= last:
                    slices.append((t.tenant_id, t.salt, first, last))
            conn.execute(
                LOAD_ROUND_SQL,
                {
                    "tenant_ids": [s[0] for s in slices],
                    "salts": [s[1] for s in slices],
                    "firsts": [s[2] for s in slices],
                    "lasts": [s[3] for s in slices],
                },
            )
            done += sum(last - first + 1 for _, _, first, last in slices)
            elapsed = time.monotonic() - started
            say(
                f"data: round {round_index + 1}/{rounds}: {done:,}/{total_clients:,} clients, "
                f"{done * QUOTES_PER_CLIENT:,} quotes, {elapsed:.1f}s "
                f"({done / elapsed:,.0f} clients/s)"
            )
        say("data: VACUUM ANALYZE (fresh statistics, visibility map, hint bits set)")
        conn.execute("VACUUM (ANALYZE) clients, quotes, tenants")
    say(f"data: ready in {time.monotonic() - started:.1f}s")


def prepare_database(server: BenchServer, fresh: bool) -> str:
    """The bench database with the full data set: reused when complete, else rebuilt."""
    url = with_database(server.url, BENCH_DB)
    if not fresh and database_exists(server, BENCH_DB):
        # Later migrations (new functions) apply on top of existing data; a
        # migration rewritten since the data set was made means a rebuild.
        try:
            apply_migrations(url)
        except FailedPrecondition as exc:
            say(f"data: {exc.message}")
            say(f"data: rebuilding database {BENCH_DB}")
            url = create_fresh_database(server, BENCH_DB)
            load_dataset(url)
            return url
        restore_backlog_rows(url)
        if dataset_is_complete(url):
            say(f"data: reusing the complete data set in database {BENCH_DB} (--fresh rebuilds it)")
            return url
        say(f"data: database {BENCH_DB} is incomplete or outdated: rebuilding it")
    url = create_fresh_database(server, BENCH_DB)
    load_dataset(url)
    return url


# --- a backlog of pending deltas ---------------------------------------------------

_RESTORE_BACKLOG_ROWS = (
    f"UPDATE clients c SET pipeline_stage = u.stage FROM {BACKLOG_UNDO} u"
    " WHERE u.tbl = 'clients' AND c.tenant_id = u.tenant AND c.id = u.row_id"
    " AND c.pipeline_stage IS DISTINCT FROM u.stage",
    f"UPDATE quotes q SET total_price = u.price FROM {BACKLOG_UNDO} u"
    " WHERE u.tbl = 'quotes' AND q.tenant_id = u.tenant AND q.id = u.row_id"
    " AND q.total_price IS DISTINCT FROM u.price",
    f"DROP TABLE {BACKLOG_UNDO}",
)
_TENANT_LOCK = "pipeline_lock_space(), pipeline_tenant_lock_key(%s)"


def restore_backlog_rows(url: str) -> None:
    """Put back the rows an interrupted backlog measurement changed, if any."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (BACKLOG_UNDO,)).fetchone()
        if row is None or row[0] is None:
            return
        for statement in _RESTORE_BACKLOG_ROWS:
            conn.execute(statement)
        conn.commit()
    say("data: restored the rows an interrupted backlog measurement had changed")


async def _pending(conn: psycopg.AsyncConnection[Any], tenant_id: str) -> int:
    cursor = await conn.execute(
        "SELECT count(*) FROM pipeline_deltas WHERE tenant_id = %s", (tenant_id,)
    )
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def _ids(conn: psycopg.AsyncConnection[Any], query: str, tenant_id: str) -> list[int]:
    cursor = await conn.execute(query, (tenant_id,))
    return [int(r[0]) for r in await cursor.fetchall()]


async def log_autovacuum_count(conn: psycopg.AsyncConnection[Any]) -> int:
    """How often autovacuum has vacuumed or analyzed the log: either changes
    what the planner believes of it (a VACUUM updates its row count too)."""
    cursor = await conn.execute(
        "SELECT autovacuum_count + autoanalyze_count FROM pg_stat_user_tables"
        " WHERE relname = 'pipeline_deltas'"
    )
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


@asynccontextmanager
async def pending_deltas(
    url: str, tenant_id: str, target: int, log_stats: str
) -> AsyncIterator[int]:
    """Commit updates to `tenant_id` until at least `target` of its deltas are
    pending, holding the tenant's compaction lock (shared) so that no
    compactor folds them (pipeline_compact skips a tenant whose lock it cannot
    take); yield how many are pending. `log_stats`: ANALYZE pipeline_deltas
    before writing them ("stale") or after ("analyzed"). Afterwards put the
    rows back, release the lock and compact everything.

    The updates move 50 clients a stage on, then add 0.01 to 50 prices, and
    so on through the tenant: deltas of both kinds, over all its addresses,
    that do not cancel out (about 2 per client moved, 1 per price)."""
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, application_name="bench_backlog"
    ) as conn:
        await conn.execute(f"SELECT pg_advisory_lock_shared({_TENANT_LOCK})", (tenant_id,))
        try:
            async with conn.transaction():
                await conn.execute(
                    f"CREATE TABLE {BACKLOG_UNDO} (tenant text NOT NULL, tbl text NOT NULL,"
                    " row_id bigint NOT NULL, stage text, price numeric(14, 2))"
                )
                await conn.execute(
                    f"INSERT INTO {BACKLOG_UNDO} SELECT tenant_id, 'clients', id, pipeline_stage,"
                    " NULL FROM clients WHERE tenant_id = %s",
                    (tenant_id,),
                )
                await conn.execute(
                    f"INSERT INTO {BACKLOG_UNDO} SELECT tenant_id, 'quotes', id, NULL, total_price"
                    " FROM quotes WHERE tenant_id = %s AND total_price IS NOT NULL",
                    (tenant_id,),
                )
            clients = await _ids(
                conn, "SELECT id FROM clients WHERE tenant_id = %s ORDER BY id", tenant_id
            )
            quotes = await _ids(
                conn,
                "SELECT id FROM quotes WHERE tenant_id = %s AND total_price IS NOT NULL ORDER BY id",
                tenant_id,
            )
            if log_stats == "stale":
                await conn.execute("ANALYZE pipeline_deltas")
            pending = await _pending(conn, tenant_id)
            step = 0
            while pending < target:
                first = step * BACKLOG_CHUNK
                await conn.execute(
                    "UPDATE clients SET pipeline_stage ="
                    " (%s::text[])[1 + array_position(%s::text[], pipeline_stage) %% 6]"
                    " WHERE tenant_id = %s AND id = ANY (%s)",
                    (
                        list(STAGES),
                        list(STAGES),
                        tenant_id,
                        [clients[(first + k) % len(clients)] for k in range(BACKLOG_CHUNK)],
                    ),
                )
                await conn.execute(
                    "UPDATE quotes SET total_price = total_price + 0.01"
                    " WHERE tenant_id = %s AND id = ANY (%s)",
                    (
                        tenant_id,
                        [quotes[(first + k) % len(quotes)] for k in range(BACKLOG_CHUNK)],
                    ),
                )
                pending = await _pending(conn, tenant_id)
                step += 1
            if log_stats == "analyzed":
                await conn.execute("ANALYZE pipeline_deltas")
            yield pending
        finally:
            async with conn.transaction():
                for statement in _RESTORE_BACKLOG_ROWS:
                    await conn.execute(statement)
            await conn.execute(f"SELECT pg_advisory_unlock_shared({_TENANT_LOCK})", (tenant_id,))
    await asyncio.to_thread(drain_backlog, url, vacuum=False, label=f"backlog {target:,}")


# --- the three ways to get a summary, in one comparable shape --------------------

Amounts = tuple[tuple[str, Decimal], ...]  # (currency, amount), sorted by currency


@dataclass(frozen=True)
class Summary:
    stages: tuple[tuple[str, int, Amounts, bool], ...]  # (stage, clients, value, open)
    total_clients: int
    open_value: Amounts


def summary_from_document(document: dict[str, Any]) -> Summary:
    def amounts(items: list[dict[str, str]]) -> Amounts:
        return tuple((i["currency"], Decimal(i["amount"])) for i in items)

    return Summary(
        stages=tuple(
            (s["stage"], int(s["client_count"]), amounts(s["value"]), bool(s["open"]))
            for s in document["stages"]
        ),
        total_clients=int(document["total_clients"]),
        open_value=amounts(document["open_value"]),
    )


def summary_from_response(response: crm_pb2.PipelineSummaryResponse) -> Summary:
    def amounts(items: Iterable[Any]) -> Amounts:
        return tuple((m.currency_code, from_money(m)) for m in items)

    return Summary(
        stages=tuple(
            (
                crm_pb2.PipelineStage.Name(s.stage).removeprefix("PIPELINE_STAGE_"),
                s.client_count,
                amounts(s.value),
                s.open,
            )
            for s in response.stages
        ),
        total_clients=response.total_clients,
        open_value=amounts(response.open_value),
    )


def _normalise(email: str | None) -> str | None:
    """The email key (pipeline_email_key): str.strip().lower(); blank is None."""
    return (email or "").strip().lower() or None


def aggregate_in_python(
    clients: Iterable[tuple[str, str | None]],
    quotes: Iterable[tuple[str | None, Decimal | None, str]],
) -> Summary:
    """The summary over fetched rows: the work the SQL function does in the database.

    Written the way a careful engineer would (quotes summed per address once,
    then one dict lookup per client), so the comparison is with a fair naive
    implementation, not a quadratic strawman.
    """
    zero = Decimal(0)
    quote_totals: dict[str, dict[str, Decimal]] = {}
    for email, price, currency in quotes:
        key = _normalise(email)
        if key is None or price is None:
            continue
        per_currency = quote_totals.setdefault(key, {})
        per_currency[currency] = per_currency.get(currency, zero) + price

    counts = dict.fromkeys(STAGES, 0)
    values: dict[str, dict[str, Decimal]] = {stage: {} for stage in STAGES}
    for stage, email in clients:
        counts[stage] += 1
        key = _normalise(email)
        totals = quote_totals.get(key) if key is not None else None
        if totals:
            stage_values = values[stage]
            for currency, amount in totals.items():
                stage_values[currency] = stage_values.get(currency, zero) + amount

    open_value: dict[str, Decimal] = {}
    for stage in OPEN_STAGES:
        for currency, amount in values[stage].items():
            open_value[currency] = open_value.get(currency, zero) + amount
    return Summary(
        stages=tuple(
            (stage, counts[stage], tuple(sorted(values[stage].items())), stage in OPEN_STAGES)
            for stage in STAGES
        ),
        total_clients=sum(counts.values()),
        open_value=tuple(sorted(open_value.items())),
    )


async def naive_summary(conn: psycopg.AsyncConnection[Any], tenant_id: str) -> Summary:
    """Fetch the rows and aggregate in Python, in one snapshot like the SQL function."""
    async with conn.transaction():
        cursor = await conn.execute("SELECT status FROM tenants WHERE id = %s", (tenant_id,))
        tenant = await cursor.fetchone()
        if tenant is None or tenant[0] != "active":
            raise RuntimeError(f"tenant {tenant_id} missing or not active")
        cursor = await conn.execute(
            "SELECT pipeline_stage, email FROM clients WHERE tenant_id = %s", (tenant_id,)
        )
        clients = await cursor.fetchall()
        cursor = await conn.execute(
            "SELECT customer_email, total_price, currency FROM quotes WHERE tenant_id = %s",
            (tenant_id,),
        )
        quotes = await cursor.fetchall()
    return aggregate_in_python(clients, quotes)


# --- measuring -----------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One way to get a summary. `call` is what is timed; `summary` turns its
    answer into the comparable shape, outside the timing."""

    name: str
    label: str
    call: Callable[[str], Awaitable[Any]]
    summary: Callable[[Any], Summary]


def _same(summary: Summary) -> Summary:
    return summary


@dataclass
class Contenders:
    """The ways to get a summary, over connections opened once per run."""

    sql_conn: psycopg.AsyncConnection[Any]
    naive_conn: psycopg.AsyncConnection[Any]
    stub: crm_pb2_grpc.CrmServiceStub  # crm_svc on the direct transport
    rest_stub: crm_pb2_grpc.CrmServiceStub  # crm_svc on the REST transport
    metadata: tuple[tuple[str, str], ...]

    def methods(self) -> list[Method]:
        """Every method, in table order; to add one, add it here."""
        return [
            Method(FLOOR_METHOD, "SQL `pipeline_summary` (floor)", self.sql, summary_from_document),
            Method("grpc", "gRPC PipelineSummary, end to end", self.grpc, summary_from_response),
            Method(
                "grpc_rest",
                "gRPC PipelineSummary, REST transport (stand-in)",
                self.grpc_rest,
                summary_from_response,
            ),
            Method(
                "recompute",
                "SQL `pipeline_summary_recompute` (full scan)",
                self.recompute,
                summary_from_document,
            ),
            Method("naive", "naive: fetch rows, sum in Python", self.naive, _same),
        ]

    async def sql(self, tenant_id: str) -> dict[str, Any]:
        cursor = await self.sql_conn.execute("SELECT pipeline_summary(%s)", (tenant_id,))
        row = await cursor.fetchone()
        assert row is not None
        document: dict[str, Any] = row[0]
        return document

    async def _rpc(
        self, stub: crm_pb2_grpc.CrmServiceStub, tenant_id: str
    ) -> crm_pb2.PipelineSummaryResponse:
        response: crm_pb2.PipelineSummaryResponse = await stub.PipelineSummary(
            crm_pb2.PipelineSummaryRequest(tenant_id=tenant_id),
            metadata=self.metadata,
            timeout=RPC_TIMEOUT_S,
        )
        return response

    async def grpc(self, tenant_id: str) -> crm_pb2.PipelineSummaryResponse:
        return await self._rpc(self.stub, tenant_id)

    async def grpc_rest(self, tenant_id: str) -> crm_pb2.PipelineSummaryResponse:
        return await self._rpc(self.rest_stub, tenant_id)

    async def recompute(self, tenant_id: str) -> dict[str, Any]:
        cursor = await self.sql_conn.execute("SELECT pipeline_summary_recompute(%s)", (tenant_id,))
        row = await cursor.fetchone()
        assert row is not None
        document: dict[str, Any] = row[0]
        return document

    async def naive(self, tenant_id: str) -> Summary:
        return await naive_summary(self.naive_conn, tenant_id)


@dataclass
class Measurement:
    tenant: TenantSpec
    backlog: int = 0  # the tenant's pending deltas while measured
    log_stats: str = ""  # a LOG_STATS key for a backlog row
    autovacuumed: bool = False  # autovacuum vacuumed or analyzed the log meanwhile
    # Keyed by method name.
    samples: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    # gRPC status names of failed calls: a failure is a result too, not a crash.
    failures: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    @property
    def name(self) -> str:
        label = self.tenant.label or self.tenant.tenant_id
        if not self.backlog:
            return label
        return f"{label} + {self.backlog:,} pending ({self.log_stats} log statistics)"

    @property
    def log_stats_label(self) -> str:
        if not self.backlog:
            return "-"
        return LOG_STATS[self.log_stats] + (
            " (autovacuum ran on the log mid-run)" if self.autovacuumed else ""
        )


def _rpc_failure(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


async def warm_up_and_verify(methods: Sequence[Method], measurement: Measurement) -> None:
    """One call of each method (the warm-up); the answers must agree exactly."""
    tenant = measurement.tenant
    started = time.monotonic()
    answers: dict[str, Summary] = {}
    for method in methods:
        try:
            answers[method.name] = method.summary(await method.call(tenant.tenant_id))
        except grpc.aio.AioRpcError as exc:
            measurement.failures[method.name].append(exc.code().name)
            say(f"{measurement.name}: {method.name} warm-up call FAILED: {_rpc_failure(exc)}")
    if len(set(answers.values())) != 1:
        raise RuntimeError(
            f"summaries of {tenant.tenant_id} disagree:\n"
            + "\n".join(f"  {name}: {answer}" for name, answer in answers.items())
        )
    from_floor = answers[FLOOR_METHOD]
    if from_floor.total_clients != tenant.clients:
        raise RuntimeError(
            f"{tenant.tenant_id}: {from_floor.total_clients} clients, expected {tenant.clients}"
        )
    currencies = sorted({c for _, _, value, _ in from_floor.stages for c, _ in value})
    say(
        f"{measurement.name}: warm-up done, {' = '.join(answers)} exactly "
        f"({from_floor.total_clients:,} clients, currencies {'/'.join(currencies)}) "
        f"in {time.monotonic() - started:.1f}s"
    )


async def measure(methods: Sequence[Method], measurement: Measurement, reps: int) -> None:
    """`reps` rounds; each round calls every method once, starting with a different
    one each time, so that drift and neighbours' load hit all methods alike."""
    tenant_id = measurement.tenant.tenant_id
    started = last_report = time.monotonic()
    for round_index in range(reps):
        shift = round_index % len(methods)
        for method in [*methods[shift:], *methods[:shift]]:
            t0 = time.perf_counter()
            try:
                await method.call(tenant_id)
            except grpc.aio.AioRpcError as exc:
                measurement.failures[method.name].append(exc.code().name)
                say(f"{measurement.name}: {method.name} call FAILED: {_rpc_failure(exc)}")
                continue
            measurement.samples[method.name].append(time.perf_counter() - t0)
        now = time.monotonic()
        if now - last_report > 5 or round_index + 1 == reps:
            last_report = now
            say(f"{measurement.name}: round {round_index + 1}/{reps} ({now - started:.1f}s)")


def _selected(sizes: str) -> list[TenantSpec]:
    wanted = [s.strip().lower() for s in sizes.split(",") if s.strip()]
    known = {t.label: t for t in MEASURED}
    unknown = [s for s in wanted if s not in known]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; known: {', '.join(map(str, known))}")
    return [known[s] for s in wanted]


def _backlogs(spec: str) -> list[int]:
    try:
        backlogs = [int(b.strip().replace("_", "")) for b in spec.split(",") if b.strip()]
    except ValueError:
        raise SystemExit(f"--backlogs: not a list of numbers: {spec!r}") from None
    if any(b < 1 for b in backlogs):
        raise SystemExit("--backlogs: each backlog must be at least 1")
    return backlogs


def report(
    methods: Sequence[Method],
    measurements: Sequence[Measurement],
    facts: dict[str, str],
    where: str,
    drain: Drain,
) -> None:
    rows = []
    failures = []
    for m in measurements:
        floor = Stats.of(m.samples[FLOOR_METHOD]).median_s
        for method in methods:
            name = method.name
            if m.failures[name]:
                failed = ", ".join(f"{code} x{n}" for code, n in Counter(m.failures[name]).items())
                failures.append(f"{m.name}, {method.label}: {failed}")
            if m.backlog and name not in BACKLOG_METHODS:
                continue
            if not m.samples[name]:
                rows.append(
                    [
                        f"{m.tenant.clients:,}",
                        f"{m.backlog:,}",
                        m.log_stats_label,
                        method.label,
                        0,
                        "-",
                        "-",
                        "-",
                    ]
                )
                continue
            stats = Stats.of(m.samples[name])
            rows.append(
                [
                    f"{m.tenant.clients:,}",
                    f"{m.backlog:,}",
                    m.log_stats_label,
                    method.label,
                    stats.n,
                    format_ms(stats.median_s),
                    format_ms(stats.p95_s),
                    f"{stats.median_s / floor:.2f}x",
                ]
            )
    command = shlex.join([os.path.relpath(sys.executable), "-m", "bench", *sys.argv[1:]])
    print()
    print(
        "## PipelineSummary: one tenant, end to end vs the SQL floor vs the full scan vs naive Python"
    )
    print()
    print(f"- command: `{command}`")
    print(
        f"- PostgreSQL {facts['server_version']} ({where}); shared_buffers={facts['shared_buffers']},"
        f" work_mem={facts['work_mem']},"
        f" max_parallel_workers_per_gather={facts['max_parallel_workers_per_gather']};"
        f" {os.cpu_count()} CPUs shared with other work"
    )
    print(
        f"- data: {QUOTES_PER_CLIENT} quotes per client; each tenant's rows are interleaved on the"
        f" heap with the other sizes and a {NOISE.clients:,}-client noise tenant"
        f" ({sum(t.clients for t in ALL_TENANTS):,} clients in all)"
    )
    print(
        "- per size: one warm-up call of each method (answers compared, equal), then n rounds"
        " calling each once in rotating order; p95 interpolates between ranks (n=5: near the max)"
    )
    print(
        f"- the load's deltas were compacted before timing: {drain.describe()};"
        " pending deltas = the tenant's rows in pipeline_deltas while it was measured"
    )
    if any(m.backlog for m in measurements):
        print(
            "- rows with pending deltas: committed updates of that tenant (alternately"
            f" {BACKLOG_CHUNK} clients moved a stage on and {BACKLOG_CHUNK} prices + 0.01 per"
            " statement, about 2/3 client deltas) left uncompacted: the bench holds the tenant's"
            " compaction lock, which pipeline_compact skips; the rows are restored and the deltas"
            " compacted afterwards. Log statistics: ANALYZE pipeline_deltas while it was empty,"
            " before the backlog was written (what the planner mostly knows of a log the compactor"
            " keeps empty, until autovacuum analyzes it again), or ANALYZE with the backlog in it."
            " Only the methods that read the log are timed there; all five answered the warm-up"
            " call, equal"
        )
    print(
        f"- crm_svc caps one summary at {SUMMARY_CAP_S:g}s whatever the caller's deadline"
        f" (bench deadline {RPC_TIMEOUT_S:g}s)"
    )
    print(f"- {STANDIN_NOTE}")
    print()
    print(
        markdown_table(
            [
                "clients",
                "pending deltas",
                "log statistics",
                "method",
                "n",
                "median ms",
                "p95 ms",
                "median / floor",
            ],
            rows,
            right=(0, 1, 4, 5, 6, 7),
        )
    )
    if failures:
        print()
        print("Failed calls (not in the timings): " + "; ".join(failures))
    print()
    print_targets(methods, measurements)


def print_targets(methods: Sequence[Method], measurements: Sequence[Measurement]) -> None:
    """Issue 6's targets, from the medians above (needs the smallest and the
    largest size measured in this run)."""
    labels = {method.name: method.label for method in methods}
    by_size = sorted(
        (m for m in measurements if not m.backlog and all(m.samples[name] for name in labels)),
        key=lambda m: m.tenant.clients,
    )

    def median(m: Measurement, name: str) -> float:
        return Stats.of(m.samples[name]).median_s

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lagging = [
        (drained, m)
        for drained in by_size
        for m in measurements
        if m.backlog and m.tenant == drained.tenant and m.samples["sql"] and m.samples["grpc"]
    ]
    if lagging:
        print("A lagging compactor (medians, the same tenant with its log empty = 1x):")
        print()
        for drained, m in lagging:
            print(
                f"- {m.tenant.clients:,} clients, {m.backlog:,} deltas pending,"
                f" {m.log_stats_label}:"
                + ", ".join(
                    f" {labels[name]} {format_ms(median(m, name))} ms"
                    f" = {median(m, name) / median(drained, name):.2f}x"
                    for name in ("sql", "grpc")
                )
            )
        print()
    if len(by_size) < 2:
        return
    small, large = by_size[0], by_size[-1]

    print(f"Targets ({small.tenant.clients:,} vs {large.tenant.clients:,} clients, medians):")
    print()
    for name in ("sql", "grpc"):
        ratio = median(large, name) / median(small, name)
        print(
            f"- {labels[name]}: {large.tenant.label} / {small.tenant.label} ="
            f" {ratio:.2f}x (target <= {SIZE_TARGET:g}x): {verdict(ratio <= SIZE_TARGET)}"
        )
    for name in ("sql", "grpc"):
        speedup = median(large, "naive") / median(large, name)
        print(
            f"- naive / {labels[name]} at {large.tenant.label}: {speedup:,.0f}x"
            f" (target >= {NAIVE_TARGET:g}x): {verdict(speedup >= NAIVE_TARGET)}"
        )
    speedup = median(large, "recompute") / median(large, "sql")
    print(f"- the full scan / the aggregates at {large.tenant.label}: {speedup:,.0f}x")
    print()


async def run(args: argparse.Namespace) -> None:
    tenants = _selected(args.sizes)
    backlogs = _backlogs(args.backlogs)
    server = bench_server()
    where = f"embedded, {BENCH_DATA_DIR}" if server.embedded else "DATABASE_URL"
    say(f"PostgreSQL: {where}")
    url = prepare_database(server, fresh=args.fresh)
    # Reads are timed against the compacted aggregates, not a load's backlog.
    drain = drain_backlog(url, label="data")
    facts = server_facts(url)

    token = secrets.token_urlsafe(24)
    tokens_file = BENCH_DATA_DIR / "tokens.toml"
    write_tokens_file(tokens_file, token, [SCOPE_PIPELINE_READ])
    service_env = {
        "DATABASE_URL": url,
        "AUTH_TOKENS_FILE": str(tokens_file),
        "CRM_DEFAULT_DEADLINE_S": str(RPC_TIMEOUT_S),
    }
    log_path = BENCH_DATA_DIR / "crm_svc.log"
    rest_log_path = BENCH_DATA_DIR / "crm_svc_rest.log"
    measurements: list[Measurement] = []
    with postgrest_standin(url) as standin:
        rest_env = {**service_env, **rest_service_env(standin)}
        async with (
            service_process(
                "crm_svc", listen_var="CRM_LISTEN", env=service_env, log_path=log_path
            ) as address,
            service_process(
                "crm_svc", listen_var="CRM_LISTEN", env=rest_env, log_path=rest_log_path
            ) as rest_address,
            grpc.aio.insecure_channel(address) as channel,
            grpc.aio.insecure_channel(rest_address) as rest_channel,
            await psycopg.AsyncConnection.connect(
                url, autocommit=True, application_name="bench_sql"
            ) as sql_conn,
            await psycopg.AsyncConnection.connect(
                url, application_name="bench_naive"
            ) as naive_conn,
        ):
            say(f"crm_svc serving on {address} (log: {log_path})")
            say(f"crm_svc on the REST transport serving on {rest_address} (log: {rest_log_path})")
            await naive_conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            contenders = Contenders(
                sql_conn=sql_conn,
                naive_conn=naive_conn,
                stub=crm_pb2_grpc.CrmServiceStub(channel),
                rest_stub=crm_pb2_grpc.CrmServiceStub(rest_channel),
                metadata=(("authorization", f"Bearer {token}"),),
            )
            methods = contenders.methods()
            for tenant in tenants:
                reps = args.reps or tenant.reps
                measurement = Measurement(tenant)
                measurements.append(measurement)
                say(f"{tenant.label}: tenant {tenant.tenant_id}, {reps} rounds")
                await warm_up_and_verify(methods, measurement)
                await measure(methods, measurement, reps)
            # Backlogs last: writing and compacting them leaves dead rows in the
            # log, which the sizes above must not be timed against.
            for tenant in tenants:
                if tenant.label != BACKLOG_TENANT:
                    continue
                backlog_methods = [m for m in methods if m.name in BACKLOG_METHODS]
                backlog_reps = args.reps or BACKLOG_REPS
                for target in backlogs:
                    for log_stats in LOG_STATS:
                        async with pending_deltas(
                            url, tenant.tenant_id, target, log_stats
                        ) as pending:
                            measurement = Measurement(tenant, pending, log_stats)
                            measurements.append(measurement)
                            say(f"{measurement.name}: {backlog_reps} rounds")
                            autovacuums = await log_autovacuum_count(sql_conn)
                            await warm_up_and_verify(methods, measurement)
                            await measure(backlog_methods, measurement, backlog_reps)
                            # The statistics views lag a little: good enough to flag a row.
                            measurement.autovacuumed = (
                                await log_autovacuum_count(sql_conn) != autovacuums
                            )
    report(methods, measurements, facts, where, drain)
    scenarios = [name for name in args.bulk_scenarios.split(",") if name]
    unknown = set(scenarios) - set(bulk_import.SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown bulk-import scenarios: {', '.join(sorted(unknown))}")
    if scenarios:
        for line in await bulk_import.run_section(server, args.bulk_clients, scenarios):
            print(line)
