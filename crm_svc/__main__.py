"""`python -m crm_svc`: serve CrmService on CRM_LISTEN, and compact the
pipeline delta log in the background (crm_svc/compaction.py;
CRM_PIPELINE_COMPACT_INTERVAL_S=0 turns that off).

`python -m crm_svc verify [--tenant T] [--repair]`: compare the pipeline
aggregates with a full recomputation (see crm_svc/verify.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from crm_svc import verify
from crm_svc.compaction import run_compactor
from crm_svc.servicer import ERROR_DOMAIN, crm_service
from shared.database import Database
from shared.database.connect import open_database, transport_description
from shared.entrypoint import main, run_service
from shared.errors import ServiceError
from shared.logs import configure_logging, kv
from shared.server import BackgroundTask
from shared.settings import Settings

log = logging.getLogger("crm_svc")


def background_tasks(db: Database, settings: Settings) -> list[BackgroundTask]:
    if settings.crm_pipeline_compact_interval_s <= 0:
        log.warning(
            kv("pipeline_compactor_off", setting="CRM_PIPELINE_COMPACT_INTERVAL_S", value=0)
        )
        return []
    return [
        BackgroundTask(
            "pipeline_compactor",
            lambda: run_compactor(
                db,
                interval_s=settings.crm_pipeline_compact_interval_s,
                max_deltas=settings.crm_pipeline_compact_batch,
                budget_s=settings.crm_pipeline_compact_timeout_s,
                rebuild_budget_s=settings.crm_pipeline_rebuild_timeout_s,
            ),
        )
    ]


async def serve_crm(settings: Settings) -> None:
    await run_service(
        "crm_svc",
        settings,
        listen=settings.crm_listen,
        metrics_listen=settings.crm_metrics_listen,
        error_domain=ERROR_DOMAIN,
        services=lambda db: [crm_service(db, settings.crm_default_deadline_s)],
        background=lambda db: background_tasks(db, settings),
    )


def say(message: str) -> None:
    """A note for the operator on stderr; stdout carries the report only."""
    print(f"crm_svc verify: {message}", file=sys.stderr, flush=True)


async def verify_main(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    say(f"transport: {transport_description(settings)}")
    db = await open_database(settings, application_name="crm_svc_verify")
    note = verify.call_cap_note(db, args.timeout_s)
    if note is not None:
        say(note)
    try:
        return await verify.verify(
            db,
            tenant_id=args.tenant,
            repair=args.repair,
            timeout_s=args.timeout_s,
            emit=lambda line: print(line, flush=True),
        )
    finally:
        await db.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m crm_svc", description="The CRM service.")
    commands = parser.add_subparsers(dest="command")
    verify.add_arguments(
        commands.add_parser(
            "verify",
            help="compare the pipeline aggregates with a full recomputation",
            description="Compare the pipeline aggregates with a full recomputation, tenant by"
            " tenant. Exit status: 0 no drift, 1 drift found (repaired or not), 2 error.",
        )
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args(sys.argv[1:])
    if arguments.command == "verify":
        configure_logging()
        try:
            sys.exit(asyncio.run(verify_main(arguments)))
        except ServiceError as exc:
            sys.exit(f"crm_svc verify: {exc.message}")
    main("crm_svc", serve_crm)
