"""`python -m provisioning_svc`: serve ProvisioningService on PROVISIONING_LISTEN."""

from __future__ import annotations

import logging

from provisioning_svc.servicer import ERROR_DOMAIN, provisioning_service
from shared.entrypoint import main, run_service
from shared.logs import kv
from shared.settings import Settings

log = logging.getLogger("provisioning_svc")


async def serve_provisioning(settings: Settings) -> None:
    if not settings.sendgrid_api_key:
        log.warning(
            kv(
                "sendgrid_key_missing",
                effect="subuser step skipped (dev mode)"
                if settings.dev_mode
                else "Deprovision answers FAILED_PRECONDITION",
            )
        )
    if not settings.tenant_config_root.is_dir():
        log.warning(kv("clients_dir_missing", CLIENTS_DIR=settings.tenant_config_root.resolve()))
    await run_service(
        "provisioning_svc",
        settings,
        listen=settings.provisioning_listen,
        metrics_listen=settings.provisioning_metrics_listen,
        error_domain=ERROR_DOMAIN,
        services=lambda db: [provisioning_service(db, settings)],
    )


if __name__ == "__main__":
    main("provisioning_svc", serve_provisioning)
