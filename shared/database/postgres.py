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
import functools
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
# How long a call that gives up waits for its statement's cancellation
# before closing the connection instead.
CANCEL_WAIT_S = SAFETY_MARGIN_S / 4
# While the database is known to be down, a call waits this long for a
# connection (its wait also starts a reconnect attempt), then fails fast.
DOWN_PROBE_S = 0.2
RECONNECT_GIVE_UP_S = 2.0
# A pooled connection idle at least this long is tested before it is handed out.
CHECK_IDLE_AFTER_S = 1.0


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


# The message a call waiting for a connection is cancelled with when the
# database turns out to be down, so that it fails fast.
_WENT_DOWN = "database went down"


class _Reachability:
    """Whether the last attempt to open a connection failed; who waits for one."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        # Tasks waiting for a pooled connection: an outage ends their wait.
        self.waiting: set[asyncio.Task[Any]] = set()

    def mark_down(self) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            for task in self.waiting:
                task.cancel(_WENT_DOWN)

    def mark_up(self) -> None:
        self.down_since = None


class _TrackedConnection(psycopg.AsyncConnection[Any]):
    """A connection that reports failed connects and knows when it was last used."""

    # time.monotonic() when a call last finished on it with the connection sound.
    last_used = 0.0


def _tracked_connection_class(reach: _Reachability) -> type[_TrackedConnection]:
    class TrackedConnection(_TrackedConnection):
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


async def _check_if_idle(conn: _TrackedConnection) -> None:
    """Test a connection before handing it out, unless it was used a moment ago.

    After a database restart the idle connections are dead; one empty round
    trip finds out. A connection in use within the last CHECK_IDLE_AFTER_S
    was alive then: testing it too would add a round trip to every call.
    """
    if time.monotonic() - conn.last_used >= CHECK_IDLE_AFTER_S:
        await AsyncConnectionPool.check_connection(conn)


_PING = _with_timeouts(sql.SQL("SELECT 1")).as_string(None)


@functools.lru_cache(maxsize=16)
def _vacuum_query(table: str) -> str:
    return sql.SQL("VACUUM (SKIP_LOCKED) {}").format(sql.Identifier(table)).as_string(None)


@functools.lru_cache(maxsize=256)
def _call_query(function: str, names: tuple[str, ...]) -> str:
    """`SELECT function(name => %(name)s, ...)` preceded by the transaction-local
    timeouts, as one message (see `_with_timeouts`); composed once per shape."""
    call = sql.SQL("SELECT {}({})").format(
        sql.Identifier(function),
        sql.SQL(", ").join(
            sql.SQL("{} => {}").format(sql.Identifier(name), sql.Placeholder(name))
            for name in names
        ),
    )
    return _with_timeouts(call).as_string(None)


class PostgresDatabase:
    name = "postgres"
    max_call_s: float | None = None

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
            check=_check_if_idle,
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
        await self._run(_PING, {}, deadline, cap_s=2.0, operation="ping")

    async def call(
        self,
        function: str,
        args: Mapping[str, Any],
        deadline: Deadline,
        *,
        cap_s: float = DEFAULT_CALL_CAP_S,
        tenant_id: str | None = None,
    ) -> Any:
        query = _call_query(function, tuple(args))
        return await self._run(
            query, args, deadline, cap_s=cap_s, operation=function, tenant_id=tenant_id
        )

    async def vacuum(self, table: str, deadline: Deadline, *, cap_s: float) -> bool:
        """VACUUM (SKIP_LOCKED) one table: it never waits for a lock. VACUUM
        cannot run in a transaction, so it goes alone, bounded on the client
        side only (a cancel request at the deadline)."""
        query = _vacuum_query(table)
        await self._run(query, None, deadline, cap_s=cap_s, operation=f"vacuum {table}")
        return True

    async def _acquire(self, ends_at: float, operation: str) -> _TrackedConnection:
        """A pooled connection before `ends_at`; fail fast while the database is down.

        An outage noticed while it waits cancels the waiting task with
        _WENT_DOWN, which ends the wait here.
        """
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
        task = asyncio.current_task()
        assert task is not None
        self._reach.waiting.add(task)
        try:
            # psycopg_pool gives the connection back if the wait is cancelled.
            return await self._pool.getconn(timeout=left)
        except PoolTimeout:
            raise DeadlineExceeded(
                "no database connection free within the deadline",
                reason="POOL_EXHAUSTED",
                metadata={"operation": operation},
            ) from None
        except asyncio.CancelledError as cancelled:
            if cancelled.args != (_WENT_DOWN,):
                raise
            task.uncancel()
            raise unreachable from None
        finally:
            self._reach.waiting.discard(task)

    async def _run(
        self,
        query: str,
        args: Mapping[str, Any] | None,
        deadline: Deadline,
        *,
        cap_s: float,
        operation: str,
        tenant_id: str | None = None,
    ) -> Any:
        budget = deadline.budget(cap_s, operation)
        # The client side gives up after the server-side timeout (plus a grace),
        # but early enough that giving up, including the forced close after
        # CANCEL_WAIT_S, still ends inside the caller's safety margin.
        give_up_at = min(
            time.monotonic() + budget + CLIENT_GRACE_S,
            deadline.expires_at - SAFETY_MARGIN_S / 2 - CANCEL_WAIT_S,
        )
        with timed_call(
            log,
            operation,
            budget_s=budget,
            slow_ms=self._slow_call_ms,
            tenant_id=tenant_id,
            transport=self.name,
        ):
            try:
                return await self._run_bounded(query, args, budget, give_up_at, operation)
            except ServiceError as error:
                if tenant_id is not None:
                    error.metadata["tenant_id"] = tenant_id
                raise

    async def _run_bounded(
        self,
        query: str,
        args: Mapping[str, Any] | None,
        budget: float,
        give_up_at: float,
        operation: str,
    ) -> Any:
        """Acquire, run and release; the answer by `give_up_at` or DeadlineExceeded.

        At `give_up_at` the wait for a connection, or the statement, is
        cancelled: psycopg sends a cancel request and waits (up to 5 s) for
        the statement to end. Behind a pooler a statement still queued for a
        server connection ends only when one is free, so CANCEL_WAIT_S later a
        second cancellation makes psycopg close the connection instead: the
        call answers in time either way. With `args` None the query is sent
        as it is (no timeouts to set) and returns nothing.
        """
        ends_at = time.monotonic() + budget
        conn: _TrackedConnection | None = None
        try:
            try:
                async with (
                    asyncio.timeout_at(give_up_at + CANCEL_WAIT_S),
                    asyncio.timeout_at(give_up_at),
                ):
                    conn = await self._acquire(ends_at, operation)
                    left_ms = int((ends_at - time.monotonic()) * 1000)
                    if left_ms < MIN_BUDGET_S * 1000:
                        raise DeadlineExceeded(
                            "deadline exhausted while waiting for a database connection",
                            reason="BUDGET_EXHAUSTED",
                            metadata={"operation": operation},
                        )
                    cursor = psycopg.AsyncClientCursor(conn)
                    if args is None:
                        await cursor.execute(query)
                        row = None
                    else:
                        await cursor.execute(query, {**args, _TIMEOUT_MS: str(left_ms)})
                        cursor.nextset()
                        row = await cursor.fetchone()
            finally:
                # Outside the timeouts, so that they cannot interrupt it.
                if conn is not None:
                    if not conn.broken:
                        conn.last_used = time.monotonic()
                    await self._release(conn)
        except TimeoutError:
            raise DeadlineExceeded(
                "database call timed out", reason="DB_TIMEOUT", metadata={"operation": operation}
            ) from None
        except psycopg.Error as exc:
            raise _typed_error(exc, operation) from None
        return row[0] if row else None

    async def _release(self, conn: _TrackedConnection) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # The RPC is being cancelled: give the connection back without
            # waiting, where no further cancellation can interrupt it.
            returning = asyncio.ensure_future(self._pool.putconn(conn))
            self._background.add(returning)
            returning.add_done_callback(self._background.discard)
            return
        await self._pool.putconn(conn)


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
