"""Choose and open the transport the settings name (design §8)."""

from __future__ import annotations

import asyncio

from shared.database import Database
from shared.database.embedded import start_embedded
from shared.database.migrations import apply_migrations
from shared.database.postgres import PostgresDatabase
from shared.database.rest import SupabaseRestDatabase
from shared.settings import Settings


async def open_database(settings: Settings, *, application_name: str) -> Database:
    """DATABASE_URL: direct PostgreSQL; else SUPABASE_URL + key: REST; else embedded, migrated."""
    if settings.database_url:
        url = settings.database_url
    elif settings.uses_supabase:
        assert settings.supabase_url and settings.supabase_service_role_key
        rest = SupabaseRestDatabase(
            settings.supabase_url,
            settings.supabase_service_role_key,
            slow_call_ms=settings.slow_call_ms,
        )
        await rest.open()
        return rest
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
