"""The grpc.aio server both services run on.

`create_server(listen, services, ...)` builds a server with health (which
follows the database's reachability and the event loop's responsiveness),
reflection, and the server boundary (shared/interceptors.py: access table,
auth, the RPC's deadline, admission control, the error mapping, metrics and
the access log); tests reuse it with port 0. `serve()` runs one until
SIGTERM/SIGINT, then drains: health goes
NOT_SERVING first, then `stop(grace)` lets in-flight calls finish. Background
work a service runs beside its server (`BackgroundTask`) starts once the
server serves and is cancelled, and awaited, when shutdown begins.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.admission import Admission
from shared.auth import METHOD_ACCESS, MethodAccess, TokenRegistry
from shared.database import Database
from shared.deadline import Deadline
from shared.errors import FailedPrecondition, ServiceError
from shared.interceptors import RpcBoundary
from shared.logs import kv
from shared.metrics import EVENT_LOOP_LAG
from shared.settings import Settings
from shared.tls import ServerTls

log = logging.getLogger(__name__)

# Our requests are a few hundred bytes; anything near this is garbage or abuse.
MAX_RECEIVE_BYTES = 64 * 1024
MAX_SEND_BYTES = 4 * 1024 * 1024

HEALTH_PROBE_INTERVAL_S = 1.0
HEALTH_PROBE_TIMEOUT_S = 1.0
# The health watcher's own sleep overshooting by this much means the event
# loop was blocked that long: nothing could be served meanwhile, so health
# says NOT_SERVING for that round (docs/design.md, "Admission").
LOOP_BLOCKED_S = 1.0

# grpc core's backlog of calls received but not yet taken by the application:
# above the soft limit it refuses new calls at random, always above the hard
# one (defaults 1000 and 3000), and its refusal reaches the caller as
# CANCELLED, a status that tells it nothing. Admission control sheds instead,
# with a status that says why (docs/design.md, "Admission"), so core's limits
# are set far above any burst it would have to take.
CORE_MAX_PENDING_REQUESTS = 20_000
CORE_MAX_PENDING_REQUESTS_HARD = 40_000


@dataclass(frozen=True)
class Service:
    """A gRPC service to host: its full name, how to add it to a server, and
    the deadline its RPCs get when the caller sets none."""

    name: str
    register: Callable[[grpc.aio.Server], None]
    default_deadline_s: float


@dataclass(frozen=True)
class BackgroundTask:
    """Work a service does beside serving RPCs, e.g. periodic maintenance.

    `run()` should loop until cancelled; `serve()` starts it once the server
    serves, and cancels and awaits it when shutdown begins.
    """

    name: str
    run: Callable[[], Coroutine[Any, Any, None]]


# How long shutdown waits for cancelled background tasks to finish.
BACKGROUND_STOP_TIMEOUT_S = 5.0


def start_background(tasks: Sequence[BackgroundTask]) -> list[asyncio.Task[None]]:
    started = []
    for task in tasks:
        running = asyncio.create_task(task.run(), name=task.name)
        running.add_done_callback(_report_ended)
        started.append(running)
    return started


def _report_ended(task: asyncio.Task[None]) -> None:
    """A background task is meant to run until shutdown cancels it: say when one ends early."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error(kv("background_task_failed", task=task.get_name()), exc_info=exc)
    else:
        log.warning(kv("background_task_ended", task=task.get_name()))


