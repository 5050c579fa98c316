"""Wake-ups and the shared feed of events, for live listeners (SSE, WebSocket).

EventHub wakes this process's listeners when events are written. One EventFeed per
process reads each new event from the store once and keeps the newest ones in memory;
every listener takes what it needs from there, so an event costs one store read
whatever the number of listeners. StreamSlots caps concurrent streams, overall and
per credential. Nothing here knows HTTP.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
from typing import Awaitable, Callable, Iterator

from ..core.errors import RateLimited
from ..core.tasks import Backoff
from .repository import EventRecord

log = logging.getLogger("micropay.live")
BATCH = 200
FEED_CAPACITY = 4096


class EventHub:
    """Wakes listeners (SSE, WebSocket) when events are written in this process.
    Take `current()` before reading the store, then `wait()` on it: no wake-up is lost."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        ev, self._event = self._event, asyncio.Event()
        ev.set()

    @staticmethod
    async def wait(ev: asyncio.Event, timeout: float) -> bool:
        """True if woken, False on timeout. asyncio.timeout, not wait_for: on Python 3.11,
        wait_for swallows a cancellation that arrives as the event is set, and a loop
        built on it then never stops (seen as a hung shutdown)."""
        try:
            async with asyncio.timeout(timeout):
                await ev.wait()
            return True
        except TimeoutError:
            return False


class EventFeed:
    """The newest events of the store, read once per change, shared by all listeners."""

    def __init__(self, read: Callable[[int, str, int], Awaitable[list[EventRecord]]],
                 last_id: Callable[[], Awaitable[int]], hub: EventHub, capacity: int = FEED_CAPACITY) -> None:
        self._read, self._last_id, self.hub, self.capacity = read, last_id, hub, capacity
        self._ids: list[int] = []
        self._events: list[EventRecord] = []
        self.floor: int | None = None    # every event with a larger id is held (None: not started)
        self._changes = EventHub()       # wakes this process's listeners once the feed has new events

    def current(self) -> asyncio.Event:
        """Take this before reading, then wait on it: no wake-up is lost."""
        return self._changes.current()

    def wake(self) -> None:
        self._changes.notify()

    async def run(self) -> None:
        backoff = Backoff(first_s=0.5, max_s=5.0)
        while True:
            seen = self.hub.current()
            try:
                if self.floor is None:
                    self.floor = await self._last_id()
                await self._refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:   # the store is away: listeners wait, nothing is lost
                wait = backoff.next()
                log.warning("reading new events failed (%s); retrying in %.1fs", exc, wait)
                await asyncio.sleep(wait)
                continue
            backoff.reset()
            self.wake()
            await self.hub.wait(seen, 60.0)

    async def _refresh(self) -> None:
        after = self._ids[-1] if self._ids else self.floor
        assert after is not None
        while True:
            rows = await self._read(after, "", BATCH)
            for e in rows:
                self._ids.append(e.id)
                self._events.append(e)
                after = e.id
            if len(rows) < BATCH:
                break
        if len(self._ids) > 2 * self.capacity:
            cut = len(self._ids) - self.capacity
            self.floor = self._ids[cut - 1]
            del self._ids[:cut], self._events[:cut]

    def after(self, after_id: int, subject: str) -> tuple[list[EventRecord], int] | None:
        """(events with id > after_id, of `subject` if given; the position read up to), or
        None when the feed does not reach back that far."""
        if self.floor is None or after_id < self.floor:
            return None
        i = bisect.bisect_right(self._ids, after_id)
        events = self._events[i:] if not subject else [e for e in self._events[i:] if e.subject_id == subject]
        return events, max(after_id, self._ids[-1] if self._ids else self.floor)


class StreamSlots:
    """Counts open event streams, overall and per credential."""

    def __init__(self, total: int, per_credential: int) -> None:
        self.total, self.per_credential = total, per_credential
        self.open = 0
        self._by: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def hold(self, credential: str) -> Iterator[None]:
        if self.open >= self.total:
            raise RateLimited(f"this server has {self.total} event streams open, its limit; "
                              "try again shortly", retry_after_s=5)
        if self._by[credential] >= self.per_credential:
            raise RateLimited(f"this credential already holds {self.per_credential} event streams, "
                              "its limit; close one first", retry_after_s=5)
        self.open += 1
        self._by[credential] += 1
        try:
            yield
        finally:
            self.open -= 1
            self._by[credential] -= 1
            if not self._by[credential]:
                del self._by[credential]
