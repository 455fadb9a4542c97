"""Client helpers for service-to-service calls (README, "Calling the services
from Python"; docs/design.md, "Deadlines").

`CrmClient` and `ProvisioningClient` (grpc.aio) and their blocking twins
`CrmSyncClient` and `ProvisioningSyncClient` (grpc.Channel) make one method
per RPC. Every call:

- gets a timeout from the explicit `Deadline` if one is given, else from the
  deadline of the inbound RPC being served (`shared.inbound_rpc`: the one
  Deadline the server boundary built for it, the service's default when its
  caller set none), else, outside any RPC, from the client default; an
  explicit deadline can only shorten the inbound one, so no call outlives the
  RPC it serves. `DOWNSTREAM_MARGIN_S` is kept back for handling the answer, and the
  rest is rounded down to what the grpc-timeout header carries exactly; when
  less than `MIN_BUDGET_S` would be left, DeadlineExceeded is raised and no
  call is made;
- sends `authorization: Bearer <token>`, the calling service's own credential
  (never logged, never part of an error);
- turns a failure into the `shared.errors` type the server raised, with its
  reason, metadata, field and retry delay (`shared.status.error_from_rpc`).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from functools import cached_property
from typing import ClassVar, Generic, Self, TypeVar

import grpc
from google.protobuf.message import Message

from shared.deadline import MIN_BUDGET_S, Deadline
from shared.errors import DeadlineExceeded, FailedPrecondition
from shared.inbound_rpc import inbound_deadline
from shared.proto_gen.crm.v1 import crm_pb2, crm_pb2_grpc
from shared.proto_gen.provisioning.v1 import provisioning_pb2, provisioning_pb2_grpc
from shared.server import is_loopback
from shared.status import error_from_rpc

# Kept back from the downstream timeout: the time this service needs to read
# the answer and reply to its own caller before that caller gives up.
DOWNSTREAM_MARGIN_S = 0.02
# The deadlines each proto tells callers to set; used outside any RPC when a
# call has no explicit deadline.
CRM_DEADLINE_S = 1.0
PROVISIONING_DEADLINE_S = 60.0

PIPELINE_SUMMARY = "crm.v1.CrmService/PipelineSummary"
DEPROVISION = "provisioning.v1.ProvisioningService/Deprovision"

Clock = Callable[[], float]  # must count like time.monotonic, as Deadline does
ChannelT = TypeVar("ChannelT", grpc.aio.Channel, grpc.Channel)
Response = TypeVar("Response", bound=Message)

# grpc sends the timeout in the grpc-timeout header rounded *up* to a step
# (grpc core, timeout_encoding.cc): (below this many seconds, step in ms);
# beyond the table, 100 s steps are safe.
_WIRE_STEPS_MS = ((1.0, 1), (10.0, 10), (100.0, 100), (1000.0, 1000), (10000.0, 10000))
# Before that, grpc rounds the deadline up to a whole ms and reads a cached
# clock: aiming this far below a step boundary keeps it from tipping over.
WIRE_HEADROOM_S = 0.002


def wire_timeout(seconds: float) -> float:
    """The longest timeout that reaches the server as at most `seconds`.

    Without this the server may believe it has up to a step more than we wait
    (100 ms for a 60 s call: more than the margin) and answer after we gave up.
    """
    ms = math.floor(seconds * 1000 + 1e-6)  # the epsilon absorbs float error
    step = next((step for below, step in _WIRE_STEPS_MS if seconds < below), 100_000)
    return ms // step * step / 1000 - WIRE_HEADROOM_S


def _check_plaintext(
    address: str, credentials: grpc.ChannelCredentials | None, insecure: bool
) -> None:
    # A bearer token in plaintext off this host can be read by anyone on the path.
    if credentials is None and not insecure and not is_loopback(address):
        raise FailedPrecondition(
            f"refusing to send a bearer token in plaintext to {address}; "
            "pass channel credentials or allow_insecure=True",
            reason="INSECURE_CHANNEL",
        )


class _ServiceClient(ABC, Generic[ChannelT]):
    """What every client shares: its channel, its credential and how long a
    call may take. The caller keeps owning a channel it passes in; `connect`
    opens one the client owns and closes."""

    # Timeout base outside any RPC, for a call without an explicit deadline.
    DEFAULT_DEADLINE_S: ClassVar[float]

    def __init__(
        self,
        channel: ChannelT,
        token: str,
        *,
        default_deadline_s: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if not token:
            raise FailedPrecondition(
                "a service client needs its service's bearer token", reason="MISSING_CLIENT_TOKEN"
            )
        self._channel = channel
        self._owns_channel = False
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._default_deadline_s = (
            self.DEFAULT_DEADLINE_S if default_deadline_s is None else default_deadline_s
        )
        self._clock = clock

    @classmethod
    @abstractmethod
    def _open_channel(cls, address: str, credentials: grpc.ChannelCredentials | None) -> ChannelT:
        """A channel of the kind this client uses (async or blocking)."""

    @classmethod
    def connect(
        cls,
        address: str,
        token: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        allow_insecure: bool = False,
        default_deadline_s: float | None = None,
    ) -> Self:
        """A client on a channel of its own to `address` (plaintext only to
        loopback unless `allow_insecure`); `close()`, `with` or `async with`
        closes it."""
        _check_plaintext(address, credentials, allow_insecure)
        client = cls(
            cls._open_channel(address, credentials), token, default_deadline_s=default_deadline_s
        )
        client._owns_channel = True
        return client

    def _timeout(self, method: str, deadline: Deadline | None) -> float:
        """Seconds `method` may take downstream (see the module docstring)."""
        expiries = [d.expires_at for d in (deadline, inbound_deadline()) if d is not None]
        remaining = min(expiries) - self._clock() if expiries else self._default_deadline_s
        timeout = wire_timeout(remaining - DOWNSTREAM_MARGIN_S)
        if timeout < MIN_BUDGET_S:
            raise DeadlineExceeded(
                f"deadline exhausted before calling {method}",
                reason="BUDGET_EXHAUSTED",
                metadata={"operation": method},
            )
        return timeout


class _AsyncClient(_ServiceClient[grpc.aio.Channel]):
    """A client over a grpc.aio channel."""

    @classmethod
    def _open_channel(
        cls, address: str, credentials: grpc.ChannelCredentials | None
    ) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(address)
        return grpc.aio.secure_channel(address, credentials)

    async def _invoke(
        self,
        method: str,
        rpc: Callable[..., Awaitable[Response]],
        request: Message,
        deadline: Deadline | None,
    ) -> Response:
        """Call `rpc` with the timeout and credential; failures as typed errors."""
        timeout = self._timeout(method, deadline)
        try:
            return await rpc(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as failure:
            raise error_from_rpc(failure) from failure

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _SyncClient(_ServiceClient[grpc.Channel]):
    """A client over a blocking grpc.Channel, for scripts and synchronous programs.

    Not for grpc.aio handlers: a blocking call would stall the event loop.
    """

    @classmethod
    def _open_channel(
        cls, address: str, credentials: grpc.ChannelCredentials | None
    ) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(address)
        return grpc.secure_channel(address, credentials)

    def _invoke(
        self,
        method: str,
        rpc: Callable[..., Response],
        request: Message,
        deadline: Deadline | None,
    ) -> Response:
        """Call `rpc` with the timeout and credential; failures as typed errors."""
        timeout = self._timeout(method, deadline)
        try:
            return rpc(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as failure:
            raise error_from_rpc(failure) from failure

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _deprovision_request(
    tenant_id: str, request_id: str, validate_only: bool, allow_missing: bool
) -> provisioning_pb2.DeprovisionRequest:
    return provisioning_pb2.DeprovisionRequest(
        tenant_id=tenant_id,
        request_id=request_id,
        validate_only=validate_only,
        allow_missing=allow_missing,
    )


class CrmClient(_AsyncClient):
    """Calls crm.v1.CrmService."""

    DEFAULT_DEADLINE_S = CRM_DEADLINE_S

    @cached_property
    def _stub(self) -> crm_pb2_grpc.CrmServiceStub:
        return crm_pb2_grpc.CrmServiceStub(self._channel)

    async def pipeline_summary(
        self, tenant_id: str, *, deadline: Deadline | None = None
    ) -> crm_pb2.PipelineSummaryResponse:
        request = crm_pb2.PipelineSummaryRequest(tenant_id=tenant_id)
        return await self._invoke(PIPELINE_SUMMARY, self._stub.PipelineSummary, request, deadline)


class ProvisioningClient(_AsyncClient):
    """Calls provisioning.v1.ProvisioningService.

    A failed Deprovision raises with the partial DeprovisionResponse in the
    error's `details`.
    """

    DEFAULT_DEADLINE_S = PROVISIONING_DEADLINE_S

    @cached_property
    def _stub(self) -> provisioning_pb2_grpc.ProvisioningServiceStub:
        return provisioning_pb2_grpc.ProvisioningServiceStub(self._channel)

    async def deprovision(
        self,
        tenant_id: str,
        request_id: str,
        *,
        validate_only: bool = False,
        allow_missing: bool = False,
        deadline: Deadline | None = None,
    ) -> provisioning_pb2.DeprovisionResponse:
        request = _deprovision_request(tenant_id, request_id, validate_only, allow_missing)
        return await self._invoke(DEPROVISION, self._stub.Deprovision, request, deadline)


class CrmSyncClient(_SyncClient):
    """Blocking CrmClient."""

    DEFAULT_DEADLINE_S = CRM_DEADLINE_S

    @cached_property
    def _stub(self) -> crm_pb2_grpc.CrmServiceStub:
        return crm_pb2_grpc.CrmServiceStub(self._channel)

    def pipeline_summary(
        self, tenant_id: str, *, deadline: Deadline | None = None
    ) -> crm_pb2.PipelineSummaryResponse:
        request = crm_pb2.PipelineSummaryRequest(tenant_id=tenant_id)
        return self._invoke(PIPELINE_SUMMARY, self._stub.PipelineSummary, request, deadline)


class ProvisioningSyncClient(_SyncClient):
    """Blocking ProvisioningClient."""

    DEFAULT_DEADLINE_S = PROVISIONING_DEADLINE_S

    @cached_property
    def _stub(self) -> provisioning_pb2_grpc.ProvisioningServiceStub:
        return provisioning_pb2_grpc.ProvisioningServiceStub(self._channel)

    def deprovision(
        self,
        tenant_id: str,
        request_id: str,
        *,
        validate_only: bool = False,
        allow_missing: bool = False,
        deadline: Deadline | None = None,
    ) -> provisioning_pb2.DeprovisionResponse:
        request = _deprovision_request(tenant_id, request_id, validate_only, allow_missing)
        return self._invoke(DEPROVISION, self._stub.Deprovision, request, deadline)
