"""Admission control: how many calls run at once, and which are refused at
once rather than left to wait (docs/design.md, "Admission").

A `ConcurrencyLimit` lets `limit` calls run; the next ones wait in a FIFO
queue of at most `max_queue`. A call is refused on arrival, with
`ResourceExhausted` (RESOURCE_EXHAUSTED + RetryInfo), when the queue is full
or when the wait it can expect (the work queued ahead of it, spread over the
limit's slots, from the recent service times of the methods waiting) and its
own service time do not fit in what is left of its deadline: such a call would
only spend its caller's budget and a database connection to end
DEADLINE_EXCEEDED. A call that finds a slot free is always served. A queued
call whose estimate proves wrong gives up (the same status) while it can
still answer in time.

`Admission` maps methods to their limit: every method shares the server's
general limit except those given a bound of their own (Deprovision: few,
long calls that must not take the slots of short reads). Health and
reflection never reach it (the boundary passes them through untouched).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared.deadline import SAFETY_MARGIN_S, Deadline
from shared.errors import ResourceExhausted
from shared.metrics import ADMISSION_IN_FLIGHT, ADMISSION_QUEUED, RPCS_SHED

# The general bound, as a multiple of the database pool: a call holds its slot
# also while it decodes, authenticates and encodes, so twice the pool keeps
# every connection busy without a queue inside the pool.
IN_FLIGHT_PER_POOL_CONNECTION = 2
# Queued calls per slot of the general bound: enough to ride out a burst at
# full throughput; the deadline rule, not this cap, usually decides.
QUEUED_PER_SLOT = 25
DEPROVISION_METHOD = "/provisioning.v1.ProvisioningService/Deprovision"
DEPROVISION_MAX_IN_FLIGHT = 2
DEPROVISION_MAX_QUEUED = 2
# Weight of the newest observation in a method's service-time average.
SERVICE_TIME_WEIGHT = 0.2
# RetryInfo's delay: the expected time for the queue to drain, within these.
MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 5.0

# Shed reasons (the ErrorInfo reason and the `reason` label of rpc_shed_total).
QUEUE_FULL = "QUEUE_FULL"
DEADLINE_BELOW_QUEUE_WAIT = "DEADLINE_BELOW_QUEUE_WAIT"
QUEUE_WAIT_EXPIRED = "QUEUE_WAIT_EXPIRED"


@dataclass
class ServiceTime:
    """A method's recent service time (time holding a slot), as a moving average."""

    seconds: float | None = None  # None until the first call ended

    def observe(self, seconds: float) -> None:
        if self.seconds is None:
            self.seconds = seconds
        else:
            self.seconds += SERVICE_TIME_WEIGHT * (seconds - self.seconds)

    @property
    def expected_s(self) -> float:
        return self.seconds or 0.0


@dataclass(eq=False)
class _Waiter:
    expected_s: float
    granted: asyncio.Future[None]


