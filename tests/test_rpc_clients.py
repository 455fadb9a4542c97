"""The service clients: downstream timeout, credentials, typed errors.

grpc_testing plays the server, on its strict fake time, which the clients read
through their `clock` parameter so that timeouts are exact. Two gaps of
grpc_testing are bridged by `RecordingChannel`: its channel drops the timeout
of a call (`take_unary_unary` gives metadata and request only, and its
`time_remaining()` raises NotImplementedError), so the wrapper records it; and
its channel only blocks, so for the async clients the wrapper runs the
blocking call on a thread and hands back an awaitable. (`grpc.intercept_channel`
cannot do the recording: it passes `wait_for_ready`, which grpc_testing rejects.)
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc_testing
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2

from shared.auth import Caller
from shared.deadline import MIN_BUDGET_S, Deadline
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
from shared.inbound_rpc import INBOUND_RPC, InboundRpc
from shared.proto_gen.crm.v1 import crm_pb2
from shared.proto_gen.provisioning.v1 import provisioning_pb2
from shared.rpc_clients import (
    DOWNSTREAM_MARGIN_S,
    WIRE_HEADROOM_S,
    CrmClient,
    CrmSyncClient,
    ProvisioningClient,
    ProvisioningSyncClient,
    wire_timeout,
)
from shared.status import DETAILS_KEY, to_rpc_status

T = TypeVar("T")

CRM = crm_pb2.DESCRIPTOR.services_by_name["CrmService"]
PROVISIONING = provisioning_pb2.DESCRIPTOR.services_by_name["ProvisioningService"]
TOKEN = "calling-service-token-0123456789"
REQUEST_ID = "6f1c2f0e-8a4b-4d5e-9f60-1a2b3c4d5e6f"
DOMAIN = "crm.travel-agency.internal"
START = 1_000.0  # fake time at the start of each test
# The caller of the inbound RPC a helper call is made in (its scopes do not matter here).
SERVING_CALLER = Caller("serving-test", frozenset(), None)
GIVE_UP_S = 5.0  # real time a test waits for a call or an answer


def in_thread(function: Callable[[], T]) -> Future[T]:
    """Run `function` on a daemon thread, in a copy of this context (like
    asyncio.to_thread), so a test that fails cannot hang the run on it."""
    future: Future[T] = Future()
    context = contextvars.copy_context()

    def run() -> None:
        try:
            future.set_result(context.run(function))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


class RecordingChannel:
    """grpc_testing's channel, recording each call's timeout; awaitable for aio."""

    def __init__(self, testing: grpc_testing.Channel, *, awaitable: bool) -> None:
        self.testing = testing
        self.timeouts: list[float | None] = []
        self._awaitable = awaitable

    def unary_unary(
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool = False,
    ) -> Callable[..., Any]:
        blocking = self.testing.unary_unary(method, request_serializer, response_deserializer)

        def call(request: Any, timeout: float | None = None, metadata: Any = None) -> Any:
            self.timeouts.append(timeout)
            return blocking(request, timeout=timeout, metadata=metadata)

        def call_awaitable(
            request: Any, timeout: float | None = None, metadata: Any = None
        ) -> Awaitable[Any]:
            return asyncio.wrap_future(in_thread(lambda: call(request, timeout, metadata)))

        return call_awaitable if self._awaitable else call


@dataclass(frozen=True)
class ClientKind:
    """One client class and how to make its one call."""

    client_type: type
    awaitable: bool
    method: MethodDescriptor
    call: Callable[..., Any]  # (client, **kwargs) -> the call (a coroutine for async clients)
    response: Message
    default_timeout_s: float  # what the client sends without any deadline

    def __str__(self) -> str:
        return self.client_type.__name__

    def start(self, client: Any, **kwargs: Any) -> Awaitable[Any]:
        """Start the call; await the result to get the answer or the error."""
        call = (
            self.call(client, **kwargs)
            if self.awaitable
            else asyncio.wrap_future(in_thread(lambda: self.call(client, **kwargs)))
        )
        # A call that nobody answers fails the test instead of hanging it.
        return asyncio.ensure_future(asyncio.wait_for(call, GIVE_UP_S))


def _summary(client: Any, **kwargs: Any) -> Any:
    return client.pipeline_summary("acme", **kwargs)


def _deprovision(client: Any, **kwargs: Any) -> Any:
    return client.deprovision("acme", REQUEST_ID, **kwargs)


SUMMARY_METHOD = CRM.methods_by_name["PipelineSummary"]
DEPROVISION_METHOD = PROVISIONING.methods_by_name["Deprovision"]
SUMMARY = crm_pb2.PipelineSummaryResponse(tenant_id="acme", total_clients=7)
DEPROVISIONED = provisioning_pb2.DeprovisionResponse(
    tenant_id="acme", job_id="42", state=provisioning_pb2.JOB_STATE_COMPLETED
)
KINDS = [
    ClientKind(CrmClient, True, SUMMARY_METHOD, _summary, SUMMARY, 0.978),
    ClientKind(CrmSyncClient, False, SUMMARY_METHOD, _summary, SUMMARY, 0.978),
    ClientKind(
        ProvisioningClient,
        True,
        DEPROVISION_METHOD,
        _deprovision,
        DEPROVISIONED,
        59.898,  # 60 s - margin, rounded to the 100 ms wire step, less headroom
    ),
    ClientKind(
        ProvisioningSyncClient,
        False,
        DEPROVISION_METHOD,
        _deprovision,
        DEPROVISIONED,
        59.898,  # 60 s - margin, rounded to the 100 ms wire step, less headroom
    ),
]


@dataclass(frozen=True)
class Reply:
    """A status for the fake server to end a call with (grpc.Status has no constructor)."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, Any], ...] = ()


