"""`python -m crm_svc`: serve CrmService on CRM_LISTEN."""

from __future__ import annotations

from crm_svc.servicer import ERROR_DOMAIN, crm_service
from shared.entrypoint import main, run_service
from shared.settings import Settings


async def serve_crm(settings: Settings) -> None:
    await run_service(
        "crm_svc",
        settings,
        listen=settings.crm_listen,
        metrics_listen=settings.crm_metrics_listen,
        error_domain=ERROR_DOMAIN,
        services=lambda db: [crm_service(db, settings.crm_default_deadline_s)],
    )


if __name__ == "__main__":
    main("crm_svc", serve_crm)
