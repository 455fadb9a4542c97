"""The pipeline summary of one tenant (semantics: README, "Pipeline aggregates").

All counting and summing happens in the SQL function `pipeline_summary`;
this module validates, checks the caller's tenant restriction, calls it and
types the answer. The caller's scope was checked at the server boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

from shared.auth import Caller
from shared.database import Database
from shared.deadline import Deadline
from shared.errors import Internal
from shared.tenants import parse_tenant_id

STAGES = ("QUOTED", "NEGOTIATING", "BOOKED", "PAID", "TRAVELLED", "LOST")
# One summary is a single aggregate statement; give it at most this long.
SUMMARY_CAP_S = 10.0


class Amount(NamedTuple):
    """An exact amount in one currency (a tuple: cheap to build, many per summary)."""

    currency: str
    value: Decimal


@dataclass(frozen=True)
class StageTotal:
    stage: str
    client_count: int
    value: tuple[Amount, ...]
    open: bool


@dataclass(frozen=True)
class PipelineSummary:
    tenant_id: str
    stages: tuple[StageTotal, ...]
    total_clients: int
    open_value: tuple[Amount, ...]
    computed_at: datetime


async def pipeline_summary(
    db: Database, caller: Caller, tenant_id: str, deadline: Deadline
) -> PipelineSummary:
    tenant_id = parse_tenant_id(tenant_id)
    caller.require_tenant(tenant_id)
    document = await db.call(
        "pipeline_summary",
        {"p_tenant_id": tenant_id},
        deadline,
        cap_s=SUMMARY_CAP_S,
        tenant_id=tenant_id,
    )
    return _parse(tenant_id, document)


def _amounts(items: list[dict[str, Any]]) -> tuple[Amount, ...]:
    return tuple(Amount(item["currency"], Decimal(item["amount"])) for item in items)


def _parse(tenant_id: str, document: Any) -> PipelineSummary:
    try:
        stages = tuple(
            StageTotal(
                stage=s["stage"],
                client_count=int(s["client_count"]),
                value=_amounts(s["value"]),
                open=bool(s["open"]),
            )
            for s in document["stages"]
        )
        summary = PipelineSummary(
            tenant_id=tenant_id,
            stages=stages,
            total_clients=int(document["total_clients"]),
            open_value=_amounts(document["open_value"]),
            computed_at=datetime.fromisoformat(document["computed_at"]),
        )
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        raise Internal(
            f"malformed pipeline_summary document: {exc!r}", reason="BAD_DB_RESULT"
        ) from None
    if tuple(s.stage for s in summary.stages) != STAGES:
        raise Internal("pipeline_summary returned unexpected stages", reason="BAD_DB_RESULT")
    return summary