async def stop_background(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel the tasks and wait (bounded) until they have finished."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _done, pending = await asyncio.wait(tasks, timeout=BACKGROUND_STOP_TIMEOUT_S)
    for task in pending:
        log.warning(kv("background_task_not_stopped", task=task.get_name()))


@dataclass
class ServerHandle:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    database: Database | None = None
    health_probe_interval_s: float = HEALTH_PROBE_INTERVAL_S
    _watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.server.start()
        await self._set_health(serving=True)
        if self.database is not None:
            self._watcher = asyncio.create_task(self._watch_database(self.database))

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)

    async def _set_health(self, *, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def _watch_database(self, database: Database) -> None:
        """Health says NOT_SERVING while the database cannot be reached (a
        wedged pool times the probe out too), and for a round after the event
        loop was blocked.

        Only cancellation (shutdown) ends the watch: whatever else goes wrong in
        a round is logged, and the next round comes as usual.
        """
        serving = True
        loop = asyncio.get_running_loop()
        while True:
            slept_from = loop.time()
            await asyncio.sleep(self.health_probe_interval_s)
            lag_s = max(0.0, loop.time() - slept_from - self.health_probe_interval_s)
            EVENT_LOOP_LAG.set(lag_s)
            try:
                responsive = lag_s < LOOP_BLOCKED_S
                if not responsive:
                    log.warning(kv("event_loop_blocked", seconds=round(lag_s, 3)))
                reachable = await _reachable(database)
                healthy = reachable and responsive
                if healthy != serving:
                    log.warning(
                        kv("database_health", reachable=reachable, loop_responsive=responsive)
                    )
                    await self._set_health(serving=healthy)
                    serving = healthy
            except Exception:
                log.exception(kv("health_watch_round_failed"))


async def _reachable(database: Database) -> bool:
    """One probe; a failure we do not expect counts as unreachable, and is logged."""
    try:
        await database.ping(Deadline.after(HEALTH_PROBE_TIMEOUT_S))
    except ServiceError:
        return False
    except Exception:
        log.exception(kv("health_probe_failed", database=database.name))
        return False
    return True


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_server(
    listen: str,
    services: Sequence[Service],
    *,
    tokens: Callable[[], TokenRegistry],
    error_domain: str,
    database: Database | None = None,
    tls: ServerTls | None = None,
    allow_insecure: bool = False,
    method_access: Mapping[str, MethodAccess] = METHOD_ACCESS,
    health_probe_interval_s: float = HEALTH_PROBE_INTERVAL_S,
    admission: Admission | None = None,
) -> ServerHandle:
    """A server hosting `services`; `method_access` is the access table it
    enforces (tests extend it for methods of their own). With a `database`,
    health follows whether it can be reached, probed every
    `health_probe_interval_s`. `admission` bounds the calls in flight (by
    default, from the default database pool size)."""
    if tls is None and not is_loopback(listen) and not allow_insecure:
        raise FailedPrecondition(
            f"refusing plaintext gRPC on non-loopback address {listen}; "
            "configure TLS or set ALLOW_INSECURE=1",
            reason="INSECURE_LISTEN",
        )
    server = grpc.aio.server(
        interceptors=[
            RpcBoundary(
                domain=error_domain,
                tokens=tokens,
                method_access=method_access,
                default_deadlines_s={s.name: s.default_deadline_s for s in services},
                admission=admission or Admission.for_pool(Settings.db_pool_max),
            )
        ],
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),
            ("grpc.server.max_pending_requests", CORE_MAX_PENDING_REQUESTS),
            ("grpc.server.max_pending_requests_hard_limit", CORE_MAX_PENDING_REQUESTS_HARD),
        ],
    )
    for service in services:
        service.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(s.name for s in services)
    reflection.enable_server_reflection(
        (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = (
        server.add_secure_port(listen, tls.credentials())
        if tls is not None
        else server.add_insecure_port(listen)
    )
    if port == 0:
        raise FailedPrecondition(f"cannot listen on {listen}", reason="LISTEN_FAILED")
    return ServerHandle(server, port, health_servicer, names, database, health_probe_interval_s)


async def serve(
    handle: ServerHandle,
    *,
    grace_s: float = 5.0,
    on_hangup: Callable[[], object] | None = None,
    background: Sequence[BackgroundTask] = (),
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; SIGHUP calls `on_hangup`.

    The `background` tasks run while the server serves; shutdown cancels them
    (and waits for them) before it drains the in-flight calls.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_hangup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await handle.start()
    log.info("serving %s on port %d", ", ".join(handle.service_names), handle.port)
    running = start_background(background)
    try:
        await stop.wait()
        log.info("shutting down (grace %.1fs)", grace_s)
    finally:
        await stop_background(running)
    await handle.stop(grace_s)
