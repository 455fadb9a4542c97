"""Background upkeep of the pipeline aggregates (database/migrations/0002_pipeline_summary.sql).

Writers to `clients` and `quotes` only append rows to `pipeline_deltas`;
`pipeline_summary` stays exact by adding a tenant's pending deltas to its
aggregates, or by recomputing the tenant when that is cheaper. The CRM service
keeps the backlog small (`run_compactor`):

- `pipeline_compact(p_max_deltas)` folds committed deltas into the aggregates,
  shared fairly over the tenants that have some; it is called again at once
  while deltas remain, otherwise after a short pause;
- tenants it lists for a rebuild (a bulk statement marked them, or their
  backlog costs more to fold than to recompute) are rebuilt one at a time,
  largest backlog first, in a task of their own with their own budget, so
  that folding the other tenants goes on meanwhile;
- every few seconds the largest backlogs are counted for the gauges;
- after a large backlog is gone, the log is vacuumed at once (direct
  transport): the dead entries of deleted deltas slow down every read of
  their tenant until then.

All of it is safe in several replicas at once (a tenant being compacted or
rebuilt elsewhere is skipped, never waited for), and a call cut short applies
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from shared.database import Database
from shared.deadline import Deadline
from shared.errors import Internal, ServiceError, Unavailable
from shared.logs import kv
from shared.metrics import (
    PIPELINE_BACKLOG_DELTAS,
    PIPELINE_BACKLOG_TOTAL,
    PIPELINE_COMPACTION_ERRORS,
    PIPELINE_COMPACTION_LAST_SUCCESS,
    PIPELINE_DELTAS_COMPACTED,
    PIPELINE_REBUILDS,
)

log = logging.getLogger(__name__)

OPERATION = "pipeline_compact"
# After a failed call, wait this long before the next one, doubling up to the maximum.
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 5.0
# On a read-only database (a replica) compaction cannot run: look again this
# rarely, in case it is promoted.
READ_ONLY_RETRY_S = 60.0
READ_ONLY_HINT = (
    "a read replica cannot compact: set CRM_PIPELINE_COMPACT_INTERVAL_S=0 on the crm_svc"
    " serving it and keep one compacting on the primary"
)
# Deleted deltas leave dead entries that every read of their tenant steps
# over until a VACUUM: 1M of them cost a read 30 ms. After this many, the
# compactor vacuums the log itself (autovacuum may take a minute to come by).
VACUUM_AFTER_DELTAS = 100_000
DELTA_LOG = "pipeline_deltas"
# How often the largest backlogs are counted for the gauges, and how many.
BACKLOG_REPORT_INTERVAL_S = 5.0
BACKLOG_REPORT_TOP = 10


@dataclass(frozen=True)
class Compaction:
    """What one `pipeline_compact` call did."""

    compacted: int  # deltas folded into the aggregates
    tenants: int  # tenants compacted
    busy: int  # tenants skipped: another compaction, a rebuild or a status change held them
    discarded: int  # deltas of tenants that no longer exist, dropped
    more: bool  # deltas are left: call again
    rebuild: tuple[str, ...] = ()  # tenants to rebuild rather than fold, largest backlog first


@dataclass(frozen=True)
class Rebuild:
    """What one `pipeline_rebuild_if_needed` call did."""

    rebuilt: bool
    busy: bool  # another replica holds the tenant
    forgotten: int  # deltas (and marks) the rebuild made unnecessary


@dataclass(frozen=True)
class Backlog:
    """The pending deltas: in all, and the largest tenants' (largest first)."""

    total: int
    tenants: tuple[tuple[str, int], ...]


async def compact_pipeline(db: Database, deadline: Deadline, *, max_deltas: int) -> Compaction:
    """Fold committed deltas into the aggregates, in one transaction.

    `max_deltas` is shared by the tenants taken (up to 200 per call, a random
    sample when more wait); a tenant's share can also take a few deltas that
    commit while the call runs.
    """
    document = await db.call(
        OPERATION, {"p_max_deltas": max_deltas}, deadline, cap_s=deadline.remaining()
    )
    return _parse(document)