@dataclass
class Served:
    """What the fake server received."""

    metadata: dict[str, Any]
    request: Any
    timeout: float | None


class FakeService:
    """A client of one kind over grpc_testing, and the fake server's side."""

    def __init__(self, kind: ClientKind) -> None:
        self.kind = kind
        self.time = grpc_testing.strict_fake_time(START)
        self.channel = RecordingChannel(
            grpc_testing.channel([CRM, PROVISIONING], self.time), awaitable=kind.awaitable
        )
        self.client = kind.client_type(self.channel, TOKEN, clock=self.time.time)

    async def answer(
        self, status: grpc.Status | Reply | None = None, **kwargs: Any
    ) -> tuple[Served, Awaitable[Any]]:
        """Make the call and answer it with the kind's response, or with `status`."""
        outcome = self.kind.start(self.client, **kwargs)
        taken = in_thread(lambda: self.channel.testing.take_unary_unary(self.kind.method))
        metadata, request, rpc = await asyncio.wait_for(asyncio.wrap_future(taken), GIVE_UP_S)
        if status is None:
            rpc.terminate(self.kind.response, (), grpc.StatusCode.OK, "")
        else:
            rpc.terminate(None, status.trailing_metadata, status.code, status.details)
        return Served(dict(metadata), request, self.channel.timeouts[-1]), outcome


@contextmanager
def serving(deadline: Deadline | None) -> Iterator[None]:
    """As if inside an RPC admitted with `deadline` (None: outside any RPC)."""
    rpc = None if deadline is None else InboundRpc("/test/Method", SERVING_CALLER, deadline)
    token = INBOUND_RPC.set(rpc)
    try:
        yield
    finally:
        INBOUND_RPC.reset(token)


@pytest.fixture(params=KINDS, ids=str)
def service(request: pytest.FixtureRequest) -> FakeService:
    return FakeService(request.param)


# --- the timeout passed downstream -------------------------------------------------------


async def test_timeout_is_the_inbound_budget_less_the_margin(service: FakeService) -> None:
    with serving(Deadline(START + 2.0)):
        served, outcome = await service.answer()
        assert await outcome == service.kind.response
        # 2 s - the 20 ms margin, less the 2 ms wire headroom (1.98 s is a whole step).
        assert served.timeout == pytest.approx(1.978, abs=1e-9)

        service.time.sleep_for(1.5)
        served, outcome = await service.answer()
        await outcome
        assert served.timeout == pytest.approx(0.478, abs=1e-9)


async def test_timeout_is_rounded_down_to_what_the_wire_carries(service: FakeService) -> None:
    with serving(Deadline(START + 2.0)):
        service.time.sleep_for(0.0054)
        served, outcome = await service.answer()
        await outcome
    # 1.9746 s left after the margin: grpc would send 1.98 s, so send 1.97 s less headroom.
    assert served.timeout == pytest.approx(1.968, abs=1e-9)


