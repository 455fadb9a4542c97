"""Reading gRPC failures the way a caller would."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            assert status.code == error.code().value[0], (
                "status detail code differs from the RPC code"
            )
            return status
    raise AssertionError(
        f"no google.rpc.Status in the trailers of {error.code()}: {error.details()}"
    )


def detail(error: grpc.aio.AioRpcError, kind: type) -> object | None:
    for packed in rich_status(error).details:
        if packed.Is(kind.DESCRIPTOR):
            message = kind()
            packed.Unpack(message)
            return message
    return None


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    info = detail(error, error_details_pb2.ErrorInfo)
    assert isinstance(info, error_details_pb2.ErrorInfo), "status carries no ErrorInfo"
    return info
