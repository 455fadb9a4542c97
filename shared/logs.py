"""Structured logging: one line per event, `event key=value ...`.

Only the fields passed are logged; credentials are never among them.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from shared.errors import DeadlineExceeded
from shared.inbound_rpc import inbound_caller_name
from shared.metrics import CALL_SECONDS


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


def configure_logging(level: int = logging.INFO) -> None:
    # Our lines name no source file, thread or process: skip collecting them
    # (the logging documentation's "Optimization" flags; the stack walk of
    # findCaller was most of a record's cost).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CallerFilter())
    handler.setFormatter(LineFormatter())
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