@pytest.mark.parametrize(
    ("seconds", "sent"),
    [
        (0.4796, 0.477),  # 1 ms steps below 1 s
        (0.98, 0.978),
        (1.9746, 1.968),  # 10 ms steps below 10 s
        (59.98, 59.898),  # 100 ms steps below 100 s
        (150.7, 149.998),  # whole seconds below 1000 s
    ],
)
def test_wire_timeout_stays_below_the_next_step_down(seconds: float, sent: float) -> None:
    assert wire_timeout(seconds) == pytest.approx(sent, abs=1e-9)


async def test_without_any_deadline_the_client_default_applies(service: FakeService) -> None:
    served, outcome = await service.answer()
    await outcome
    assert served.timeout == pytest.approx(service.kind.default_timeout_s, abs=1e-9)


async def test_an_explicit_deadline_is_used(service: FakeService) -> None:
    served, outcome = await service.answer(deadline=Deadline(START + 3.0))
    await outcome
    assert served.timeout == pytest.approx(2.978, abs=1e-9)


async def test_an_explicit_deadline_can_only_shorten_the_inbound_one(
    service: FakeService,
) -> None:
    with serving(Deadline(START + 2.0)):
        served, outcome = await service.answer(deadline=Deadline(START + 0.5))
        await outcome
        assert served.timeout == pytest.approx(0.478, abs=1e-9)

        served, outcome = await service.answer(deadline=Deadline(START + 30.0))
        await outcome
        assert served.timeout == pytest.approx(1.978, abs=1e-9)


async def test_nothing_left_raises_without_calling(service: FakeService) -> None:
    # Just short of margin + floor: not enough for a useful call.
    almost_spent = Deadline(START + DOWNSTREAM_MARGIN_S + WIRE_HEADROOM_S + MIN_BUDGET_S - 0.001)
    with serving(almost_spent), pytest.raises(DeadlineExceeded) as caught:
        await service.kind.start(service.client)
    assert caught.value.reason == "BUDGET_EXHAUSTED"
    assert service.channel.timeouts == []


async def test_the_bearer_token_and_the_request_go_out(service: FakeService) -> None:
    served, outcome = await service.answer()
    await outcome
    assert served.metadata["authorization"] == f"Bearer {TOKEN}"
    assert served.request.tenant_id == "acme"


async def test_deprovision_sends_its_options() -> None:
    service = FakeService(KINDS[2])
    served, outcome = await service.answer(validate_only=True, allow_missing=True)
    await outcome
    assert served.request == provisioning_pb2.DeprovisionRequest(
        tenant_id="acme", request_id=REQUEST_ID, validate_only=True, allow_missing=True
    )


# --- failures into typed errors ----------------------------------------------------------

RICH_ERRORS: list[ServiceError] = [
    InvalidArgument("bad tenant id", field="tenant_id", reason="INVALID_TENANT_ID"),
    Unauthenticated("unknown credential", reason="INVALID_CREDENTIALS"),
    PermissionDenied(
        "lacks scope",
        reason="MISSING_SCOPE",
        metadata={"caller": "reporting", "scope": "crm.pipeline.read"},
    ),
    NotFound("no such tenant", reason="TENANT_NOT_FOUND", metadata={"tenant_id": "acme"}),
    FailedPrecondition("being deprovisioned", reason="TENANT_DEPROVISIONING"),
    Aborted("another call is at it", reason="DEPROVISION_IN_PROGRESS"),
    DeadlineExceeded("statement timeout", reason="STATEMENT_TIMEOUT"),
    Unavailable("database unreachable", reason="DB_UNAVAILABLE", retry_after_s=2.5),
]


@pytest.mark.parametrize("kind", KINDS[:2], ids=str)
@pytest.mark.parametrize("sent", RICH_ERRORS, ids=lambda e: type(e).__name__)
async def test_rich_status_becomes_the_same_typed_error(
    kind: ClientKind, sent: ServiceError
) -> None:
    service = FakeService(kind)
    _, outcome = await service.answer(to_rpc_status(sent, DOMAIN))
    with pytest.raises(ServiceError) as caught:
        await outcome
    received = caught.value
    assert type(received) is type(sent)
    assert (received.message, received.reason, received.metadata) == (
        sent.message,
        sent.reason,
        sent.metadata,
    )
    if isinstance(sent, InvalidArgument):
        assert isinstance(received, InvalidArgument) and received.field == sent.field
    if isinstance(sent, Unavailable):
        assert isinstance(received, Unavailable) and received.retry_after_s == sent.retry_after_s


