"""Apply database/migrations/*.sql in order with yoyo-migrations.

yoyo records what it applied (table `_yoyo_migration`) and takes a lock, so
several processes starting at once apply each migration once.
`python -m shared.database.migrations` migrates the database in DATABASE_URL.

Until a production database runs them, migrations may be rewritten in place
(docs in README, "Schema changes"). yoyo knows migrations by id only, so the
sha256 of each applied file is kept too (table `_schema_sha256`): a database
whose applied migrations have changed since, or that predates the check, is
refused with a message that says to recreate it, rather than left to fail
obscurely later.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from yoyo import get_backend, read_migrations
from yoyo.migrations import MigrationList

from shared.errors import FailedPrecondition

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS_DIR = ROOT / "database" / "migrations"
SEED_FILE = ROOT / "database" / "seed" / "demo.sql"

log = logging.getLogger(__name__)

# Supabase's transaction pooler: fine for the services, not for migrations.
SUPABASE_POOLER_PORT = 6543


def _yoyo_url(url: str) -> str:
    """yoyo wants `postgresql+psycopg://` to use psycopg 3."""
    parts = urlsplit(url)
    scheme = "postgresql+psycopg" if parts.scheme in {"postgres", "postgresql"} else parts.scheme
    query = urlencode(parse_qsl(parts.query))
    return urlunsplit((scheme, parts.netloc, parts.path, query, parts.fragment))


def apply_migrations(url: str, *, before: str | None = None) -> list[str]:
    """Apply what is pending (only the migrations ordered before `before`, if
    given); return the ids applied now.

    Raises FailedPrecondition (STALE_SCHEMA) when migrations applied earlier
    have changed since.
    """
    backend = get_backend(_yoyo_url(url))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    if before is not None:
        migrations = MigrationList(m for m in migrations if m.id < before)
    with backend.lock():
        applied_before = [m.id for m in migrations if backend.is_applied(m)]
        with psycopg.connect(url, autocommit=True) as conn:
            _check_unchanged(conn, applied_before)
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
            _record(conn, [m.id for m in pending])
    applied = [m.id for m in pending]
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    return applied


def _sha256(migration_id: str) -> str | None:
    path = MIGRATIONS_DIR / f"{migration_id}.sql"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _check_unchanged(conn: psycopg.Connection, applied: list[str]) -> None:
    row = conn.execute("SELECT to_regclass('_schema_sha256') IS NOT NULL").fetchone()
    if not (row and row[0]):
        conn.execute(
            "CREATE TABLE _schema_sha256 (migration_id text PRIMARY KEY, sha256 text NOT NULL)"
        )
        # Like every table (0005): nothing for the REST API's roles to read.
        conn.execute("ALTER TABLE _schema_sha256 ENABLE ROW LEVEL SECURITY")
    if not applied:
        return
    recorded = dict(conn.execute("SELECT migration_id, sha256 FROM _schema_sha256").fetchall())
    changed = [m for m in applied if recorded.get(m) != _sha256(m)]
    if changed:
        why = (
            "it predates the migration checksums"
            if not recorded
            else f"{', '.join(changed)} changed since"
        )
        raise FailedPrecondition(
            f"this database was migrated by an earlier version of the migrations ({why}):"
            " recreate it. The dev database: stop the services, `rm -rf .data/postgres`"
            " (or DATA_DIR/postgres), then `make run`. Another database: drop and create"
            " it, then `make migrate`",
            reason="STALE_SCHEMA",
            metadata={"changed": ",".join(changed)},
        )


def _record(conn: psycopg.Connection, migration_ids: list[str]) -> None:
    for migration_id in migration_ids:
        conn.execute(
            "INSERT INTO _schema_sha256 (migration_id, sha256) VALUES (%s, %s)"
            " ON CONFLICT (migration_id) DO UPDATE SET sha256 = excluded.sha256",
            (migration_id, _sha256(migration_id)),
        )


def main() -> None:
    import os

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    url = os.environ.get("DATABASE_URL")
    if not url:
        sys.exit("DATABASE_URL is not set: make migrate applies the migrations to that database")
    if urlsplit(url).port == SUPABASE_POOLER_PORT:
        sys.exit(
            f"DATABASE_URL names port {SUPABASE_POOLER_PORT}, Supabase's transaction pooler:"
            " migrate through the direct connection (port 5432; see README)"
        )
    try:
        applied = apply_migrations(url)
    except FailedPrecondition as exc:
        sys.exit(exc.message)
    print(f"{len(applied)} migration(s) applied" + (f": {', '.join(applied)}" if applied else ""))


if __name__ == "__main__":
    main()
