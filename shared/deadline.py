"""Deadlines and budgets (docs/design.md, "Deadlines").

A `Deadline` is an absolute monotonic time: for an RPC, the caller's gRPC
deadline, or the service's default when the caller set none, built once at
the server boundary. Each outbound operation derives its *budget* from it:
the time it may take, capped per operation and short of the deadline by a
safety margin so that the server answers before the caller gives up.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from shared.errors import DeadlineExceeded
from shared.metrics import DEADLINE_EXHAUSTED

# Keep this much of the caller's time for building and sending the answer.
SAFETY_MARGIN_S = 0.02
# A budget below this cannot do useful work: fail fast instead of starting.
MIN_BUDGET_S = 0.005
# Remaining times above this are "no deadline" (grpc reports huge values for
# some clients), so the server default applies.
NO_DEADLINE_ABOVE_S = 24 * 3600.0


@dataclass(frozen=True)
class Deadline:
    expires_at: float  # time.monotonic() value

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @classmethod
    def from_caller(cls, remaining: float | None) -> Deadline | None:
        """The caller's deadline from `context.time_remaining()`; None if it set none."""
        if remaining is None or remaining > NO_DEADLINE_ABOVE_S:
            return None
        return cls.after(remaining)

    @classmethod
    def from_time_remaining(cls, remaining: float | None, default_s: float) -> Deadline:
        """Build from `context.time_remaining()`; None (no deadline) gets the default."""
        caller = cls.from_caller(remaining)
        return caller if caller is not None else cls.after(default_s)

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def budget(self, cap_s: float, operation: str = "operation") -> float:
        """Seconds `operation` may take: min(cap, remaining - margin).

        Raises DeadlineExceeded when that is too little to start.
        """
        budget = min(cap_s, self.remaining() - SAFETY_MARGIN_S)
        if budget < MIN_BUDGET_S:
            DEADLINE_EXHAUSTED.labels(operation).inc()
            raise DeadlineExceeded(
                f"deadline exhausted before {operation} could start",
                reason="BUDGET_EXHAUSTED",
                metadata={"operation": operation},
            )
        return budget
