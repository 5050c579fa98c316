"""Another connection holding SQLite's write lock for a while, and a count of the event
loop's turns meanwhile: for tests that the loop's thread never waits for that lock."""
from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LockHeld:
    ticks: int = 0                          # 10 ms sleeps the loop got through while it ran
    started: float = field(default_factory=time.monotonic)

    def waited(self) -> float:
        return time.monotonic() - self.started


@contextlib.asynccontextmanager
async def another_writer_holds_the_lock(path: Path, seconds: float = 0.4):
    """BEGIN IMMEDIATE on another connection, let go after `seconds` from a thread (a loop
    blocked by the code under test could not let go of it itself, so the test fails on
    its tick count instead of hanging)."""
    other = sqlite3.connect(path, timeout=0.1, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(seconds, other.execute, ("ROLLBACK",)).start()
    held = LockHeld()

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0.01)
            held.ticks += 1
    tick = asyncio.ensure_future(ticker())
    try:
        yield held
    finally:
        tick.cancel()
        await asyncio.sleep(max(0.0, seconds - held.waited()) + 0.05)    # the timer has let go
        other.close()