async def test_internal_error_keeps_the_incident_not_the_cause() -> None:
    service = FakeService(KINDS[0])
    status = to_rpc_status(Internal("password=hunter2", reason="BAD_DB_RESULT"), DOMAIN)
    _, outcome = await service.answer(status)
    with pytest.raises(Internal) as caught:
        await outcome
    assert caught.value.reason == "BAD_DB_RESULT"
    assert caught.value.metadata["incident"] in caught.value.message
    assert "hunter2" not in caught.value.message


PLAIN_CODES: list[tuple[grpc.StatusCode, type[ServiceError]]] = [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
    (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied),
    (grpc.StatusCode.NOT_FOUND, NotFound),
    (grpc.StatusCode.FAILED_PRECONDITION, FailedPrecondition),
    (grpc.StatusCode.ABORTED, Aborted),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
    (grpc.StatusCode.UNAVAILABLE, Unavailable),
    # Admission control sheds with it (grpc also sends it for an oversized message).
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    (grpc.StatusCode.INTERNAL, Internal),
    # A method the server does not have, or does not open to callers.
    (grpc.StatusCode.UNIMPLEMENTED, Unimplemented),
    # Codes our services never send.
    (grpc.StatusCode.UNKNOWN, Internal),
    (grpc.StatusCode.CANCELLED, Internal),
]


@pytest.mark.parametrize("kind", KINDS[:2], ids=str)
@pytest.mark.parametrize(("code", "expected"), PLAIN_CODES, ids=lambda v: getattr(v, "name", ""))
async def test_status_without_details_maps_by_its_code(
    kind: ClientKind, code: grpc.StatusCode, expected: type[ServiceError]
) -> None:
    service = FakeService(kind)
    _, outcome = await service.answer(Reply(code, "went wrong"))
    with pytest.raises(ServiceError) as caught:
        await outcome
    assert type(caught.value) is expected
    assert (caught.value.message, caught.value.reason) == ("went wrong", code.name)
    if expected in (Unavailable, ResourceExhausted):
        # Without a RetryInfo: the default delay.
        assert isinstance(caught.value, Unavailable | ResourceExhausted)
        assert caught.value.retry_after_s == 1.0


async def test_details_contradicting_the_code_are_ignored() -> None:
    service = FakeService(KINDS[0])
    lying = to_rpc_status(InvalidArgument("x", field="tenant_id"), DOMAIN).trailing_metadata
    _, outcome = await service.answer(Reply(grpc.StatusCode.NOT_FOUND, "gone", lying))
    with pytest.raises(NotFound) as caught:
        await outcome
    assert (caught.value.message, caught.value.reason) == ("gone", "NOT_FOUND")


async def test_a_failed_deprovision_carries_the_partial_response() -> None:
    service = FakeService(KINDS[2])
    partial = provisioning_pb2.DeprovisionResponse(
        tenant_id="acme", job_id="42", state=provisioning_pb2.JOB_STATE_FAILED
    )
    sent = Unavailable("SendGrid unreachable", reason="SENDGRID_UNAVAILABLE", details=[partial])
    _, outcome = await service.answer(to_rpc_status(sent, "provisioning.travel-agency.internal"))
    with pytest.raises(Unavailable) as caught:
        await outcome
    assert caught.value.details == [partial]


async def test_details_of_unknown_types_are_dropped() -> None:
    service = FakeService(KINDS[0])
    rich = status_pb2.Status(code=grpc.StatusCode.ABORTED.value[0], message="busy")
    rich.details.add(type_url="type.googleapis.com/no.such.Message", value=b"\x08\x01")
    trailers = ((DETAILS_KEY, rich.SerializeToString()),)
    _, outcome = await service.answer(Reply(grpc.StatusCode.ABORTED, "busy", trailers))
    with pytest.raises(Aborted) as caught:
        await outcome
    assert (caught.value.message, caught.value.details) == ("busy", [])


# --- construction ------------------------------------------------------------------------


def test_no_plaintext_token_off_this_host() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        CrmClient.connect("10.1.2.3:50051", TOKEN)
    assert caught.value.reason == "INSECURE_CHANNEL"
    assert TOKEN not in caught.value.message


def test_a_client_needs_a_token() -> None:
    with pytest.raises(FailedPrecondition):
        CrmSyncClient(grpc_testing.channel([CRM], grpc_testing.strict_fake_time(0.0)), "")
