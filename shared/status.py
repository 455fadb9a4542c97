"""The one mapping from typed errors to gRPC statuses (design §4, AIP-193).

Every non-OK status carries a google.rpc.Status with an ErrorInfo; invalid
arguments add a BadRequest, retryable failures a RetryInfo.
"""

from __future__ import annotations

import logging
import uuid

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from shared.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

_CODES: dict[type[ServiceError], int] = {
    InvalidArgument: code_pb2.INVALID_ARGUMENT,
    Unauthenticated: code_pb2.UNAUTHENTICATED,
    PermissionDenied: code_pb2.PERMISSION_DENIED,
    NotFound: code_pb2.NOT_FOUND,
    FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    Aborted: code_pb2.ABORTED,
    DeadlineExceeded: code_pb2.DEADLINE_EXCEEDED,
    Unavailable: code_pb2.UNAVAILABLE,
    Internal: code_pb2.INTERNAL,
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_rpc_status(error: ServiceError, domain: str) -> grpc.Status:
    code = next(c for cls, c in _CODES.items() if isinstance(error, cls))
    message = error.message
    metadata = dict(error.metadata)
    if isinstance(error, Internal):
        # The caller gets an incident id; the cause stays in our logs.
        incident = uuid.uuid4().hex[:12]
        log.error("internal error incident=%s reason=%s: %s", incident, error.reason, error.message)
        message = f"internal error (incident {incident})"
        metadata = {"incident": incident}
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=metadata))
    ]
    if isinstance(error, InvalidArgument):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.message
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if isinstance(error, Unavailable):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_s * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    details.extend(_pack(extra) for extra in error.details)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))


def internal_error(exc: BaseException) -> Internal:
    return Internal(f"{exc.__class__.__name__}: {exc}", reason="INTERNAL")
