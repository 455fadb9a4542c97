"""Deleting a tenant's SendGrid subuser with the official `sendgrid` library.

The library is blocking (urllib underneath), so each call runs in a worker
thread with the HTTP timeout taken from the deadline budget, and an
`asyncio.timeout` around it answers the caller on time. urllib's timeout is
per socket operation; a thread left behind by a timed-out call ends at its
own socket timeout (the DELETE is idempotent, so a late completion is
harmless).

The library builds URLs by joining path segments verbatim, so the subuser
name is validated strictly and percent-encoded before it becomes one.
The API key never appears in an error, a log line or a repr.
"""

from __future__ import annotations

import asyncio
import enum
import http.client
import logging
import re
import time
import urllib.error
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient

from shared.deadline import Deadline
from shared.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    ServiceError,
    Unavailable,
)
from shared.logs import timed_call
from shared.metrics import SENDGRID_CALLS

log = logging.getLogger(__name__)

# python_http_client logs every request's headers, bearer key included, at
# DEBUG: keep that logger above DEBUG whatever the root level is.
logging.getLogger("python_http_client").setLevel(logging.INFO)

# Also checked in SQL (deprovision_claim) before the tenant is marked.
SUBUSER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# One DELETE never gets more than this, whatever the deadline.
DELETE_CAP_S = 10.0
# Bounds for the RetryInfo delay of a 429.
MIN_RETRY_S = 1.0
MAX_RETRY_S = 3600.0
OPERATION = "sendgrid.delete_subuser"


class SubuserDeletion(enum.Enum):
    DELETED = "deleted"  # 2xx
    ABSENT = "absent"  # 404: already gone


def subuser_path_segment(name: str) -> str:
    """The subuser name as one URL path segment, or FailedPrecondition."""
    if not SUBUSER_NAME.fullmatch(name):
        raise FailedPrecondition(
            "the tenant's SendGrid subuser name is malformed; refusing to put it in a URL",
            reason="INVALID_SENDGRID_USERNAME",
        )
    return quote(name, safe="")


def parse_api_host(host: str) -> str:
    """SENDGRID_API_HOST: an http(s) origin without credentials, path or query."""
    parts = urlsplit(host)
    if (
        parts.scheme not in {"http", "https"}
        or not parts.hostname
        or parts.username is not None
        or parts.password is not None
        or parts.path not in {"", "/"}
        or parts.query
        or parts.fragment
    ):
        raise FailedPrecondition(
            "SENDGRID_API_HOST must be an http(s) origin such as https://api.sendgrid.com",
            reason="BAD_CONFIG",
        )
    return f"{parts.scheme}://{parts.netloc}"


def retry_after_s(headers: Mapping[str, str] | None, now: float | None = None) -> float:
    """Seconds until SendGrid's X-RateLimit-Reset (epoch seconds)."""
    now = time.time() if now is None else now
    raw = headers.get("X-RateLimit-Reset") if headers is not None else None
    try:
        reset = float(raw) if raw is not None else None
    except ValueError:
        reset = None
    if reset is None:
        return MIN_RETRY_S
    return min(max(reset - now, MIN_RETRY_S), MAX_RETRY_S)


class SendGridSubusers:
    """DELETE /v3/subusers/<name> against SENDGRID_API_HOST."""

    def __init__(
        self,
        api_key: str | None,
        host: str,
        *,
        dev_mode: bool = False,
        slow_call_ms: int = 3000,
    ) -> None:
        self._api_key = api_key
        self._host = parse_api_host(host)
        self._dev_mode = dev_mode
        self._slow_call_ms = slow_call_ms

    def __repr__(self) -> str:
        return f"SendGridSubusers(host={self._host!r}, key_set={self.has_key})"

    @property
    def has_key(self) -> bool:
        return bool(self._api_key)

    def require_usable(self) -> None:
        """No key is a configuration error, except in dev mode (the step is skipped)."""
        if not self.has_key and not self._dev_mode:
            raise FailedPrecondition(
                "SENDGRID_API_KEY is not configured; the SendGrid subuser cannot be deleted",
                reason="SENDGRID_NOT_CONFIGURED",
            )

    async def delete(
        self, name: str, deadline: Deadline, *, tenant_id: str | None = None
    ) -> SubuserDeletion:
        try:
            deletion = await self._delete(name, deadline, tenant_id)
        except ServiceError as error:
            SENDGRID_CALLS.labels(error.reason.removeprefix("SENDGRID_").lower()).inc()
            raise
        SENDGRID_CALLS.labels(deletion.value).inc()
        return deletion

    async def _delete(
        self, name: str, deadline: Deadline, tenant_id: str | None
    ) -> SubuserDeletion:
        segment = subuser_path_segment(name)
        if not self._api_key:
            raise FailedPrecondition(
                "SENDGRID_API_KEY is not configured", reason="SENDGRID_NOT_CONFIGURED"
            )
        budget = deadline.budget(DELETE_CAP_S, OPERATION)
        headers: Mapping[str, str] | None = None
        try:
            with timed_call(
                log,
                OPERATION,
                budget_s=budget,
                slow_ms=self._slow_call_ms,
                tenant_id=tenant_id,
                transport="sendgrid",
            ):
                async with asyncio.timeout(budget):
                    status = await asyncio.to_thread(
                        self._delete_blocking, self._api_key, segment, budget
                    )
        except HTTPError as exc:  # the library raises for every status >= 400
            status, headers = int(exc.status_code), exc.headers
        except TimeoutError:
            raise _timeout(budget) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise _timeout(budget) from None
            raise _unreachable() from None
        except (OSError, http.client.HTTPException):
            raise _unreachable() from None
        return _outcome(status, headers)

    def _delete_blocking(self, api_key: str, segment: str, timeout_s: float) -> int:
        # A client per call: the library's clients share a mutable header dict.
        client = SendGridAPIClient(api_key=api_key, host=self._host)
        response = client.client.subusers._(segment).delete(timeout=timeout_s)
        return int(response.status_code)


def _outcome(status: int, headers: Mapping[str, str] | None) -> SubuserDeletion:
    metadata = {"operation": OPERATION, "http_status": str(status)}
    if 200 <= status < 300:
        return SubuserDeletion.DELETED
    if status == 404:
        return SubuserDeletion.ABSENT
    if status in (401, 403):
        raise FailedPrecondition(
            f"SendGrid rejected our API key ({status}); check SENDGRID_API_KEY and its scopes",
            reason="SENDGRID_KEY_REJECTED",
            metadata=metadata,
        )
    if status == 429:
        delay = retry_after_s(headers)
        raise Unavailable(
            f"SendGrid rate limit reached; retry in {delay:.0f}s",
            reason="SENDGRID_RATE_LIMITED",
            retry_after_s=delay,
            metadata=metadata,
        )
    if status >= 500:
        raise Unavailable(
            f"SendGrid answered {status}; retry later",
            reason="SENDGRID_UNAVAILABLE",
            metadata=metadata,
        )
    raise Internal(
        f"unexpected SendGrid answer {status} to DELETE subuser",
        reason="SENDGRID_UNEXPECTED_STATUS",
        metadata=metadata,
    )


def _timeout(budget: float) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"SendGrid did not answer within {budget:.2f}s",
        reason="SENDGRID_TIMEOUT",
        metadata={"operation": OPERATION},
    )


def _unreachable() -> Unavailable:
    return Unavailable(
        "SendGrid unreachable", reason="SENDGRID_UNREACHABLE", metadata={"operation": OPERATION}
    )
