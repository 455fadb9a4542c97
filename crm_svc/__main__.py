"""`python -m crm_svc`: serve CrmService on CRM_LISTEN.

`python -m crm_svc verify [--tenant T] [--repair]`: compare the pipeline
aggregates with a full recomputation (see crm_svc/verify.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from crm_svc import verify
from crm_svc.servicer import ERROR_DOMAIN, crm_service
from shared.auth import TokenRegistry
from shared.database.connect import open_database
from shared.errors import ServiceError
from shared.logs import configure_logging
from shared.server import create_server, serve
from shared.settings import Settings

log = logging.getLogger("crm_svc")


async def main() -> None:
    settings = Settings.from_env()
    if settings.auth_tokens_file is None:
        sys.exit("AUTH_TOKENS_FILE is not set: every call needs a caller listed there (see README)")
    tokens = TokenRegistry.load(settings.auth_tokens_file)
    db = await open_database(settings, application_name="crm_svc")
    try:
        handle = create_server(
            settings.crm_listen,
            [crm_service(db, settings.crm_default_deadline_s)],
            tokens=lambda: tokens,
            error_domain=ERROR_DOMAIN,
            allow_insecure=settings.allow_insecure,
        )
        await serve(handle)
    finally:
        await db.close()


async def verify_main(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    db = await open_database(settings, application_name="crm_svc_verify")
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
    configure_logging()
    arguments = parse_args(sys.argv[1:])
    try:
        if arguments.command == "verify":
            sys.exit(asyncio.run(verify_main(arguments)))
        asyncio.run(main())
    except ServiceError as exc:
        sys.exit(f"crm_svc: {exc.message}")
