"""What `python -m crm_svc` and `python -m provisioning_svc` share: settings,
tokens, metrics, the database, the server, and a clean exit on bad config."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from shared.auth import TokenFile
from shared.database import Database
from shared.database.connect import open_database
from shared.errors import ServiceError
from shared.logs import configure_logging
from shared.metrics import serve_metrics
from shared.server import BackgroundTask, Service, create_server, serve
from shared.settings import Settings


async def run_service(
    name: str,
    settings: Settings,
    *,
    listen: str,
    metrics_listen: str | None,
    error_domain: str,
    services: Callable[[Database], Sequence[Service]],
    background: Callable[[Database], Sequence[BackgroundTask]] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT; SIGHUP re-reads the tokens file.

    `background(db)` names work to run beside the server (started once it
    serves, cancelled and awaited when shutdown begins, before the database
    closes)."""
    if settings.auth_tokens_file is None:
        sys.exit("AUTH_TOKENS_FILE is not set: every call needs a caller listed there (see README)")
    tokens = TokenFile(settings.auth_tokens_file)
    serve_metrics(metrics_listen)
    db = await open_database(settings, application_name=name)
    try:
        handle = create_server(
            listen,
            services(db),
            tokens=tokens,
            error_domain=error_domain,
            database=db,
            tls=settings.server_tls,
            allow_insecure=settings.allow_insecure,
            admission=settings.admission,
        )
        # What start-up loaded lives as long as the process: out of the
        # collector's full passes, which otherwise scan it every ~20 s under
        # load and stall every call for ~30 ms (docs/design.md, "Admission").
        gc.collect()
        gc.freeze()
        await serve(
            handle,
            on_hangup=tokens.reload,
            background=background(db) if background is not None else (),
        )
    finally:
        await db.close()


def main(name: str, run: Callable[[Settings], Coroutine[Any, Any, None]]) -> None:
    """Configure logging, run `run(settings)`; configuration errors exit with their message."""
    configure_logging()
    try:
        asyncio.run(run(Settings.from_env()))
    except ServiceError as exc:
        sys.exit(f"{name}: {exc.message}")
