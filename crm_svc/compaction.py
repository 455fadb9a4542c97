"""Background compaction of the pipeline delta log (migration 0007).

Writers to `clients` and `quotes` only append rows to `pipeline_deltas`;
`pipeline_summary` stays exact by adding a tenant's pending deltas to its
aggregates, but the more are pending the slower it gets. The SQL function
`pipeline_compact(p_max_deltas)` folds committed deltas into the aggregates.
The CRM service calls it continuously (`run_compactor`): again at once while
deltas remain, otherwise after a short pause. Compaction is idempotent and
safe to run in several replicas at once (a tenant being compacted elsewhere
is skipped, never waited for), and a call cut short applies nothing.
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
    PIPELINE_COMPACTION_ERRORS,
    PIPELINE_COMPACTION_LAST_SUCCESS,
    PIPELINE_DELTAS_COMPACTED,
)

log = logging.getLogger(__name__)

OPERATION = "pipeline_compact"
# After a failed call, wait this long before the next one, doubling up to the maximum.
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 5.0


@dataclass(frozen=True)
class Compaction:
    """What one `pipeline_compact` call did."""

    compacted: int  # deltas folded into the aggregates
    tenants: int  # tenants compacted
    busy: int  # tenants skipped: another compaction, a rebuild or a status change held them
    discarded: int  # deltas of tenants that no longer exist, dropped
    more: bool  # deltas are left: call again


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
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise Internal(f"malformed {OPERATION} document: {exc!r}", reason="BAD_DB_RESULT") from None


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"'more' is not a boolean: {value!r}")
    return value


async def run_compactor(
    db: Database, *, interval_s: float, max_deltas: int, budget_s: float
) -> None:
    """Compact until cancelled: at once again while deltas remain, else every `interval_s`.

    A failed call is logged and retried after a growing pause (up to
    MAX_RETRY_S); nothing stops the loop but cancellation. Cancelling it
    abandons the call in flight like any cancelled database call (the direct
    transport cancels the statement; either way a call that does not commit
    applies nothing).
    """
    if interval_s <= 0 or max_deltas < 1 or budget_s <= 0:
        raise ValueError("run_compactor needs interval_s > 0, max_deltas >= 1 and budget_s > 0")
    log.info(
        kv(
            "pipeline_compactor_started",
            interval_ms=round(interval_s * 1000),
            batch=max_deltas,
            budget_ms=round(budget_s * 1000),
            transport=db.name,
        )
    )
    failures = 0
    try:
        while True:
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
            if failures:
                log.info(kv("pipeline_compaction_recovered", failed_calls=failures))
                failures = 0
            # `more` with nothing done means the tenants left are all being
            # compacted elsewhere: do not spin on them.
            if result.more and result.compacted > 0:
                await asyncio.sleep(0)  # let the RPCs of this process run between batches
            else:
                await asyncio.sleep(interval_s)
    finally:
        log.info(kv("pipeline_compactor_stopped"))


def _retry_pause(exc: BaseException, failures: int) -> float:
    pause = min(FIRST_RETRY_S * 2 ** min(failures - 1, 16), MAX_RETRY_S)
    if isinstance(exc, Unavailable):
        pause = max(pause, min(exc.retry_after_s, MAX_RETRY_S))
    return pause


def _record_failure(exc: BaseException, failures: int, pause: float) -> None:
    if isinstance(exc, ServiceError):
        PIPELINE_COMPACTION_ERRORS.labels(exc.reason).inc()
        log.warning(
            kv(
                "pipeline_compaction_failed",
                reason=exc.reason,
                error=type(exc).__name__,
                message=exc.message,
                failed_calls=failures,
                retry_in_ms=round(pause * 1000),
            )
        )
        return
    # A bug, not an outage: keep the traceback, keep compacting.
    PIPELINE_COMPACTION_ERRORS.labels("UNEXPECTED").inc()
    log.error(
        kv(
            "pipeline_compaction_failed",
            reason="UNEXPECTED",
            error=type(exc).__name__,
            failed_calls=failures,
            retry_in_ms=round(pause * 1000),
        ),
        exc_info=exc,
    )
