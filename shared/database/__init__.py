"""The timeout-guarded Supabase adapter (docs/design.md, "Deadlines" and "Pooling").

All data access is a call of one SQL function that returns one jsonb value.
Two transports implement `Database`: `PostgresDatabase` (psycopg, direct) and
the Supabase REST transport (PostgREST RPC). Both bound every call by the
caller's `Deadline` and raise only `shared.errors` types.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from shared.deadline import Deadline

# Default cap for one call; long operations pass their own.
DEFAULT_CALL_CAP_S = 10.0


class Database(Protocol):
    name: str
    # The longest one call can run on this transport whatever its budget
    # (REST: the API role's statement_timeout); None: only the budget bounds it.
    max_call_s: float | None

    async def call(
        self,
        function: str,
        args: Mapping[str, Any],
        deadline: Deadline,
        *,
        cap_s: float = DEFAULT_CALL_CAP_S,
        tenant_id: str | None = None,
    ) -> Any:
        """Run `function(**args)` within the budget and return its jsonb result."""
        ...

    async def ping(self, deadline: Deadline) -> None: ...

    async def vacuum(self, table: str, deadline: Deadline, *, cap_s: float) -> bool:
        """VACUUM one table now, skipping it if its lock is taken; False when
        the transport cannot (autovacuum then does it in its own time)."""
        ...

    async def close(self) -> None: ...
