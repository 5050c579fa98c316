"""Background work, written once: a task that runs every N seconds, and backoff with
jitter for whatever retries after a failure (the settlement stream, the sidecar the
plugin supervises, the event feed, webhook deliveries).

Jitter spreads retries of many processes (or many deliveries) that failed together, so
they do not hit a recovering node, store or receiver in lockstep.
"""
from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Awaitable, Callable, NoReturn


def backoff_delay(attempt: int, first_s: float, max_s: float, jitter: float = 0.0,
                  rand: Callable[[], float] = random.random) -> float:
    """The wait after the `attempt`-th failure in a row (1-based): first_s doubled per
    failure, capped at max_s, then shortened by up to `jitter` of itself (0 <= jitter < 1)."""
    base = min(max_s, first_s * 2 ** min(max(attempt, 1) - 1, 60))
    return base * (1.0 - jitter * rand())


class Backoff:
    """Consecutive failures of one loop: `next()` is the wait before trying again,
    `reset()` after a success."""

    def __init__(self, first_s: float = 1.0, max_s: float = 30.0, jitter: float = 0.2,
                 rand: Callable[[], float] = random.random) -> None:
        self.first_s, self.max_s, self.jitter, self.rand = first_s, max_s, jitter, rand
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        return backoff_delay(self.failures, self.first_s, self.max_s, self.jitter, self.rand)

    def reset(self) -> None:
        self.failures = 0


async def every(seconds: float, step: Callable[[], Awaitable[Any]], *, what: str,
                log: logging.Logger) -> NoReturn:
    """Run `step` every `seconds` for the life of the task. A failure is logged (as "<what>
    failed: ...") and the next run comes on schedule: one bad pass never ends the loop."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)
        await asyncio.sleep(seconds)
