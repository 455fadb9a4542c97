"""Structured logging: one line per event, `event key=value ...`.

Only the fields passed are logged; credentials are never among them. Lines
are formatted where they are logged and written by a thread of their own, so
a slow or stalled stderr (a full pipe to a log shipper, a disk in writeback)
never stalls the event loop; if the writer falls `LOG_QUEUE_LINES` behind,
new lines are dropped and counted (`log_lines_dropped_total`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from logging.handlers import QueueHandler, QueueListener
from typing import IO, Any

from shared.errors import DeadlineExceeded
from shared.inbound_rpc import inbound_caller_name
from shared.metrics import CALL_SECONDS, LOG_LINES_DROPPED


class CallerFilter(logging.Filter):
    """Puts the authenticated caller of the RPC being served on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.caller = inbound_caller_name()
        return True


class LineFormatter(logging.Formatter):
    """`time level logger caller=... message`; the time string is made once a second
    (every RPC logs a line: strftime per line was a visible share of its cost)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s caller=%(caller)s %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(second))
            self._second = second
        return self._stamp


# Lines formatted but not yet written that the writer thread may fall behind by.
LOG_QUEUE_LINES = 10_000


class LineQueueHandler(QueueHandler):
    """Formats each line on the thread that logs it (the caller is a context
    variable of that thread), and queues it for the writer thread; drops it,
    counted, when the queue is full rather than wait."""

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            LOG_LINES_DROPPED.inc()


_writer: QueueListener | None = None


def _stop_writer() -> None:
    """Write what is queued, then end the writer thread (at exit)."""
    global _writer
    if _writer is None:
        return
    writer, _writer = _writer, None
    # Without room for the stop marker, the thread (a daemon) ends with us.
    with contextlib.suppress(queue.Full):
        writer.stop()


atexit.register(_stop_writer)


def configure_logging(
    level: int = logging.INFO,
    *,
    stream: IO[str] | None = None,
    queue_lines: int = LOG_QUEUE_LINES,
) -> None:
    """Log lines of `level` and above to `stream` (stderr) through the writer thread."""
    # Our lines name no source file, thread or process: skip collecting them
    # (the logging documentation's "Optimization" flags; the stack walk of
    # findCaller was most of a record's cost).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _writer
    _stop_writer()
    lines: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=queue_lines)
    handler = LineQueueHandler(lines)
    handler.addFilter(CallerFilter())
    handler.setFormatter(LineFormatter())
    output = logging.StreamHandler(sys.stderr if stream is None else stream)
    output.setFormatter(logging.Formatter("%(message)s"))  # formatted already
    _writer = QueueListener(lines, output)
    _writer.start()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO: one line per database call on the REST
    # transport, several a second with background compaction. Our own lines
    # already cover slow and failed calls.
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))
    # yoyo logs every step of every migration (over a hundred lines on a fresh
    # database); shared.database.migrations logs one line with what it applied.
    logging.getLogger("yoyo").setLevel(max(level, logging.WARNING))


def kv(event: str, **fields: Any) -> str:
    parts = [event]
    for key, value in fields.items():
        if value is None:
            continue
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


@contextmanager
def timed_call(
    log: logging.Logger,
    operation: str,
    *,
    budget_s: float,
    slow_ms: int,
    transport: str,
    tenant_id: str | None = None,
) -> Iterator[None]:
    """Time an outbound call: metrics, a warning when slower than `slow_ms`,
    and a warning when it timed out."""
    started = time.monotonic()
    outcome = "ok"
    try:
        yield
    except (TimeoutError, DeadlineExceeded):
        outcome = "timeout"
        log.warning(
            kv(
                "call_timeout",
                operation=operation,
                transport=transport,
                tenant_id=tenant_id,
                budget_ms=budget_s * 1000,
                elapsed_ms=(time.monotonic() - started) * 1000,
            )
        )
        raise
    except BaseException as exc:
        outcome = type(exc).__name__
        raise
    finally:
        elapsed_ms = (time.monotonic() - started) * 1000
        CALL_SECONDS.labels(transport, operation, outcome).observe(elapsed_ms / 1000)
        if elapsed_ms > slow_ms:
            log.warning(
                kv(
                    "slow_call",
                    operation=operation,
                    transport=transport,
                    tenant_id=tenant_id,
                    budget_ms=budget_s * 1000,
                    duration_ms=elapsed_ms,
                )
            )
