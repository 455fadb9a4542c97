"""Apply database/migrations/*.sql in order with yoyo-migrations.

yoyo records what it applied (table `_yoyo_migration`) and takes a lock, so
several processes starting at once apply each migration once.
`python -m shared.database.migrations` migrates the database in DATABASE_URL.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from yoyo import get_backend, read_migrations

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


def apply_migrations(url: str) -> list[str]:
    """Apply what is pending; return the ids applied now."""
    backend = get_backend(_yoyo_url(url))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    applied = [m.id for m in pending]
    if applied:
        log.info("applied migrations: %s", ", ".join(applied))
    return applied


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
    applied = apply_migrations(url)
    print(f"{len(applied)} migration(s) applied" + (f": {', '.join(applied)}" if applied else ""))


if __name__ == "__main__":
    main()
