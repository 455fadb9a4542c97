"""Logging never stalls the code that logs: lines go to a writer thread, and
when the output stalls, lines past the queue are dropped and counted instead
of blocking (shared/logs.py)."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from shared import logs
from shared.logs import configure_logging, kv


class StalledStream(io.StringIO):
    """An output whose writes wait until `resume` is set, like a full pipe."""

    def __init__(self) -> None:
        super().__init__()
        self.resume = threading.Event()

    def write(self, text: str) -> int:
        self.resume.wait(30)
        return super().write(text)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    logs._stop_writer()
    root.handlers[:] = handlers
    root.setLevel(level)


def dropped() -> float:
    return REGISTRY.get_sample_value("log_lines_dropped_total") or 0.0


def test_a_stalled_output_blocks_no_logger_and_drops_only_past_the_queue(
    restored_logging: None,
) -> None:
    stream = StalledStream()
    configure_logging(stream=stream, queue_lines=5)
    before = dropped()
    log = logging.getLogger("test.logs")
    for n in range(20):
        log.info(kv("line", n=n))
    # Every call returned although nothing could be written yet.
    assert stream.getvalue() == ""
    # Five queued, and at most one taken by the writer, which waits on the stream.
    lost = dropped() - before
    assert lost in (14, 15), lost

    stream.resume.set()
    logs._stop_writer()  # writes what is queued, as at exit
    written = stream.getvalue().splitlines()
    assert len(written) == 20 - lost
    assert [line.split()[-1] for line in written] == [f"n={n}" for n in range(len(written))]
    assert all(" INFO test.logs caller=- line " in line for line in written)
