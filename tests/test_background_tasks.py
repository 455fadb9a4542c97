"""Background tasks beside a server (shared/server.py): started, then
cancelled and awaited at shutdown; one that dies early is reported."""

from __future__ import annotations

import asyncio
import logging

import pytest

from shared.server import BackgroundTask, start_background, stop_background


async def test_background_tasks_are_cancelled_and_awaited() -> None:
    events: list[str] = []

    async def work() -> None:
        events.append("started")
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.01)  # cleanup that itself awaits
            events.append("cleaned up")

    running = start_background([BackgroundTask("sleeper", work)])
    await asyncio.sleep(0)
    assert events == ["started"]
    await stop_background(running)
    assert events == ["started", "cleaned up"]
    assert running[0].cancelled()


async def test_a_background_task_that_dies_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    running = start_background([BackgroundTask("broken", broken)])
    await asyncio.wait(running)
    await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    failed = [r for r in caplog.records if "background_task_failed" in r.getMessage()]
    assert failed and failed[0].levelno == logging.ERROR
    assert "task=broken" in failed[0].getMessage()
    await stop_background(running)  # stopping a finished task is harmless
