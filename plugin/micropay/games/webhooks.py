"""Delivering the webhook outbox: at least once, in order per purchase, with backoff.

Each (event, endpoint) row is pending until a 2xx answer (delivered) or until it is
older than `give_up_after_s` (failed; `micropay webhooks redeliver` re-queues it).
After the n-th failure the next attempt waits first_s * 2^(n-1), capped at max_s, and
up to a tenth less at random (tasks.backoff_delay), so retries spread out.
A later event for the same purchase waits until the earlier one has left 'pending'.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import base64
from pathlib import Path
from typing import Callable, Protocol

from ..core.errors import MicropayError
from ..core.secretfile import read_secret, write_secret
from ..store import Store
from .repository import Delivery, OutboxRepository
from .config import GamesConfig, WebhookEndpoint
from .signing import EVENT_ID_HEADER, EVENT_TYPE_HEADER, SIGNATURE_HEADER, sign

log = logging.getLogger("micropay.webhooks")
BATCH = 100
PARALLEL = 16
LEASE_S = 30


def new_secret() -> str:
    return "whsec_" + base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")


class SecretFile:
    """One secret per line, newest first; all of them sign (rotation overlap).
    Created with one random secret if missing; re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._secrets: list[str] = []

    def secrets(self) -> list[str]:
        if not self.path.exists():
            write_secret(self.path, (new_secret() + "\n").encode())
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            lines = [ln.strip() for ln in read_secret(self.path).decode("utf-8").splitlines()]
            self._secrets = [ln for ln in lines if ln and not ln.startswith("#")]
            self._stamp = stamp
        return self._secrets

    def rotate(self) -> str:
        """A new secret first; the previous newest one keeps signing too."""
        old = self.secrets()[:1] if self.path.exists() else []
        fresh = new_secret()
        write_secret(self.path, ("\n".join([fresh, *old]) + "\n").encode())
        return fresh

    def drop_old(self) -> int:
        """Sign with the newest secret only (the one the receiver was given last); creates
        none. Returns how many older secrets were dropped."""
        secrets = self.secrets()
        if not secrets:
            raise MicropayError(f"{self.path}: no secret to keep")
        write_secret(self.path, (secrets[0] + "\n").encode())
        return len(secrets) - 1


class DeliveryFailed(Exception):
    """The receiver could not be reached, or broke off, or took too long."""


class Poster(Protocol):
    """How a webhook leaves the process: HTTP POST (adapter: games/http/poster.py)."""

    async def post(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
        """The receiver's HTTP status; raises DeliveryFailed when there is none."""
        ...

    async def close(self) -> None: ...


def event_body(d: Delivery) -> bytes:
    return json.dumps({"id": d.event_id, "type": d.type, "created_at": d.event_created_at,
                       "data": json.loads(d.data)}, sort_keys=True, separators=(",", ":")).encode()


class WebhookDeliverer:
    def __init__(self, cfg: GamesConfig, store: Store, data_dir: Path, poster: Poster,
                 clock: Callable[[], float], hub=None) -> None:
        self.cfg, self.outbox, self.clock, self.hub = cfg, OutboxRepository(store), clock, hub
        self.endpoints: dict[str, WebhookEndpoint] = {w.name: w for w in cfg.webhooks}
        self.secrets = {w.name: SecretFile(w.secret_path(data_dir)) for w in cfg.webhooks}
        self.poster = poster

    def check_secrets(self) -> None:
        """At start-up: create missing secret files, refuse unreadable or empty ones."""
        for name, f in self.secrets.items():
            if not f.secrets():
                from ..core.errors import ConfigError
                raise ConfigError(f"{f.path}: webhook {name!r} secret file holds no secret")

    async def close(self) -> None:
        await self.poster.close()

    async def run_once(self) -> int:
        """Attempt every delivery that is due now. Returns how many were attempted."""
        now = int(self.clock())
        due = await self.outbox.due(now, BATCH)
        if not due:
            return 0
        sem = asyncio.Semaphore(PARALLEL)

        async def one(d: Delivery) -> None:
            async with sem:
                await self._attempt(d)
        await asyncio.gather(*(one(d) for d in due))
        return len(due)

    async def _attempt(self, d: Delivery) -> None:
        ep = self.endpoints.get(d.endpoint)
        now = int(self.clock())
        lease = now + int(ep.timeout_s if ep else 0) + LEASE_S
        if not await self.outbox.claim(d, lease):
            return   # another deliverer took it
        if ep is None:
            error = "endpoint no longer configured"
        else:
            body = event_body(d)
            headers = {"Content-Type": "application/json", EVENT_ID_HEADER: str(d.event_id),
                       EVENT_TYPE_HEADER: d.type, "Micropay-Delivery-Attempt": str(d.attempts + 1),
                       SIGNATURE_HEADER: sign(body, self.secrets[ep.name].secrets(), now)}
            error = None
            try:
                status = await self.poster.post(ep.url, body, headers, ep.timeout_s)
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
            except DeliveryFailed as exc:
                error = str(exc)[:200]
        done_at = int(self.clock())
        if error is None:
            await self.outbox.delivered(d, done_at)
            log.info("webhook %s delivered to %s (event %s, attempt %d)", d.type, d.endpoint,
                     d.event_id, d.attempts + 1)
            return
        attempts = d.attempts + 1
        give_up = done_at - d.created_at >= self.cfg.retry.give_up_after_s
        nxt = done_at + self.cfg.retry.delay(attempts)
        await self.outbox.attempt_failed(d, done_at, nxt, error, give_up)
        if give_up:
            log.error("webhook to %s gave up after %d attempts (event %s): %s; "
                      "requeue with: micropay webhooks redeliver %s", d.endpoint, attempts, d.event_id,
                      error, d.event_id)
        else:
            log.warning("webhook to %s failed (event %s, attempt %d): %s; next in %ds", d.endpoint,
                        d.event_id, attempts, error, nxt - done_at)

    async def run(self, idle_s: float = 5.0) -> None:
        while True:
            ev = self.hub.current() if self.hub is not None else None
            try:
                n = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("webhook delivery pass failed: %s", exc)
                n = 0
            if n >= BATCH:
                continue
            wait = idle_s
            next_at = await self.outbox.next_due_at()
            if next_at is not None:
                wait = max(0.05, min(idle_s, next_at - self.clock()))
            if ev is not None:
                await self.hub.wait(ev, wait)
            else:
                await asyncio.sleep(wait)


async def list_deliveries(store: Store, status: str = "", endpoint: str = "", subject: str = "",
                          limit: int = 50) -> list[Delivery]:
    return await OutboxRepository(store).listing(status, endpoint, subject, limit)


async def get_deliveries(store: Store, event_id: int) -> list[Delivery]:
    return await OutboxRepository(store).of_event(event_id)


async def redeliver(store: Store, event_id: int, endpoint: str = "", now: int = 0) -> list[str]:
    return await OutboxRepository(store).redeliver(event_id, endpoint, now)