@dataclass
class ConcurrencyLimit:
    """At most `limit` calls at once; a FIFO queue of at most `max_queue` behind them."""

    name: str
    limit: int
    max_queue: int
    in_flight: int = 0
    _waiters: deque[_Waiter] = field(default_factory=deque)
    # The expected service times of the waiters, summed: the work ahead of a newcomer.
    _queued_work_s: float = 0.0

    def __post_init__(self) -> None:
        if self.limit < 1 or self.max_queue < 0:
            raise ValueError(f"{self.name}: limit must be >= 1 and max_queue >= 0")
        self._in_flight_gauge = ADMISSION_IN_FLIGHT.labels(self.name)
        self._queued_gauge = ADMISSION_QUEUED.labels(self.name)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def expected_wait_s(self, expected_s: float) -> float:
        """The wait a call arriving now can expect: the work queued ahead of it,
        and one call in flight finishing, spread over the slots."""
        return (self._queued_work_s + expected_s) / self.limit

    async def acquire(self, method: str, service: ServiceTime, deadline: Deadline) -> None:
        """Take a slot, or raise ResourceExhausted (at once, or when waiting longer
        would leave too little of the deadline to serve the call)."""
        expected_s = service.expected_s
        # Leave the boundary's margin for answering, as every budget does.
        spare_s = deadline.remaining() - SAFETY_MARGIN_S - expected_s
        if self.in_flight < self.limit and not self._waiters:
            # A free slot serves the call whatever its deadline: service times
            # differ between requests (tenant sizes, a resumable Deprovision
            # that does part of its work), and one refused on an average that
            # only served calls update could be refused for ever.
            self.in_flight += 1
            self._in_flight_gauge.set(self.in_flight)
            return
        wait_s = self.expected_wait_s(expected_s)
        if len(self._waiters) >= self.max_queue:
            raise self._shed(method, QUEUE_FULL, wait_s)
        if wait_s > spare_s:
            raise self._shed(method, DEADLINE_BELOW_QUEUE_WAIT, wait_s)
        waiter = _Waiter(expected_s, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._queued_work_s += expected_s
        self._queued_gauge.set(len(self._waiters))
        try:
            async with asyncio.timeout(max(spare_s, 0.0)):
                await waiter.granted
        except TimeoutError:
            if self._holds_slot(waiter):
                return  # granted as the timer fired: serve it
            self._forget(waiter)
            raise self._shed(method, QUEUE_WAIT_EXPIRED, self.expected_wait_s(0.0)) from None
        except BaseException:
            # Cancelled while waiting (the caller left): pass on a slot it was handed.
            if self._holds_slot(waiter):
                self.release()
            else:
                self._forget(waiter)
            raise

    def release(self) -> None:
        """End a call's slot: it passes to the first waiter still waiting."""
        while self._waiters:
            waiter = self._waiters.popleft()
            self._queued_work_s = max(0.0, self._queued_work_s - waiter.expected_s)
            if not waiter.granted.done():
                waiter.granted.set_result(None)
                self._queued_gauge.set(len(self._waiters))
                return
        self._queued_gauge.set(0)
        self.in_flight -= 1
        self._in_flight_gauge.set(self.in_flight)

    @staticmethod
    def _holds_slot(waiter: _Waiter) -> bool:
        granted = waiter.granted
        return granted.done() and not granted.cancelled()

    def _forget(self, waiter: _Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return  # release() already took it off
        self._queued_work_s = max(0.0, self._queued_work_s - waiter.expected_s)
        self._queued_gauge.set(len(self._waiters))

    def _shed(self, method: str, reason: str, wait_s: float) -> ResourceExhausted:
        RPCS_SHED.labels(method, reason).inc()
        retry_after_s = min(max(wait_s, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)
        return ResourceExhausted(
            f"server at capacity ({self.name}: {self.in_flight} calls running,"
            f" {len(self._waiters)} queued); retry after {retry_after_s:.2f}s",
            reason=reason,
            retry_after_s=retry_after_s,
            metadata={
                "method": method,
                "limit": self.name,
                "expected_wait_ms": str(round(wait_s * 1000)),
            },
        )


@dataclass(frozen=True)
class Admission:
    """Which `ConcurrencyLimit` each method's calls take a slot of."""

    general: ConcurrencyLimit
    own: Mapping[str, ConcurrencyLimit] = field(default_factory=dict)

    @classmethod
    def for_pool(
        cls,
        pool_size: int,
        *,
        max_in_flight: int | None = None,
        max_queued: int | None = None,
        deprovision_max_in_flight: int = DEPROVISION_MAX_IN_FLIGHT,
    ) -> Admission:
        """The bounds derived from the database pool, unless given."""
        in_flight = max_in_flight or IN_FLIGHT_PER_POOL_CONNECTION * pool_size
        queued = max_queued if max_queued is not None else QUEUED_PER_SLOT * in_flight
        return cls(
            ConcurrencyLimit("general", in_flight, queued),
            {
                DEPROVISION_METHOD: ConcurrencyLimit(
                    "deprovision", deprovision_max_in_flight, DEPROVISION_MAX_QUEUED
                )
            },
        )

    def limit_for(self, method: str) -> ConcurrencyLimit:
        return self.own.get(method, self.general)
