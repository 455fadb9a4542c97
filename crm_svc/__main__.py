"""`python -m crm_svc`: serve CrmService on CRM_LISTEN."""

from __future__ import annotations

import asyncio
import logging
import sys

from crm_svc.servicer import ERROR_DOMAIN, crm_service
from shared.auth import TokenFile
from shared.database.connect import open_database
from shared.errors import ServiceError
from shared.logs import configure_logging
from shared.metrics import serve_metrics
from shared.server import create_server, serve
from shared.settings import Settings

log = logging.getLogger("crm_svc")


async def main() -> None:
    settings = Settings.from_env()
    if settings.auth_tokens_file is None:
        sys.exit("AUTH_TOKENS_FILE is not set: every call needs a caller listed there (see README)")
    tokens = TokenFile(settings.auth_tokens_file)
    serve_metrics(settings.crm_metrics_listen)
    db = await open_database(settings, application_name="crm_svc")
    try:
        handle = create_server(
            settings.crm_listen,
            [crm_service(db, settings.crm_default_deadline_s)],
            tokens=tokens,
            error_domain=ERROR_DOMAIN,
            database=db,
            tls=settings.server_tls,
            allow_insecure=settings.allow_insecure,
        )
        await serve(handle, on_hangup=tokens.reload)
    finally:
        await db.close()


if __name__ == "__main__":
    configure_logging()
    try:
        asyncio.run(main())
    except ServiceError as exc:
        sys.exit(f"crm_svc: {exc.message}")
