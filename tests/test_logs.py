"""Logging never stalls the code that logs: lines go to a writer thread, and
when the output stalls, lines past the buffer are dropped and counted instead
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
        self.writing = threading.Event()
        self.resume = threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
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


def test_a_stalled_output_blocks_no_logger_and_drops_only_past_the_buffer(
    restored_logging: None,
) -> None:
    stream = StalledStream()
    configure_logging(stream=stream, buffer_lines=5)
    log = logging.getLogger("test.logs")
    log.info(kv("line", n=0))
    assert stream.writing.wait(10), "the writer never wrote"  # and now waits on the stream
    before = dropped()
    for n in range(1, 21):
        log.info(kv("line", n=n))
    # Every call returned although nothing could be written yet: five lines
    # wait, the fifteen after them are dropped and counted.
    assert stream.getvalue() == ""
    assert dropped() - before == 15

    stream.resume.set()
    logs._stop_writer()  # writes what waits, as at exit
    written = stream.getvalue().splitlines()
    assert [line.split()[-1] for line in written] == [f"n={n}" for n in range(6)]
    assert all(" INFO test.logs caller=- line " in line for line in written)
