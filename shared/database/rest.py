"""Supabase REST transport: supabase-py `AsyncClient`, PostgREST RPC.

Calls the same SQL functions as the direct transport, through `.rpc()`.
Bounded three ways, all from each call's budget: `asyncio.timeout` around the
HTTP call (which closes the connection on expiry); the request's own
`httpx.Timeout` (set from the budget header by a request hook: postgrest-py
offers no per-request timeout, and truncates plain numbers with int()); and,
because PostgREST does not cancel a query when its client goes away, the
budget as the `X-Statement-Timeout-Ms` header, which the
`apply_request_timeout()` pre-request function (migration 0004) turns into a
transaction-local statement_timeout. The client's own retries are off: a
retry's sleep could outlive the budget, and retrying is the caller's decision.

No call can run longer than service_role's own statement_timeout, which
PostgREST applies and a header can only shorten (`max_call_s`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import httpx
from postgrest.exceptions import APIError
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from shared.database import DEFAULT_CALL_CAP_S
from shared.database.errors import error_from_sqlstate
from shared.deadline import MIN_BUDGET_S, Deadline
from shared.errors import DeadlineExceeded, Internal, ServiceError, Unavailable
from shared.logs import timed_call

log = logging.getLogger(__name__)

BUDGET_HEADER = "X-Statement-Timeout-Ms"
CONNECT_TIMEOUT_S = 3.0
# For a request that carries no budget header (none of ours: calls carry one,
# the ping passes its own timeout).
CLIENT_TIMEOUT_S = DEFAULT_CALL_CAP_S
# service_role's statement_timeout (migration 0005_api_roles.sql).
SERVICE_ROLE_STATEMENT_TIMEOUT_S = 10.0
_SQLSTATE = re.compile(r"[0-9A-Z]{5}")
# Gateway answers without a PostgREST body (bad gateway, unavailable, timeout).
_GATEWAY_STATUSES = {"502", "503", "504", "520", "544"}


def error_from_api(error: APIError, operation: str) -> ServiceError:
    code = error.code or ""
    message = error.message or "PostgREST error"
    metadata = {"operation": operation, "code": code}
    if code in _GATEWAY_STATUSES:
        return Unavailable("database API unavailable", reason="DB_UNAVAILABLE", metadata=metadata)
    if _SQLSTATE.fullmatch(code) and not code.startswith("PGRST"):
        return error_from_sqlstate(code, message, error.hint, operation)
    # PGRSTxxx: PostgREST itself refused (schema cache, JWT, config) - our bug or setup.
    return Internal(
        f"PostgREST error {code}: {message}", reason="POSTGREST_ERROR", metadata=metadata
    )


def _http_timeout(seconds: float) -> httpx.Timeout:
    return httpx.Timeout(seconds, connect=min(CONNECT_TIMEOUT_S, seconds))


async def _timeout_from_budget(request: httpx.Request) -> None:
    """An httpx request hook: a call's request times out with its budget."""
    budget_ms = request.headers.get(BUDGET_HEADER)
    if budget_ms is not None:
        request.extensions["timeout"] = _http_timeout(int(budget_ms) / 1000).as_dict()


class SupabaseRestDatabase:
    name = "supabase-rest"

    def __init__(
        self,
        url: str,
        service_role_key: str,
        *,
        slow_call_ms: int = 3000,
        max_call_s: float = SERVICE_ROLE_STATEMENT_TIMEOUT_S,
    ) -> None:
        """`max_call_s`: the longest a call can run, whatever its budget: the
        statement_timeout PostgREST applies for service_role."""
        self._url = url
        self._key = service_role_key
        self._slow_call_ms = slow_call_ms
        self._max_call_s = max_call_s
        self._http = httpx.AsyncClient(
            timeout=_http_timeout(CLIENT_TIMEOUT_S),
            follow_redirects=False,
            event_hooks={"request": [_timeout_from_budget]},
        )
        self._client: AsyncClient | None = None

    @property
    def max_call_s(self) -> float:
        return self._max_call_s

    async def open(self) -> None:
        self._client = await acreate_client(
            self._url,
            self._key,
            options=AsyncClientOptions(
                httpx_client=self._http,
                postgrest_client_retry=False,
                auto_refresh_token=False,
                persist_session=False,
            ),
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def vacuum(self, table: str, deadline: Deadline, *, cap_s: float) -> bool:
        """PostgREST cannot run VACUUM (not a function, not in a transaction):
        autovacuum does it."""
        return False

    async def ping(self, deadline: Deadline) -> None:
        budget = deadline.budget(2.0, "ping")
        try:
            async with asyncio.timeout(budget):
                response = await self._http.get(
                    f"{self._url.rstrip('/')}/rest/v1/",
                    headers={"apikey": self._key},
                    timeout=_http_timeout(budget),
                )
        except (TimeoutError, httpx.TimeoutException):
            raise DeadlineExceeded("database API ping timed out", reason="DB_TIMEOUT") from None
        except httpx.TransportError:
            raise Unavailable("database API unreachable", reason="DB_UNAVAILABLE") from None
        if response.status_code >= 500:
            raise Unavailable("database API unavailable", reason="DB_UNAVAILABLE")

    async def call(
        self,
        function: str,
        args: Mapping[str, Any],
        deadline: Deadline,
        *,
        cap_s: float = DEFAULT_CALL_CAP_S,
        tenant_id: str | None = None,
    ) -> Any:
        if self._client is None:
            raise Internal("REST transport used before open()", reason="NOT_OPEN")
        budget = deadline.budget(min(cap_s, self._max_call_s), function)
        with timed_call(
            log,
            function,
            budget_s=budget,
            slow_ms=self._slow_call_ms,
            tenant_id=tenant_id,
            transport=self.name,
        ):
            return await self._call_bounded(function, args, budget, tenant_id)

    async def _call_bounded(
        self, function: str, args: Mapping[str, Any], budget: float, tenant_id: str | None
    ) -> Any:
        """Call within `budget` seconds; HTTP and PostgREST errors become typed errors."""
        assert self._client is not None
        started = time.monotonic()
        request = self._client.rpc(function, dict(args))
        try:
            async with asyncio.timeout(budget):
                # Computed last, so the database gets what is really left.
                left_ms = int((budget - (time.monotonic() - started)) * 1000)
                if left_ms < MIN_BUDGET_S * 1000:
                    raise DeadlineExceeded(
                        "deadline exhausted before the database call",
                        reason="BUDGET_EXHAUSTED",
                        metadata={"operation": function},
                    )
                request.request.headers[BUDGET_HEADER] = str(left_ms)
                response = await request.execute()
        except (TimeoutError, httpx.TimeoutException):
            raise DeadlineExceeded(
                "database call timed out", reason="DB_TIMEOUT", metadata={"operation": function}
            ) from None
        except httpx.TransportError:
            raise Unavailable(
                "database API unreachable",
                reason="DB_UNAVAILABLE",
                metadata={"operation": function},
            ) from None
        except APIError as exc:
            error = error_from_api(exc, function)
            if tenant_id is not None:
                error.metadata["tenant_id"] = tenant_id
            raise error from None
        return response.data
