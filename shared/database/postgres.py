"""Direct PostgreSQL transport: psycopg 3 with an async pool.

Each call runs in its own transaction that first sets `statement_timeout`
and `lock_timeout` to what is left of the budget, so the server stops the
work even if this process dies; the client side is bounded by
`asyncio.timeout`. Pool acquisition counts against the same budget.
Cancelling the task (grpc.aio does so when the caller's deadline passes)
makes psycopg send a cancel request, so no statement outlives its RPC.

The URL may name the database itself or a transaction-mode pooler
(Supabase's on port 6543, PgBouncer): nothing here outlives a transaction.
No server-side prepared statements (a pooler hands each transaction to any
server connection, where a statement prepared by another client may sit under
the same name), and the settings are transaction-local.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from shared.database import DEFAULT_CALL_CAP_S
from shared.database.errors import error_from_sqlstate
from shared.deadline import MIN_BUDGET_S, SAFETY_MARGIN_S, Deadline
from shared.errors import DeadlineExceeded, ServiceError, Unavailable
from shared.logs import timed_call

log = logging.getLogger(__name__)

# Extra client-side wait past the server-side timeout, so that the server's
# own (clean) statement_timeout error normally wins the race.
CLIENT_GRACE_S = 0.05
# How long a call that gives up waits for its statement's cancellation.
CANCEL_WAIT_S = SAFETY_MARGIN_S / 4
# While the database is known to be down, a call waits this long for a
# connection (its wait also starts a reconnect attempt), then fails fast.
DOWN_PROBE_S = 0.2
RECONNECT_GIVE_UP_S = 2.0


# The bound parameter that carries the timeout; SQL function arguments are
# named p_..., so it cannot collide with one.
_TIMEOUT_MS = "_timeout_ms"


def _with_timeouts(query: sql.Composable) -> sql.Composed:
    """`query` preceded by transaction-local timeouts, as one message.

    The two statements travel in one simple-query message (client-side
    binding): one round trip, run by PostgreSQL as one implicit transaction,
    so the settings end with it. Each statement of such a message gets its own
    statement_timeout timer, so `query` runs under the new value.
    """
    timeouts = sql.SQL(
        "SELECT set_config('statement_timeout', {ms}, true), set_config('lock_timeout', {ms}, true)"
    ).format(ms=sql.Placeholder(_TIMEOUT_MS))
    return sql.Composed([timeouts, sql.SQL("; "), query])


class _Reachability:
    """Whether the last attempt to open a connection failed."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.went_down = asyncio.Event()

    def mark_down(self) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.went_down.set()

    def mark_up(self) -> None:
        self.down_since = None
        self.went_down.clear()


def _tracked_connection_class(reach: _Reachability) -> type[psycopg.AsyncConnection[Any]]:
    class TrackedConnection(psycopg.AsyncConnection[Any]):
        @classmethod
        async def connect(cls, *args: Any, **kwargs: Any) -> TrackedConnection:  # type: ignore[override]
            try:
                conn = await super().connect(*args, **kwargs)
            except psycopg.OperationalError:
                reach.mark_down()
                raise
            reach.mark_up()
            return conn

    return TrackedConnection


