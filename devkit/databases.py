"""Databases on a PostgreSQL server: created empty or migrated, and dropped."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from shared.database.migrations import apply_migrations


def with_database(url: str, name: str) -> str:
    """`url` with its database replaced by `name`."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def create_database(server_url: str, name: str) -> str:
    """An empty database `name` on the server (dropped first if it exists); its URL."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(server_url, name)


def create_migrated_database(server_url: str, name: str) -> str:
    """`create_database`, then the real migrations applied; its URL."""
    url = create_database(server_url, name)
    apply_migrations(url)
    return url


def drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def throwaway_database(server_url: str, name: str) -> Iterator[str]:
    """A fresh database `name` with the real migrations, dropped afterwards: its URL."""
    url = create_migrated_database(server_url, name)
    try:
        yield url
    finally:
        drop_database(server_url, name)
