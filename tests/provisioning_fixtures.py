"""Fixtures for the provisioning service: a fake SendGrid, a real server, data.

The fake SendGrid is a real HTTP server on loopback speaking the subuser API
(`DELETE /v3/subusers/<name>`: 204, 404, 401 on a wrong key, scripted 429
with rate-limit headers, 5xx and slow answers); the real `sendgrid` library
talks to it through SENDGRID_API_HOST.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc
import psycopg
import pytest
import pytest_asyncio
from psycopg import sql as pgsql

from devkit.pooler import Pooler
from devkit.postgrest_standin import PostgrestStandin
from provisioning_svc.deprovision import DEFAULT_MAX_BATCH_ROWS
from provisioning_svc.servicer import ERROR_DOMAIN, provisioning_service
from shared.auth import TokenRegistry
from shared.database import Database
from shared.database.postgres import PostgresDatabase
from shared.database.rest import SupabaseRestDatabase
from shared.proto_gen.provisioning.v1 import provisioning_pb2, provisioning_pb2_grpc
from shared.server import ServerHandle, create_server
from shared.settings import Settings
from tests.conftest import JWT_SECRET, SENDGRID_KEY, TOKEN_ADMIN
from tests.rpc import bearer, detail

_SUBUSER_PATH = re.compile(r"/v3/subusers/([^/?#]+)")


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    authorization: str | None


@dataclass(frozen=True)
class FakeReply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    body: bytes = b""


class FakeSendGrid:
    """SendGrid's subuser API on 127.0.0.1, recording every request."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.subusers: set[str] = set()
        self.requests: list[SeenRequest] = []
        self._scripted: deque[FakeReply] = deque()
        self._lock = threading.Lock()
        self._cut_short = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_DELETE(self) -> None:
                fake._serve(self)

            def do_GET(self) -> None:
                fake._serve(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._cut_short.set()
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        # Wake any slow reply still sleeping from an earlier test.
        self._cut_short.set()
        with self._lock:
            self.subusers.clear()
            self.requests.clear()
            self._scripted.clear()
        self._cut_short = threading.Event()

    def script(self, *replies: FakeReply) -> None:
        """Answer the next requests with these, then behave like the API again."""
        with self._lock:
            self._scripted.extend(replies)

    def deletes(self) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == "DELETE"]

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        cut_short = self._cut_short
        with self._lock:
            self.requests.append(
                SeenRequest(handler.command, handler.path, handler.headers.get("Authorization"))
            )
            reply = self._scripted.popleft() if self._scripted else None
        if reply is None:
            reply = self._api(handler)
        if reply.delay_s:
            cut_short.wait(reply.delay_s)
        try:
            handler.send_response(reply.status)
            headers = {
                "X-RateLimit-Limit": "500",
                "X-RateLimit-Remaining": "499",
                "X-RateLimit-Reset": str(int(time.time()) + 60),
                **reply.headers,
            }
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(reply.body)))
            if reply.body:
                handler.send_header("Content-Type", "application/json")
            handler.end_headers()
            handler.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    def _api(self, handler: BaseHTTPRequestHandler) -> FakeReply:
        if handler.headers.get("Authorization") != f"Bearer {self.api_key}":
            return FakeReply(401, body=b'{"errors":[{"message":"authorization required"}]}')
        match = _SUBUSER_PATH.fullmatch(handler.path)
        if match is None or handler.command != "DELETE":
            return FakeReply(404, body=b'{"errors":[{"message":"not found"}]}')
        name = unquote(match.group(1))
        with self._lock:
            if name in self.subusers:
                self.subusers.remove(name)
                return FakeReply(204)
        return FakeReply(404, body=b'{"errors":[{"field":null,"message":"resource not found"}]}')


@pytest.fixture(scope="session")
def sendgrid_server() -> Iterator[FakeSendGrid]:
    fake = FakeSendGrid(SENDGRID_KEY)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def sendgrid(sendgrid_server: FakeSendGrid) -> FakeSendGrid:
    sendgrid_server.reset()
    return sendgrid_server


