"""Migrations: `make migrate` refuses the pooler; a database migrated by
migrations that have changed since is refused with how to recreate it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import psycopg
import pytest

from devkit.databases import create_database, drop_database
from shared.database.migrations import apply_migrations
from shared.errors import FailedPrecondition


def test_migrate_refuses_supabases_transaction_pooler() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shared.database.migrations"],
        # Nothing listens there: a refusal must come before any connection attempt.
        env={**os.environ, "DATABASE_URL": "postgresql://u:secret-pw@127.0.0.1:6543/postgres"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "port 6543, Supabase's transaction pooler" in result.stderr
    assert "secret-pw" not in result.stderr + result.stdout


@pytest.fixture
def migrated_url(pg_server_url: str) -> Iterator[str]:
    name = f"crm_stale_{os.getpid()}"
    url = create_database(pg_server_url, name)
    apply_migrations(url)
    yield url
    drop_database(pg_server_url, name)


def test_a_database_migrated_by_changed_migrations_is_refused_with_how_to_recreate_it(
    migrated_url: str,
) -> None:
    assert apply_migrations(migrated_url) == []  # unchanged: nothing to do, no complaint
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        # As if 0002 had been rewritten since it was applied here.
        conn.execute(
            "UPDATE _schema_sha256 SET sha256 = 'old' WHERE migration_id = '0002_pipeline_summary'"
        )
    with pytest.raises(FailedPrecondition) as caught:
        apply_migrations(migrated_url)
    assert caught.value.reason == "STALE_SCHEMA"
    assert "0002_pipeline_summary changed since" in caught.value.message
    assert "rm -rf .data/postgres" in caught.value.message
    result = subprocess.run(
        [sys.executable, "-m", "shared.database.migrations"],
        env={**os.environ, "DATABASE_URL": migrated_url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "recreate it" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_database_from_before_the_checksums_is_refused(migrated_url: str) -> None:
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        conn.execute("DROP TABLE _schema_sha256")
    with pytest.raises(FailedPrecondition) as caught:
        apply_migrations(migrated_url)
    assert "it predates the migration checksums" in caught.value.message
