"""Choose and open the transport the settings name (design §8)."""

from __future__ import annotations

import asyncio

from shared.database import Database
from shared.database.embedded import start_embedded
from shared.database.migrations import apply_migrations
from shared.database.postgres import PostgresDatabase
from shared.errors import FailedPrecondition
from shared.settings import Settings


async def open_database(settings: Settings, *, application_name: str) -> Database:
    """DATABASE_URL: direct PostgreSQL. Neither it nor Supabase: embedded, migrated."""
    if settings.database_url:
        url = settings.database_url
    elif settings.uses_supabase:
        raise FailedPrecondition(
            "SUPABASE_URL is set but this build has no Supabase REST transport; set DATABASE_URL",
            reason="TRANSPORT_UNAVAILABLE",
        )
    else:
        url = await asyncio.to_thread(start_embedded, settings.data_dir)
        await asyncio.to_thread(apply_migrations, url)
    database = PostgresDatabase(
        url,
        application_name=application_name,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        slow_call_ms=settings.slow_call_ms,
    )
    await database.open()
    return database