@dataclass
class Provisioning:
    """A running provisioning server and what it works on."""

    stub: provisioning_pb2_grpc.ProvisioningServiceStub
    address: str
    sendgrid: FakeSendGrid
    tenant_config_root: Path
    outside_dir: Path

    async def deprovision(
        self,
        tenant_id: str,
        *,
        request_id: str = "",
        validate_only: bool = False,
        allow_missing: bool = False,
        token: str | None = TOKEN_ADMIN,
        deadline_s: float | None = 10.0,
    ) -> provisioning_pb2.DeprovisionResponse:
        return await self.stub.Deprovision(
            provisioning_pb2.DeprovisionRequest(
                tenant_id=tenant_id,
                request_id=request_id,
                validate_only=validate_only,
                allow_missing=allow_missing,
            ),
            metadata=bearer(token) if token else None,
            timeout=deadline_s,
        )

    async def failure(self, tenant_id: str, **kwargs: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.deprovision(tenant_id, **kwargs)
        return caught.value


def partial_response(error: grpc.aio.AioRpcError) -> provisioning_pb2.DeprovisionResponse:
    response = detail(error, provisioning_pb2.DeprovisionResponse)
    assert isinstance(response, provisioning_pb2.DeprovisionResponse), "no partial response"
    return response


async def start_provisioning_server(
    db: Any, tokens: TokenRegistry, settings: Settings, *, max_batch_rows: int
) -> ServerHandle:
    handle = create_server(
        "127.0.0.1:0",
        [provisioning_service(db, settings, max_batch_rows=max_batch_rows)],
        tokens=lambda: tokens,
        error_domain=ERROR_DOMAIN,
    )
    await handle.start()
    return handle


@asynccontextmanager
async def provisioning_server(
    db: Any,
    tokens: TokenRegistry,
    sendgrid: FakeSendGrid,
    base_dir: Path,
    *,
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
    **settings: Any,
) -> AsyncIterator[Provisioning]:
    tenant_config_root = base_dir / "clients"
    outside_dir = base_dir / "outside"
    tenant_config_root.mkdir(exist_ok=True)
    outside_dir.mkdir(exist_ok=True)
    config = Settings(
        **{
            "sendgrid_api_key": SENDGRID_KEY,
            "sendgrid_api_host": sendgrid.url,
            "tenant_config_root": tenant_config_root,
            **settings,
        }
    )
    handle = await start_provisioning_server(db, tokens, config, max_batch_rows=max_batch_rows)
    try:
        address = f"127.0.0.1:{handle.port}"
        async with grpc.aio.insecure_channel(address) as channel:
            yield Provisioning(
                provisioning_pb2_grpc.ProvisioningServiceStub(channel),
                address,
                sendgrid,
                tenant_config_root,
                outside_dir,
            )
    finally:
        await handle.stop(0)


@asynccontextmanager
async def adapter_on(
    transport: str, url: str, name: str, request: pytest.FixtureRequest
) -> AsyncIterator[Database]:
    """The service's database adapter on a throwaway database `name` at `url`,
    through `transport` (direct, pooled or rest)."""
    if transport == "rest":
        standin = PostgrestStandin(url, JWT_SECRET).start()
        rest = SupabaseRestDatabase(standin.url, standin.token("service_role"))
        await rest.open()
        try:
            yield rest
        finally:
            await rest.close()
            standin.stop()
        return
    if transport == "pooled":
        pooler: Pooler = request.getfixturevalue("pooler")
        url = pooler.url(name)
    db = PostgresDatabase(url, application_name=f"{name}_test", min_size=1, max_size=2)
    await db.open(wait_s=10)
    try:
        yield db
    finally:
        await db.close()


@pytest_asyncio.fixture
async def provisioning(
    database: Any, tokens: TokenRegistry, sendgrid: FakeSendGrid, tmp_path: Path
) -> AsyncIterator[Provisioning]:
    async with provisioning_server(database, tokens, sendgrid, tmp_path) as harness:
        yield harness


class RacingWriter:
    """A thread that keeps inserting a tenant's clients and quotes (one per
    transaction, and several per transaction) until stopped, recording the
    SQLSTATE of every failure in order."""

    def __init__(self, database_url: str, tenant_id: str) -> None:
        self._url = database_url
        self._tenant = tenant_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write)
        self.errors: list[str] = []
        self.written = 0

    def __enter__(self) -> RacingWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _write(self) -> None:
        with psycopg.connect(self._url, autocommit=True) as conn:
            n = 0
            while not self._stop.is_set():
                n += 1
                client = (
                    "INSERT INTO clients (tenant_id, email) VALUES (%s, %s)",
                    (self._tenant, f"w{n}@x.io"),
                )
                try:
                    if n % 2:
                        conn.execute(*client)
                    else:
                        with conn.transaction():
                            conn.execute(*client)
                            conn.execute(
                                "INSERT INTO quotes (tenant_id, customer_email, total_price,"
                                " currency) VALUES (%s, %s, 1.00, 'EUR')",
                                (self._tenant, f"w{n}@x.io"),
                            )
                    self.written += 1
                except psycopg.Error as exc:
                    self.errors.append(exc.sqlstate or repr(exc))
                    time.sleep(0.001)

    def assert_saw_only_the_guard(self) -> None:
        """It wrote, then got the guard's error until the tenant row was gone,
        then only the foreign key's."""
        assert self.written > 0 and "CRM01" in self.errors, (self.written, self.errors[:3])
        guarded = self.errors.index("23503") if "23503" in self.errors else len(self.errors)
        assert set(self.errors[:guarded]) == {"CRM01"}
        assert set(self.errors[guarded:]) <= {"23503"}


