"""Publishing zap receipts from their outbox, never in the way of anything else.

A receipt is signed and written with its tip's settlement (creators/repository.py);
this loop sends it to the relays its zap request named (at most MAX_RELAYS of them,
each bounded by a timeout: creators/zap_publish.py). A relay that took it is struck
off; the others are tried again with backoff, MAX_ATTEMPTS times. The receipt ends
`published` once any relay took it, else `failed`. A lease lets several processes
share the outbox without sending one receipt twice at the same time (a relay keeps a
receipt once, by its id, so a resend after a crash is harmless).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Awaitable, Callable, NoReturn, Sequence

from ..nostr.event import Event, parse_event
from ..store import Store
from .repository import ZapReceipt, ZapRepository

log = logging.getLogger("micropay.zaps")
Publish = Callable[..., Awaitable[dict[str, "str | None"]]]
LEASE_S = 60
MAX_ATTEMPTS = 6
FIRST_RETRY_S = 10
MAX_RETRY_S = 1800
TIMEOUT_S = 10.0
BATCH = 10


class ZapOutbox:
    def __init__(self, store: Store, publish: Publish, *, allow_private: bool = False,
                 clock: Callable[[], float] = time.time, timeout_s: float = TIMEOUT_S) -> None:
        self.repo, self.publish, self.clock = ZapRepository(store), publish, clock
        self.allow_private, self.timeout_s = allow_private, timeout_s
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> NoReturn:
        while True:
            try:
                await self.publish_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("publishing zap receipts failed: %s", exc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._wake.wait()

    async def publish_due(self) -> int:
        """Send every receipt that is due, BATCH at a time, concurrently."""
        now = int(self.clock())
        due = [z for z in await self.repo.due(now, BATCH) if await self.repo.claim(z.tip_id, now + LEASE_S, now)]
        await asyncio.gather(*(self._one(z) for z in due))
        return len(due)

    async def _one(self, z: ZapReceipt) -> None:
        relays: Sequence[str] = json.loads(z.relays)
        try:
            event: Event = parse_event(json.loads(z.event))
            results = await self.publish(event, relays, timeout_s=self.timeout_s, allow_private=self.allow_private)
        except Exception as exc:            # never lets one receipt stop the others
            results = {r: f"publishing failed: {exc}" for r in relays}
        took = [r for r, err in results.items() if err is None]
        left = [r for r, err in results.items() if err is not None and not err.startswith("skipped")]
        errors = "; ".join(f"{r}: {err}" for r, err in results.items() if err is not None)[:500] or None
        now = int(self.clock())
        attempts = z.attempts + 1
        published_at = now if took else None
        if left and attempts < MAX_ATTEMPTS:
            delay = min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** (attempts - 1))
            await self.repo.tried(z.tip_id, "pending", json.dumps(left), now + delay, errors, published_at)
            return
        status = "published" if took or z.published_at is not None else "failed"
        await self.repo.tried(z.tip_id, status, json.dumps(left), now, errors, published_at)
        log.info("zap receipt of tip %s %s (%d relays took it this time)%s", z.tip_id, status, len(took),
                 f": {errors}" if errors and status == "failed" else "")
