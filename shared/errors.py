"""The typed errors that cross layers (docs/design.md, "Errors").

Domain code and transports raise these; `shared.status` turns them into gRPC
statuses in one place. They know nothing of gRPC. `reason` becomes the
ErrorInfo reason (UPPER_SNAKE_CASE), `metadata` its metadata; messages must
never contain secrets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


class ServiceError(Exception):
    default_reason: ClassVar[str] = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        details: Sequence[Any] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})
        # Extra protobuf messages to attach to the status (e.g. a partial result).
        self.details: list[Any] = list(details)


class InvalidArgument(ServiceError):
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, field: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.field = field


class Unauthenticated(ServiceError):
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    default_reason = "PERMISSION_DENIED"


class NotFound(ServiceError):
    default_reason = "NOT_FOUND"


class FailedPrecondition(ServiceError):
    default_reason = "FAILED_PRECONDITION"


class Aborted(ServiceError):
    default_reason = "ABORTED"


class DeadlineExceeded(ServiceError):
    default_reason = "DEADLINE_EXCEEDED"


class Unavailable(ServiceError):
    default_reason = "UNAVAILABLE"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s


class ResourceExhausted(ServiceError):
    """The server is at capacity: the call was refused before it started
    (docs/design.md, "Admission"). Safe to retry after `retry_after_s`."""

    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s


class Unimplemented(ServiceError):
    """The method exists on the server but is not open to callers (see the access table)."""

    default_reason = "UNIMPLEMENTED"


class Internal(ServiceError):
    default_reason = "INTERNAL"