class PostgresDatabase:
    name = "postgres"

    def __init__(
        self,
        url: str,
        *,
        application_name: str,
        min_size: int = 1,
        max_size: int = 10,
        slow_call_ms: int = 3000,
    ) -> None:
        self._reach = _Reachability()
        self._background: set[asyncio.Future[Any]] = set()
        self._slow_call_ms = slow_call_ms
        self._pool = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs={
                "application_name": application_name,
                "autocommit": True,
                "connect_timeout": 5,
                "prepare_threshold": None,
            },
            connection_class=_tracked_connection_class(self._reach),
            # After a database restart the idle connections are dead: test each
            # one before handing it out (one empty round trip).
            check=AsyncConnectionPool.check_connection,
            # Give up background reconnects quickly: the next call that waits for
            # a connection starts a fresh attempt at once, instead of waiting
            # out an ever longer backoff. This bounds recovery after an outage.
            reconnect_timeout=RECONNECT_GIVE_UP_S,
        )

    async def open(self, wait_s: float | None = None) -> None:
        await self._pool.open(wait=wait_s is not None, timeout=wait_s or 30.0)

    async def close(self) -> None:
        await self._pool.close()

    @property
    def reachable(self) -> bool:
        return self._reach.down_since is None

    async def ping(self, deadline: Deadline) -> None:
        await self._run(sql.SQL("SELECT 1"), {}, deadline, cap_s=2.0, operation="ping")

    async def call(
        self,
        function: str,
        args: Mapping[str, Any],
        deadline: Deadline,
        *,
        cap_s: float = DEFAULT_CALL_CAP_S,
        tenant_id: str | None = None,
    ) -> Any:
        query = sql.SQL("SELECT {}({})").format(
            sql.Identifier(function),
            sql.SQL(", ").join(
                sql.SQL("{} => {}").format(sql.Identifier(name), sql.Placeholder(name))
                for name in args
            ),
        )
        return await self._run(
            query, args, deadline, cap_s=cap_s, operation=function, tenant_id=tenant_id
        )

    async def _acquire(self, ends_at: float, operation: str) -> psycopg.AsyncConnection[Any]:
        """A pooled connection before `ends_at`; fail fast while the database is down."""
        left = ends_at - time.monotonic()
        if left < MIN_BUDGET_S:
            raise DeadlineExceeded(
                "deadline exhausted before a database connection was free",
                reason="BUDGET_EXHAUSTED",
                metadata={"operation": operation},
            )
        unreachable = Unavailable(
            "database unreachable", reason="DB_UNAVAILABLE", metadata={"operation": operation}
        )
        if self._reach.down_since is not None:
            # Known to be down: a short wait (which starts a reconnect attempt).
            try:
                return await self._pool.getconn(timeout=min(left, DOWN_PROBE_S))
            except PoolTimeout:
                raise unreachable from None
        # One uninterrupted wait keeps this call's place in the pool's queue;
        # an outage noticed meanwhile ends it early.
        getting = asyncio.ensure_future(self._pool.getconn(timeout=left))
        went_down = asyncio.ensure_future(self._reach.went_down.wait())
        try:
            await asyncio.wait({getting, went_down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            went_down.cancel()
            settled = getting.done()
            if not settled:
                getting.cancel()
                getting.add_done_callback(self._return_if_obtained)
        if not settled:
            raise unreachable
        try:
            return getting.result()
        except PoolTimeout:
            raise DeadlineExceeded(
                "no database connection free within the deadline",
                reason="POOL_EXHAUSTED",
                metadata={"operation": operation},
            ) from None

    def _return_if_obtained(self, getting: asyncio.Future[psycopg.AsyncConnection[Any]]) -> None:
        """An abandoned wait that got a connection anyway gives it back."""
        if not getting.cancelled() and getting.exception() is None:
            task = asyncio.ensure_future(self._pool.putconn(getting.result()))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _run(
        self,
        query: sql.Composable,
        args: Mapping[str, Any],
        deadline: Deadline,
        *,
        cap_s: float,
        operation: str,
        tenant_id: str | None = None,
    ) -> Any:
        budget = deadline.budget(cap_s, operation)
        # The client side gives up after the server-side timeout (plus a grace),
        # but always inside the caller's safety margin.
        wait_s = min(budget + CLIENT_GRACE_S, deadline.remaining() - SAFETY_MARGIN_S / 2)
        with timed_call(
            log,
            operation,
            budget_s=budget,
            slow_ms=self._slow_call_ms,
            tenant_id=tenant_id,
            transport=self.name,
        ):
            try:
                return await self._run_bounded(query, args, budget, wait_s, operation)
            except ServiceError as error:
                if tenant_id is not None:
                    error.metadata["tenant_id"] = tenant_id
                raise

    async def _run_bounded(
        self,
        query: sql.Composable,
        args: Mapping[str, Any],
        budget: float,
        wait_s: float,
        operation: str,
    ) -> Any:
        """The statement's answer within `wait_s`, or DeadlineExceeded.

        The statement runs in a task of its own so that giving up does not
        wait for the cancellation: psycopg sends a cancel request and waits up
        to 5 s for the statement to end, and behind a pooler a statement still
        queued for a server connection ends only when one is free. The task
        finishes that in the background (and returns the connection).
        """
        work = asyncio.ensure_future(self._execute(query, args, budget, operation))
        try:
            await asyncio.wait({work}, timeout=wait_s)
        finally:
            if not work.done():
                # Timed out, or this RPC was cancelled: cancel the statement,
                # and wait briefly so that it is usually gone when we answer.
                work.cancel()
                await asyncio.wait({work}, timeout=CANCEL_WAIT_S)
            if not work.done():
                self._background.add(work)
                work.add_done_callback(self._finished_in_background)
        if not work.done() or work.cancelled():
            raise DeadlineExceeded(
                "database call timed out", reason="DB_TIMEOUT", metadata={"operation": operation}
            )
        return work.result()

    def _finished_in_background(self, work: asyncio.Future[Any]) -> None:
        self._background.discard(work)
        if not work.cancelled():
            work.exception()  # already answered for: only mark it retrieved

    async def _execute(
        self, query: sql.Composable, args: Mapping[str, Any], budget: float, operation: str
    ) -> Any:
        """Acquire, run and release; psycopg and pool errors become typed errors."""
        ends_at = time.monotonic() + budget
        try:
            conn = await self._acquire(ends_at, operation)
            try:
                left_ms = int((ends_at - time.monotonic()) * 1000)
                if left_ms < MIN_BUDGET_S * 1000:
                    raise DeadlineExceeded(
                        "deadline exhausted while waiting for a database connection",
                        reason="BUDGET_EXHAUSTED",
                        metadata={"operation": operation},
                    )
                cursor = psycopg.AsyncClientCursor(conn)
                await cursor.execute(_with_timeouts(query), {**args, _TIMEOUT_MS: str(left_ms)})
                cursor.nextset()
                row = await cursor.fetchone()
                return row[0] if row else None
            finally:
                await self._pool.putconn(conn)
        except psycopg.Error as exc:
            raise _typed_error(exc, operation) from None


def _typed_error(exc: psycopg.Error, operation: str) -> ServiceError:
    diag = getattr(exc, "diag", None)
    sqlstate = exc.sqlstate or (diag.sqlstate if diag else None)
    if sqlstate is None and isinstance(exc, psycopg.OperationalError):
        return Unavailable(
            "database connection failed",
            reason="DB_UNAVAILABLE",
            metadata={"operation": operation},
        )
    return error_from_sqlstate(
        sqlstate,
        diag.message_primary if diag and diag.message_primary else str(exc),
        diag.message_hint if diag else None,
        operation,
    )