def _parse(document: Any) -> Compaction:
    try:
        return Compaction(
            compacted=int(document["compacted"]),
            tenants=int(document["tenants"]),
            busy=int(document["busy"]),
            discarded=int(document["discarded"]),
            more=_boolean(document["more"]),
            rebuild=tuple(str(tenant) for tenant in document["rebuild"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise Internal(f"malformed {OPERATION} document: {exc!r}", reason="BAD_DB_RESULT") from None


async def rebuild_tenant(db: Database, tenant_id: str, deadline: Deadline) -> Rebuild:
    """Rebuild one tenant's aggregates from its rows, if it still needs it and
    no one else is at it (one transaction; a full scan of the tenant)."""
    document = await db.call(
        "pipeline_rebuild_if_needed",
        {"p_tenant_id": tenant_id},
        deadline,
        cap_s=deadline.remaining(),
        tenant_id=tenant_id,
    )
    try:
        return Rebuild(
            rebuilt=_boolean(document["rebuilt"]),
            busy=_boolean(document["busy"]),
            forgotten=int(document["forgotten"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise Internal(
            f"malformed pipeline_rebuild_if_needed document: {exc!r}", reason="BAD_DB_RESULT"
        ) from None


async def pipeline_backlog(db: Database, deadline: Deadline, *, top: int) -> Backlog:
    """Count the pending deltas, per tenant for the `top` largest."""
    document = await db.call("pipeline_backlog", {"p_top": top}, deadline)
    try:
        return Backlog(
            total=int(document["total"]),
            tenants=tuple(
                (str(item["tenant_id"]), int(item["deltas"])) for item in document["tenants"]
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise Internal(
            f"malformed pipeline_backlog document: {exc!r}", reason="BAD_DB_RESULT"
        ) from None


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"'more' is not a boolean: {value!r}")
    return value


async def run_compactor(
    db: Database,
    *,
    interval_s: float,
    max_deltas: int,
    budget_s: float,
    rebuild_budget_s: float = 300.0,
) -> None:
    """Compact until cancelled: at once again while deltas remain, else every `interval_s`.

    Tenants listed for a rebuild are rebuilt in a task of their own (one at
    a time, each within `rebuild_budget_s`) while folding goes on. A failed
    call is logged and retried after a growing pause (up to MAX_RETRY_S);
    nothing stops the loop but cancellation. Cancelling it abandons the calls
    in flight like any cancelled database call (the direct transport cancels
    the statement; either way a call that does not commit applies nothing).
    """
    if interval_s <= 0 or max_deltas < 1 or budget_s <= 0 or rebuild_budget_s <= 0:
        raise ValueError(
            "run_compactor needs interval_s > 0, max_deltas >= 1, budget_s > 0"
            " and rebuild_budget_s > 0"
        )
    log.info(
        kv(
            "pipeline_compactor_started",
            interval_ms=round(interval_s * 1000),
            batch=max_deltas,
            budget_ms=round(budget_s * 1000),
            rebuild_budget_ms=round(rebuild_budget_s * 1000),
            transport=db.name,
        )
    )
    failures = 0
    rebuilds: asyncio.Task[None] | None = None
    next_report = 0.0
    deleted = DeletedDeltas()
    try:
        while True:
            if time.monotonic() >= next_report:
                next_report = time.monotonic() + BACKLOG_REPORT_INTERVAL_S
                await _report_backlog(db, budget_s)
            try:
                result = await compact_pipeline(db, Deadline.after(budget_s), max_deltas=max_deltas)
            except Exception as exc:  # the loop must outlive any one failed call
                failures += 1
                pause = _retry_pause(exc, failures)
                _record_failure(exc, failures, pause)
                await asyncio.sleep(pause)
                continue
            PIPELINE_DELTAS_COMPACTED.inc(result.compacted)
            PIPELINE_COMPACTION_LAST_SUCCESS.set(time.time())
            deleted.count += result.compacted + result.discarded
            if deleted.count >= VACUUM_AFTER_DELTAS:
                await _vacuum_log(db, deleted, budget_s)
            if failures:
                log.info(kv("pipeline_compaction_recovered", failed_calls=failures))
                failures = 0
            if result.rebuild and (rebuilds is None or rebuilds.done()):
                rebuilds = asyncio.create_task(
                    _rebuild_tenants(db, result.rebuild, rebuild_budget_s, deleted),
                    name="pipeline_rebuilds",
                )
            # `more` with nothing done means the tenants left are all being
            # compacted elsewhere: do not spin on them.
            if result.more and result.compacted > 0:
                await asyncio.sleep(0)  # let the RPCs of this process run between batches
            else:
                await asyncio.sleep(interval_s)
    finally:
        if rebuilds is not None and not rebuilds.done():
            rebuilds.cancel()
            await asyncio.gather(rebuilds, return_exceptions=True)
        log.info(kv("pipeline_compactor_stopped"))


class DeletedDeltas:
    """Deltas deleted since the log was last vacuumed (by this process)."""

    def __init__(self) -> None:
        self.count = 0


async def _vacuum_log(db: Database, deleted: DeletedDeltas, budget_s: float) -> None:
    started = time.monotonic()
    try:
        ran = await db.vacuum(DELTA_LOG, Deadline.after(budget_s), cap_s=budget_s)
    except Exception as exc:  # autovacuum will do it: compaction goes on
        _record_failure(exc, 1, 0.0, event="pipeline_delta_log_vacuum_failed")
        return
    if ran:
        log.info(
            kv(
                "pipeline_delta_log_vacuumed",
                deleted_deltas=deleted.count,
                elapsed_ms=round((time.monotonic() - started) * 1000),
            )
        )
    deleted.count = 0


async def _rebuild_tenants(
    db: Database, tenants: tuple[str, ...], budget_s: float, deleted: DeletedDeltas
) -> None:
    """Rebuild each tenant in turn; a failure is logged and the next one tried
    (compaction lists a tenant again while it still needs a rebuild)."""
    for tenant_id in tenants:
        started = time.monotonic()
        try:
            result = await rebuild_tenant(db, tenant_id, Deadline.after(budget_s))
        except Exception as exc:  # the compactor must outlive any one failed rebuild
            PIPELINE_REBUILDS.labels("failed").inc()
            _record_failure(exc, 1, 0.0, event="pipeline_rebuild_failed", tenant=tenant_id)
            continue
        deleted.count += result.forgotten
        outcome = "rebuilt" if result.rebuilt else "busy" if result.busy else "not_needed"
        PIPELINE_REBUILDS.labels(outcome).inc()
        log.info(
            kv(
                "pipeline_rebuild",
                tenant=tenant_id,
                outcome=outcome,
                forgotten_deltas=result.forgotten,
                elapsed_ms=round((time.monotonic() - started) * 1000),
            )
        )


async def _report_backlog(db: Database, budget_s: float) -> None:
    """Set the backlog gauges; a failure only leaves them as they were."""
    try:
        backlog = await pipeline_backlog(db, Deadline.after(budget_s), top=BACKLOG_REPORT_TOP)
    except Exception as exc:  # gauges are best effort: compaction goes on
        _record_failure(exc, 1, 0.0, event="pipeline_backlog_failed")
        return
    PIPELINE_BACKLOG_TOTAL.set(backlog.total)
    PIPELINE_BACKLOG_DELTAS.clear()
    for tenant_id, deltas in backlog.tenants:
        PIPELINE_BACKLOG_DELTAS.labels(tenant_id).set(deltas)


def _read_only(exc: BaseException) -> bool:
    return isinstance(exc, ServiceError) and exc.reason == "READ_ONLY_DATABASE"


def _retry_pause(exc: BaseException, failures: int) -> float:
    if _read_only(exc):
        return READ_ONLY_RETRY_S
    pause = min(FIRST_RETRY_S * 2 ** min(failures - 1, 16), MAX_RETRY_S)
    if isinstance(exc, Unavailable):
        pause = max(pause, min(exc.retry_after_s, MAX_RETRY_S))
    return pause


def _record_failure(
    exc: BaseException,
    failures: int,
    pause: float,
    *,
    event: str = "pipeline_compaction_failed",
    **fields: Any,
) -> None:
    if isinstance(exc, ServiceError):
        PIPELINE_COMPACTION_ERRORS.labels(exc.reason).inc()
        log.warning(
            kv(
                event,
                **fields,
                reason=exc.reason,
                error=type(exc).__name__,
                message=exc.message,
                failed_calls=failures,
                retry_in_ms=round(pause * 1000),
                hint=READ_ONLY_HINT if _read_only(exc) else None,
            )
        )
        return
    # A bug, not an outage: keep the traceback, keep compacting.
    PIPELINE_COMPACTION_ERRORS.labels("UNEXPECTED").inc()
    log.error(
        kv(
            event,
            **fields,
            reason="UNEXPECTED",
            error=type(exc).__name__,
            failed_calls=failures,
            retry_in_ms=round(pause * 1000),
        ),
        exc_info=exc,
    )
