"""`python -m provisioning_svc`: serve ProvisioningService on PROVISIONING_LISTEN."""

from __future__ import annotations

import asyncio
import logging
import sys

from provisioning_svc.servicer import ERROR_DOMAIN, provisioning_service
from shared.auth import TokenFile
from shared.database.connect import open_database
from shared.errors import ServiceError
from shared.logs import configure_logging, kv
from shared.metrics import serve_metrics
from shared.server import create_server, serve
from shared.settings import Settings

log = logging.getLogger("provisioning_svc")


async def main() -> None:
    settings = Settings.from_env()
    if settings.auth_tokens_file is None:
        sys.exit("AUTH_TOKENS_FILE is not set: every call needs a caller listed there (see README)")
    tokens = TokenFile(settings.auth_tokens_file)
    if not settings.sendgrid_api_key:
        log.warning(
            kv(
                "sendgrid_key_missing",
                effect="subuser step skipped (dev mode)"
                if settings.dev_mode
                else "Deprovision answers FAILED_PRECONDITION",
            )
        )
    if not settings.clients_dir.is_dir():
        log.warning(kv("clients_dir_missing", clients_dir=settings.clients_dir.resolve()))
    serve_metrics(settings.provisioning_metrics_listen)
    db = await open_database(settings, application_name="provisioning_svc")
    try:
        handle = create_server(
            settings.provisioning_listen,
            [provisioning_service(db, settings)],
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
        sys.exit(f"provisioning_svc: {exc.message}")
