"""A real PgBouncer in transaction mode, standing in for Supabase's pooler.

Supabase's pooler (port 6543) hands each transaction to whichever server
connection is free, as PgBouncer does with `pool_mode = transaction`: what a
client leaves on a connection between transactions (prepared statements,
session settings) is seen by other clients, or lost. Tests run the direct
transport through it to prove the services keep no such state; benchmarks
measure the services behind it.

PgBouncer is Debian's `pgbouncer` package. It refuses to run as root, so as
root it is started with `-u` as an unprivileged user: the owner of the
database's socket directory (who can reach the socket), else `nobody`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict

INSTALL_HINT = "pgbouncer is not installed (Debian: apt-get install pgbouncer)"
START_TIMEOUT_S = 10.0


def pgbouncer_binary() -> str | None:
    """The pgbouncer executable: on PATH, or where Debian puts it (/usr/sbin)."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    debian = Path("/usr/sbin/pgbouncer")
    return str(debian) if debian.exists() else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _run_as(host: str) -> str | None:
    """The user to drop to when root: who owns the socket directory, else nobody."""
    if os.geteuid() != 0:
        return None
    if host.startswith("/"):
        owner = pwd.getpwuid(os.stat(host).st_uid).pw_name
        if owner != "root":
            return owner
    return "nobody"


class Pooler:
    """PgBouncer (transaction mode) in front of the server `upstream_url` names."""

    def __init__(self, upstream_url: str, workdir: Path, *, pool_size: int = 20) -> None:
        self.upstream = conninfo_to_dict(upstream_url)
        self.workdir = workdir
        self.pool_size = pool_size
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "pgbouncer.log"

    def url(self, database: str) -> str:
        """A URL that reaches `database` through the pooler (any user name is accepted)."""
        return f"postgresql://pooled@127.0.0.1:{self.port}/{quote(database)}"

    def _config(self) -> str:
        upstream = {
            key: str(self.upstream[key])
            for key in ("host", "port", "user", "password")
            if self.upstream.get(key)
        }
        connect = " ".join(f"{key}={value}" for key, value in upstream.items())
        return "\n".join(
            [
                "[databases]",
                # Any database name: the same name on the upstream server, as its user.
                f"* = {connect}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {self.port}",
                "unix_socket_dir =",
                # The user name a client gives is ignored; the line above logs in.
                "auth_type = any",
                "pool_mode = transaction",
                f"default_pool_size = {self.pool_size}",
                "max_client_conn = 2000",
                # Retry a failed server login after 1 s (default 15 s), so a
                # restarted database is used again promptly.
                "server_login_retry = 1",
                "query_wait_timeout = 30",
                "log_connections = 0",
                "log_disconnections = 0",
                "",
            ]
        )

    def start(self) -> Pooler:
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.port = _free_port()
        config = self.workdir / "pgbouncer.ini"
        config.write_text(self._config())
        command = [binary]
        user = _run_as(str(self.upstream.get("host", "")))
        if user is not None:
            command += ["-u", user]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*command, str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        ends_at = time.monotonic() + START_TIMEOUT_S
        probe = self.url(str(self.upstream.get("dbname") or "postgres"))
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.log_path.read_text()[-2000:]}")
            try:
                with psycopg.connect(probe, connect_timeout=2, prepare_threshold=None) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > ends_at:
                    self.stop()
                    raise RuntimeError(
                        f"pgbouncer did not serve within {START_TIMEOUT_S}s:"
                        f" {self.log_path.read_text()[-2000:]}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
