"""The one mapping between typed errors and gRPC statuses (docs/design.md, "Errors";
Google AIP-193).

Every non-OK status carries a google.rpc.Status with an ErrorInfo; invalid
arguments add a BadRequest, retryable failures (UNAVAILABLE, RESOURCE_EXHAUSTED)
a RetryInfo. `error_from_rpc`
is the way back, for callers of our services (shared.rpc_clients).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import grpc
from google.protobuf import any_pb2, descriptor_pool, duration_pb2, message_factory
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
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
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
    ResourceExhausted: code_pb2.RESOURCE_EXHAUSTED,
    Unimplemented: code_pb2.UNIMPLEMENTED,
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
    if isinstance(error, Unavailable | ResourceExhausted):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_s * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    details.extend(_pack(extra) for extra in error.details)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=details))


def internal_error(exc: BaseException) -> Internal:
    return Internal(f"{exc.__class__.__name__}: {exc}", reason="INTERNAL")


DETAILS_KEY = "grpc-status-details-bin"
_ERRORS: dict[int, type[ServiceError]] = {code: cls for cls, code in _CODES.items()}


@runtime_checkable
class RpcFailure(Protocol):
    """What a failed call tells its caller (grpc.aio.AioRpcError, a sync grpc.Call)."""

    def code(self) -> grpc.StatusCode: ...

    def details(self) -> str | None: ...

    def trailing_metadata(self) -> Any: ...


def _rich_status(failure: RpcFailure, code: grpc.StatusCode) -> status_pb2.Status | None:
    trailers: Iterable[tuple[str, Any]] = failure.trailing_metadata() or ()
    for key, value in trailers:
        if key == DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            # Details that contradict the status code are not to be trusted.
            return status if status.code == code.value[0] else None
    return None


def _unpack(packed: any_pb2.Any) -> Any | None:
    """The message inside `packed`, if its type is known to this process."""
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(packed.TypeName())
    except KeyError:
        return None
    message = message_factory.GetMessageClass(descriptor)()
    packed.Unpack(message)
    return message


def error_from_rpc(failure: grpc.RpcError) -> ServiceError:
    """The typed error for a failed call: the inverse of `to_rpc_status`.

    ErrorInfo gives the reason and metadata, BadRequest the field, RetryInfo the
    delay; other details of known types (e.g. a partial DeprovisionResponse)
    land in `details`. A status without details maps by its code alone; codes
    our services never send become Internal. The reason is then the code's name.
    """
    if not isinstance(failure, RpcFailure):
        return Internal(f"call failed without a status: {failure!r}", reason="UNKNOWN")
    code = failure.code()
    cls = _ERRORS.get(code.value[0], Internal)
    rich = _rich_status(failure, code)
    message = rich.message if rich is not None else (failure.details() or code.name)
    # Without an ErrorInfo: the code's name, which is also each class's default reason.
    reason = code.name
    metadata: dict[str, str] = {}
    field = ""
    retry_after_s: float | None = None
    extras: list[Any] = []
    for packed in rich.details if rich is not None else ():
        detail = _unpack(packed)
        if isinstance(detail, error_details_pb2.ErrorInfo):
            reason, metadata = detail.reason or reason, dict(detail.metadata)
        elif isinstance(detail, error_details_pb2.BadRequest):
            if detail.field_violations:
                field = detail.field_violations[0].field
        elif isinstance(detail, error_details_pb2.RetryInfo):
            retry_after_s = detail.retry_delay.ToNanoseconds() / 1e9
        elif detail is not None:
            extras.append(detail)
    if cls is InvalidArgument:
        return InvalidArgument(
            message, field=field, reason=reason, metadata=metadata, details=extras
        )
    if cls in (Unavailable, ResourceExhausted) and retry_after_s is not None:
        retryable = Unavailable if cls is Unavailable else ResourceExhausted
        return retryable(
            message,
            retry_after_s=retry_after_s,
            reason=reason,
            metadata=metadata,
            details=extras,
        )
    return cls(message, reason=reason, metadata=metadata, details=extras)
