"""SQLSTATE -> typed error, shared by both transports.

SQL functions signal domain errors with a SQLSTATE and put the ErrorInfo
reason in HINT (e.g. `USING ERRCODE = 'no_data_found', HINT = 'TENANT_NOT_FOUND'`).
"""

from __future__ import annotations

import re

from shared.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)

_REASON = re.compile(r"[A-Z][A-Z0-9_]{2,62}")


def error_from_sqlstate(
    sqlstate: str | None, message: str, hint: str | None, operation: str
) -> ServiceError:
    state = sqlstate or ""
    reason = hint if hint and _REASON.fullmatch(hint) else None
    metadata = {"operation": operation, "sqlstate": state}
    if state == "P0002":  # no_data_found
        return NotFound(message, reason=reason or "NOT_FOUND", metadata=metadata)
    if state == "CRM01":  # the write guard: the tenant is being deprovisioned
        return FailedPrecondition(message, reason="TENANT_DEPROVISIONING", metadata=metadata)
    if state == "55000":  # object_not_in_prerequisite_state
        return FailedPrecondition(message, reason=reason, metadata=metadata)
    if state == "55006":  # object_in_use: someone else holds the work
        return Aborted(message, reason=reason, metadata=metadata)
    if state in {"22023", "22P02", "23514"}:  # invalid parameter / text repr / check
        return InvalidArgument(message, field=reason or "request", reason=reason, metadata=metadata)
    if state == "57014":  # query_canceled: statement_timeout
        return DeadlineExceeded(
            "database statement timed out", reason="STATEMENT_TIMEOUT", metadata=metadata
        )
    if state == "55P03":  # lock_not_available: lock_timeout
        return DeadlineExceeded(
            "database lock wait timed out", reason="LOCK_TIMEOUT", metadata=metadata
        )
    if state == "25006":  # read_only_sql_transaction: a read replica, or a primary in recovery
        return FailedPrecondition(
            "the database is read-only (a replica?)", reason="READ_ONLY_DATABASE", metadata=metadata
        )
    if state in {"40001", "40P01"}:  # serialization failure, deadlock: retryable
        return Unavailable(
            "database transaction conflict, retry", reason="DB_CONFLICT", metadata=metadata
        )
    if state.startswith("08") or state in {"57P01", "57P02", "57P03", "53300"}:
        return Unavailable("database unavailable", reason="DB_UNAVAILABLE", metadata=metadata)
    # Unexpected: the message goes to the log through Internal, not to the caller.
    return Internal(f"database error {state}: {message}", reason="DB_ERROR", metadata=metadata)
