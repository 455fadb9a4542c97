"""Structured logging: one line per event, `event key=value ...`.

Only the fields passed are logged; credentials are never among them. Lines
are formatted where they are logged and written in batches by a thread of
their own (`LineBuffer`), so a slow or stalled stderr (a full pipe to a log
shipper, a disk in writeback) never stalls the event loop; if the writer falls
`LOG_BUFFER_LINES` behind, new lines are dropped and counted
(`log_lines_dropped_total`).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


# Lines logged but not yet written that the writer may fall behind by.
LOG_BUFFER_LINES = 10_000
# How often the writer thread writes what was logged since, in one write.
LOG_WRITE_INTERVAL_S = 0.05
# How long exit waits for the last write (a stalled output would wait forever).
LOG_LAST_WRITE_WAIT_S = 1.0


class LineBuffer(logging.Handler):
    """Formats each line where it is logged (the caller is a context variable of
    that thread) and appends it to a buffer that a writer thread empties every
    LOG_WRITE_INTERVAL_S in one write: logging costs the event loop a format and
    an append, never a wait for the output, nor a thread switch per line. A line
    that finds `capacity` lines waiting is dropped and counted."""

    def __init__(self, stream: IO[str], capacity: int) -> None:
        super().__init__()
        self._stream = stream
        self._capacity = capacity
        self._lines: collections.deque[str] = collections.deque()
        self._closing = threading.Event()
        self._writer = threading.Thread(target=self._write_until_closed, name="log-writer")
        self._writer.daemon = True  # a stalled output must not keep the process alive
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if len(self._lines) >= self._capacity:
            LOG_LINES_DROPPED.inc()
            return
        self._lines.append(line)

    def _write_until_closed(self) -> None:
        while not self._closing.wait(LOG_WRITE_INTERVAL_S):
            self._write_waiting()
        self._write_waiting()

    def _write_waiting(self) -> None:
        batch = []
        with contextlib.suppress(IndexError):  # emptied: deque pops are atomic
            while self._lines:
                batch.append(self._lines.popleft())
        if batch:
            # Nowhere to report a failed write: the output is where it would go.
            with contextlib.suppress(Exception):
                self._stream.write("\n".join(batch) + "\n")
                self._stream.flush()

    def close(self) -> None:
        """Write what is waiting and end the writer (at exit, or when replaced)."""
        self._closing.set()
        self._writer.join(LOG_LAST_WRITE_WAIT_S)
        super().close()


_buffer: LineBuffer | None = None


def _stop_writer() -> None:
    global _buffer
    if _buffer is not None:
        _buffer.close()
        _buffer = None


atexit.register(_stop_writer)


def configure_logging(
    level: int = logging.INFO,
    *,
    stream: IO[str] | None = None,
    buffer_lines: int = LOG_BUFFER_LINES,
) -> None:
    """Log lines of `level` and above to `stream` (stderr) through the writer thread."""
    # Our lines name no source file, thread or process: skip collecting them
    # (the logging documentation's "Optimization" flags; the stack walk of
    # findCaller was most of a record's cost).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _buffer
    _stop_writer()
    _buffer = LineBuffer(sys.stderr if stream is None else stream, buffer_lines)
    _buffer.addFilter(CallerFilter())
    _buffer.setFormatter(LineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [_buffer]
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
