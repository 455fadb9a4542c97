"""The one error -> status mapping."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from shared.errors import InvalidArgument, ResourceExhausted, Unavailable
from shared.status import internal_error, to_rpc_status


def decode(status: grpc.Status) -> status_pb2.Status:
    ((key, value),) = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    return status_pb2.Status.FromString(value)


def test_unexpected_errors_do_not_leak_their_cause() -> None:
    status = to_rpc_status(internal_error(RuntimeError("password=hunter2 at db.internal")), "d")
    assert status.code == grpc.StatusCode.INTERNAL
    assert "hunter2" not in status.details
    assert "hunter2" not in str(decode(status))
    assert "incident" in status.details


def test_invalid_argument_names_the_field() -> None:
    status = to_rpc_status(
        InvalidArgument("bad id", field="tenant_id", reason="INVALID_TENANT_ID"), "d"
    )
    rich = decode(status)
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert (
        rich.details[0].Unpack(info) and info.reason == "INVALID_TENANT_ID" and info.domain == "d"
    )
    assert rich.details[1].Unpack(bad) and bad.field_violations[0].field == "tenant_id"


def test_unavailable_says_when_to_retry() -> None:
    rich = decode(to_rpc_status(Unavailable("rate limited", retry_after_s=2.5), "d"))
    retry = error_details_pb2.RetryInfo()
    assert rich.details[1].Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 2500


def test_resource_exhausted_says_when_to_retry_and_why() -> None:
    shed = ResourceExhausted("at capacity", retry_after_s=0.25, reason="QUEUE_FULL")
    rich = decode(to_rpc_status(shed, "d"))
    assert rich.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert rich.details[0].Unpack(info) and (info.reason, info.domain) == ("QUEUE_FULL", "d")
    assert rich.details[1].Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 250
