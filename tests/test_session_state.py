"""No SQL function keeps state in the session: behind a transaction pooler the
next transaction of the same session may run on another server connection,
and this one may serve another client. Transaction-scoped forms
(`set_config(..., true)`, `pg_advisory_xact_lock`, a function's own SET
clause) end with the transaction and are fine.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg

# Each pattern finds one session-scoped construct in a function body
# (comments removed, lower case).
SESSION_STATE = {
    "session-level set_config": re.compile(r"set_config\s*\([^;]*?,\s*(false|'f'|'false')\s*\)"),
    "session advisory lock": re.compile(r"\bpg_(try_)?advisory_lock(_shared)?\s*\("),
    "temporary table": re.compile(r"\bcreate\s+((global|local)\s+)?temp(orary)?\s+table"),
    "LISTEN/PREPARE/DISCARD": re.compile(r"\b(listen|unlisten|prepare|deallocate|discard)\s"),
    "SET without LOCAL": re.compile(
        r"(^|;|\bbegin|\bthen|\bloop|\belse)\s*set\s+(session\s+)?(?!local\b)[a-z_.]+\s*(=|to\b)"
    ),
}


def _body(source: str) -> str:
    return re.sub(r"--[^\n]*", "", source).lower()


def session_state(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """(function, construct) for every session-scoped construct in the public schema."""
    rows = conn.execute(
        "SELECT p.proname, p.prosrc FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace"
        " JOIN pg_language l ON l.oid = p.prolang"
        " WHERE n.nspname = 'public' AND l.lanname IN ('sql', 'plpgsql')"
        " ORDER BY 1"
    ).fetchall()
    found = []
    for name, source in rows:
        body = _body(source)
        found += [(name, what) for what, pattern in SESSION_STATE.items() if pattern.search(body)]
    return found


def test_no_sql_function_keeps_session_state(sql: psycopg.Connection[Any]) -> None:
    count = sql.execute(
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'public' AND p.proname IN ('pipeline_summary', 'deprovision_claim')"
    ).fetchone()
    assert count == (2,), "the migrated functions are not where the scan looks"
    assert session_state(sql) == []


def test_the_scan_finds_each_kind_of_session_state(database_url: str) -> None:
    bodies = {
        "session-level set_config": "PERFORM set_config('work_mem', '64MB', false);",
        "session advisory lock": "PERFORM pg_advisory_lock(1);",
        "temporary table": "CREATE TEMP TABLE scratch (x int);",
        "LISTEN/PREPARE/DISCARD": "LISTEN channel_name;",
        "SET without LOCAL": "SET work_mem = '64MB';",
    }
    with psycopg.connect(database_url) as conn:  # rolled back on exit
        for what, body in bodies.items():
            name = "scan_probe_" + re.sub(r"\W+", "_", what.lower()).strip("_")
            conn.execute(
                f"CREATE FUNCTION {name}() RETURNS void LANGUAGE plpgsql AS $$ BEGIN {body} END $$"
            )
        found = {(name, what) for name, what in session_state(conn) if name.startswith("scan_")}
        conn.rollback()
    assert {what for _, what in found} == set(bodies)
    # Transaction-scoped forms are not flagged.
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "CREATE FUNCTION scan_probe_fine() RETURNS void LANGUAGE plpgsql AS $$ BEGIN"
            " PERFORM set_config('statement_timeout', '5s', true);"
            " PERFORM pg_advisory_xact_lock(1);"
            " UPDATE tenants SET name = name WHERE false;"
            " SET LOCAL work_mem = '64MB'; END $$"
        )
        assert [f for f in session_state(conn) if f[0] == "scan_probe_fine"] == []
        conn.rollback()