# -- data -------------------------------------------------------------------

# Our tables derived from the tenant's data (docs/pipeline.md): a deprovisioning
# reports their rows apart from the tenant's own.
DERIVED_TABLES = frozenset({"pipeline_deltas", "pipeline_stage_clients", "pipeline_stage_values"})


def split_rows(counts: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """(the tenant's own data, our derived rows) of a {table: rows} map."""
    own = {t: n for t, n in counts.items() if t not in DERIVED_TABLES}
    derived = {t: n for t, n in counts.items() if t in DERIVED_TABLES}
    return own, derived


def reported_rows(step: provisioning_pb2.StepResult) -> tuple[dict[str, int], dict[str, int]]:
    """A step's (rows, derived_rows)."""
    return dict(step.rows), dict(step.derived_rows)


def seed_tenant(
    conn: psycopg.Connection[Any],
    tenant_id: str,
    *,
    clients: int = 3,
    sendgrid_username: str | None = None,
    tenant_config_root: Path | None = None,
) -> dict[str, int]:
    """A tenant with rows in every table (and its config directory); rows per table."""
    conn.execute(
        "INSERT INTO tenants (id, name) VALUES (%s, %s)", (tenant_id, f"Tenant {tenant_id}")
    )
    conn.execute(
        "INSERT INTO tenant_settings (tenant_id, sendgrid_username) VALUES (%s, %s)",
        (tenant_id, sendgrid_username),
    )
    args = {"t": tenant_id, "n": clients}
    conn.execute(
        "INSERT INTO clients (tenant_id, email, name, pipeline_stage)"
        " SELECT %(t)s, format('c%%s@x.io', g), format('Client %%s', g),"
        " (ARRAY['QUOTED','NEGOTIATING','BOOKED','PAID','TRAVELLED','LOST'])[1 + g %% 6]"
        " FROM generate_series(1, %(n)s) g",
        args,
    )
    conn.execute(
        "INSERT INTO quotes (tenant_id, client_id, customer_email, total_price, currency)"
        " SELECT tenant_id, id, email, 100 + id %% 50, 'EUR' FROM clients WHERE tenant_id = %(t)s",
        args,
    )
    conn.execute(
        "INSERT INTO invoices (tenant_id, quote_id, client_id, amount, currency)"
        " SELECT tenant_id, id, client_id, total_price, currency FROM quotes"
        " WHERE tenant_id = %(t)s",
        args,
    )
    conn.execute(
        "INSERT INTO activities (tenant_id, client_id, kind)"
        " SELECT c.tenant_id, c.id, k FROM clients c, unnest(ARRAY['created', 'called']) k"
        " WHERE c.tenant_id = %(t)s",
        args,
    )
    conn.execute(
        "INSERT INTO notifications (tenant_id, message)"
        " SELECT %(t)s, format('note %%s', g) FROM generate_series(1, %(n)s) g",
        args,
    )
    if tenant_config_root is not None:
        make_config_directory(tenant_config_root / tenant_id)
    counts = {
        table: len(rows)
        for table, rows in tenant_data(conn, tenant_id).items()
        if table != "tenants"
    }
    # What was inserted above; any other table (e.g. the pipeline aggregates the
    # triggers maintain) holds rows derived from these and is the tenant's too.
    assert {
        "activities": 2 * clients,
        "clients": clients,
        "invoices": clients,
        "notifications": clients,
        "quotes": clients,
        "tenant_settings": 1,
    }.items() <= counts.items()
    return counts


def make_config_directory(path: Path) -> None:
    (path / "templates").mkdir(parents=True)
    (path / "branding.toml").write_text('theme = "test"\n')
    (path / "templates" / "welcome.html").write_text("<p>hello</p>\n")


def _tables(conn: psycopg.Connection[Any]) -> list[tuple[str, list[str]]]:
    rows = conn.execute(
        "SELECT c.relname, array_agg(a.attname::text ORDER BY a.attnum)"
        " FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid"
        " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')"
        " AND NOT c.relispartition AND c.relname NOT LIKE %s"
        " AND a.attnum > 0 AND NOT a.attisdropped"
        " GROUP BY c.relname ORDER BY c.relname",
        ("%yoyo%",),
    ).fetchall()
    return [(name, list(columns)) for name, columns in rows]


def _rows(
    conn: psycopg.Connection[Any], table: str, where: pgsql.Composable, args: tuple[Any, ...]
) -> list[tuple[Any, ...]]:
    query = pgsql.SQL("SELECT * FROM {} WHERE {}").format(pgsql.Identifier(table), where)
    return sorted(conn.execute(query, args).fetchall(), key=repr)


def snapshot_except(conn: psycopg.Connection[Any], tenant_id: str) -> dict[str, list[Any]]:
    """Every row of every table, except those of `tenant_id` (and its jobs)."""
    result = {}
    for table, columns in _tables(conn):
        if table == "tenants":
            where, args = pgsql.SQL("id <> %s"), (tenant_id,)
        elif "tenant_id" in columns:
            where, args = pgsql.SQL("tenant_id <> %s"), (tenant_id,)
        elif table == "deprovision_requests":
            where = pgsql.SQL(
                "job_id NOT IN (SELECT id FROM deprovision_jobs WHERE tenant_id = %s)"
            )
            args = (tenant_id,)
        else:
            where, args = pgsql.SQL("true"), ()
        result[table] = _rows(conn, table, where, args)
    return result


def tenant_data(conn: psycopg.Connection[Any], tenant_id: str) -> dict[str, list[Any]]:
    """The tenant's own rows in every table it owns (jobs excluded; its status left out)."""
    result = {}
    for table, columns in _tables(conn):
        if table == "tenants":
            query = "SELECT id, name, default_currency, created_at FROM tenants WHERE id = %s"
            result[table] = conn.execute(query, (tenant_id,)).fetchall()
        elif "tenant_id" in columns and table != "deprovision_jobs":
            result[table] = _rows(conn, table, pgsql.SQL("tenant_id = %s"), (tenant_id,))
    return result


def remaining_rows(conn: psycopg.Connection[Any], tenant_id: str) -> dict[str, int]:
    """Rows left for the tenant per table (tenants included), zeros left out."""
    data = tenant_data(conn, tenant_id)
    return {table: len(rows) for table, rows in data.items() if rows}


def tenant_status(conn: psycopg.Connection[Any], tenant_id: str) -> str | None:
    row = conn.execute("SELECT status FROM tenants WHERE id = %s", (tenant_id,)).fetchone()
    return row[0] if row else None


def jobs_of(conn: psycopg.Connection[Any], tenant_id: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT id, state, actor, request_id, sendgrid_username FROM deprovision_jobs"
        " WHERE tenant_id = %s ORDER BY started_at",
        (tenant_id,),
    ).fetchall()


def tree(path: Path) -> dict[str, str]:
    """Every entry under `path` (not following symlinks): kind, and file contents."""
    entries = {}
    for top, dirs, files in os.walk(path):  # does not descend into symlinked directories
        for name in dirs + files:
            entry = Path(top) / name
            rel = str(entry.relative_to(path))
            if entry.is_symlink():
                entries[rel] = f"symlink -> {os.readlink(entry)}"
            elif entry.is_dir():
                entries[rel] = "dir"
            else:
                entries[rel] = entry.read_text()
    return dict(sorted(entries.items()))
