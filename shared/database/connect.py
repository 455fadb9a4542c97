"""Choose and open the transport the settings name (README, "Configuration")."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from shared.database import Database
from shared.database.embedded import start_embedded
from shared.database.migrations import apply_migrations
from shared.database.postgres import PostgresDatabase
from shared.database.rest import SupabaseRestDatabase
from shared.settings import Settings


def transport_description(settings: Settings) -> str:
    """Which transport `open_database` picks for `settings`, for operators (no secrets)."""
    if settings.database_url:
        parts = urlsplit(settings.database_url)
        where = f"{parts.hostname}:{parts.port or 5432}" if parts.hostname else "a local socket"
        return f"direct PostgreSQL (DATABASE_URL: {where}{parts.path})"
    if settings.uses_supabase:
        return f"Supabase REST (SUPABASE_URL: {settings.supabase_url})"
    return f"embedded PostgreSQL (under {settings.data_dir / 'postgres'})"


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
