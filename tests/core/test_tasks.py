"""The background-work helpers (micropay/core/tasks.py)."""
import asyncio
import logging

import pytest

from micropay.core.tasks import Backoff, backoff_delay, every


def test_backoff_doubles_caps_and_jitters_downwards_only():
    assert [backoff_delay(n, 1, 30) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(3, 1, 30, jitter=0.5, rand=lambda: 1.0) == 2.0      # at most half off
    assert backoff_delay(3, 1, 30, jitter=0.5, rand=lambda: 0.0) == 4.0
    b = Backoff(first_s=1, max_s=8, jitter=0.0)
    assert [b.next() for _ in range(5)] == [1, 2, 4, 8, 8]
    b.reset()
    assert b.next() == 1
    waits = {round(Backoff(first_s=10, max_s=10, jitter=0.2).next(), 6) for _ in range(50)}
    assert len(waits) > 1 and all(8.0 <= w <= 10.0 for w in waits)           # spread, never longer


async def test_every_survives_a_failing_pass_and_stops_when_cancelled(caplog):
    runs = []

    async def step():
        runs.append(len(runs))
        if len(runs) == 2:
            raise RuntimeError("the store is away")
    task = asyncio.create_task(every(0.01, step, what="the test pass", log=logging.getLogger("t")))
    for _ in range(200):
        if len(runs) >= 4:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(runs) >= 4 and "the test pass failed: the store is away" in caplog.text
