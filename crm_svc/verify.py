"""`python -m crm_svc verify`: compare the pipeline aggregates with a full recomputation.

The aggregates behind PipelineSummary are kept current by triggers and the
compactor (docs/pipeline.md); the check also counts the deltas not compacted
yet. This operator command checks them, tenant by tenant, against
`pipeline_summary_recompute` and against a recomputation of every aggregate
row (drift there is not always visible in the summary yet), each tenant in one database snapshot so that concurrent writes
never show up as drift. With `--repair` a drifting tenant is rebuilt online and
checked again.

On the Supabase REST transport no call runs longer than the API role's
statement_timeout (`Database.max_call_s`, 10 s), whatever `--timeout-s`
says: tenants are still checked one by one, each within that cap, and a
tenant whose check does not fit is reported as an error that says to check
it over DATABASE_URL (the database's direct connection) instead.

Exit status: 0 no drift, 1 drift found (repaired or not), 2 the check could not run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from shared.database import Database
from shared.deadline import Deadline
from shared.errors import DeadlineExceeded, ServiceError
from shared.tenants import parse_tenant_id

EXIT_OK = 0
EXIT_DRIFT = 1
EXIT_ERROR = 2
# A check recomputes the tenant: seconds at a million clients.
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class TenantCheck:
    tenant_id: str
    status: str
    checked: bool
    drift: bool
    mismatched_rows: dict[str, int]
    differences: tuple[str, ...]


def parse_check(document: dict[str, Any]) -> TenantCheck:
    checked = bool(document["checked"])
    differences: tuple[str, ...] = ()
    if checked and not document["summary_matches"]:
        differences = tuple(summary_differences(document["aggregated"], document["recomputed"]))
    rows = {table: int(count) for table, count in document.get("mismatched_rows", {}).items()}
    return TenantCheck(
        tenant_id=document["tenant_id"],
        status=document["status"],
        checked=checked,
        drift=bool(document.get("drift", False)),
        mismatched_rows={table: count for table, count in sorted(rows.items()) if count},
        differences=differences,
    )


def _amounts(items: list[dict[str, str]]) -> str:
    return ", ".join(f"{i['amount']} {i['currency']}" for i in items) or "nothing"


def summary_differences(aggregated: dict[str, Any], recomputed: dict[str, Any]) -> Iterator[str]:
    """What an operator needs to see: each field where the two summaries differ."""
    recomputed_stages = {s["stage"]: s for s in recomputed["stages"]}
    for stage in aggregated["stages"]:
        expected = recomputed_stages.get(stage["stage"], {})
        if stage["client_count"] != expected.get("client_count"):
            yield (
                f"{stage['stage']} clients: aggregates {stage['client_count']},"
                f" recomputed {expected.get('client_count')}"
            )
        if stage["value"] != expected.get("value"):
            yield (
                f"{stage['stage']} value: aggregates {_amounts(stage['value'])},"
                f" recomputed {_amounts(expected.get('value', []))}"
            )
    if aggregated["total_clients"] != recomputed["total_clients"]:
        yield (
            f"total clients: aggregates {aggregated['total_clients']},"
            f" recomputed {recomputed['total_clients']}"
        )
    if aggregated["open_value"] != recomputed["open_value"]:
        yield (
            f"open value: aggregates {_amounts(aggregated['open_value'])},"
            f" recomputed {_amounts(recomputed['open_value'])}"
        )


async def tenant_ids(db: Database, deadline: Deadline) -> list[str]:
    document = await db.call("pipeline_verify_tenants", {}, deadline)
    return [item["tenant_id"] for item in document]


async def check_tenant(db: Database, tenant_id: str, deadline: Deadline) -> TenantCheck:
    document = await db.call(
        "pipeline_verify",
        {"p_tenant_id": tenant_id},
        deadline,
        cap_s=deadline.remaining(),
        tenant_id=tenant_id,
    )
    return parse_check(document)


async def rebuild_tenant(db: Database, tenant_id: str, deadline: Deadline) -> None:
    await db.call(
        "pipeline_aggregates_rebuild",
        {"p_tenant_id": tenant_id},
        deadline,
        cap_s=deadline.remaining(),
        tenant_id=tenant_id,
    )


def describe(check: TenantCheck) -> list[str]:
    if not check.checked:
        return [f"{check.tenant_id}: skipped ({check.status}: not maintained, not readable)"]
    if not check.drift:
        return [f"{check.tenant_id}: ok"]
    lines = [f"{check.tenant_id}: DRIFT"]
    lines += [f"  {difference}" for difference in check.differences]
    if check.mismatched_rows:
        rows = ", ".join(f"{table} {count}" for table, count in check.mismatched_rows.items())
        lines.append(f"  aggregate rows differing from a recomputation: {rows}")
    return lines


def call_cap_note(db: Database, timeout_s: float) -> str | None:
    """What an operator must know when the transport cuts calls short of `timeout_s`."""
    if db.max_call_s is None or db.max_call_s >= timeout_s:
        return None
    return (
        f"the {db.name} transport runs one call for {db.max_call_s:g} s at most (the API role's"
        " statement_timeout), so each tenant's check and repair must fit in that; set"
        " DATABASE_URL (the direct connection) to check larger tenants"
    )


def error_line(db: Database, tenant: str, error: ServiceError, timeout_s: float) -> str:
    line = f"{tenant}: error ({error.reason}): {error.message}"
    if isinstance(error, DeadlineExceeded) and (note := call_cap_note(db, timeout_s)):
        line += f"; not checked: {note}"
    return line


async def verify(
    db: Database,
    *,
    tenant_id: str | None,
    repair: bool,
    timeout_s: float,
    emit: Callable[[str], None],
) -> int:
    """Check one tenant or every tenant; return the exit status."""
    try:
        if tenant_id is not None:
            tenants = [parse_tenant_id(tenant_id, field="--tenant")]
        else:
            tenants = await tenant_ids(db, Deadline.after(timeout_s))
    except ServiceError as exc:
        emit(f"error: {exc.message}")
        return EXIT_ERROR

    drifting: list[str] = []
    skipped = 0
    errors = 0
    for tenant in tenants:
        try:
            check = await check_tenant(db, tenant, Deadline.after(timeout_s))
            for line in describe(check):
                emit(line)
            if check.drift:
                drifting.append(tenant)
                if repair:
                    await rebuild_tenant(db, tenant, Deadline.after(timeout_s))
                    again = await check_tenant(db, tenant, Deadline.after(timeout_s))
                    emit(f"  repaired: {'ok' if not again.drift else 'STILL DRIFTING'}")
                    if again.drift:
                        errors += 1
            skipped += not check.checked
        except ServiceError as exc:
            # A tenant deleted meanwhile, a timeout: report it and go on with the others.
            emit(error_line(db, tenant, exc, timeout_s))
            errors += 1

    checked = len(tenants) - skipped - errors
    emit(
        f"{len(tenants)} tenant(s): {checked - len(drifting)} ok, {len(drifting)} drifting"
        + (" (repaired)" if repair and drifting and not errors else "")
        + f", {skipped} skipped, {errors} error(s)"
    )
    if errors:
        return EXIT_ERROR
    return EXIT_DRIFT if drifting else EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", help="check only this tenant (default: every tenant)")
    parser.add_argument(
        "--repair",
        action="store_true",
        help="rebuild the aggregates of a drifting tenant (online) and check it again",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"time allowed per tenant and step (default {DEFAULT_TIMEOUT_S:.0f})",
    )
