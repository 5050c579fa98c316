"""Delivering the webhook outbox: at least once, in order per purchase, with backoff.

Each (event, endpoint) row is pending until a 2xx answer (delivered) or until it is
older than `give_up_after_s` (failed; `micropay webhooks redeliver` re-queues it).
After the n-th failure the next attempt waits first_s * 2^(n-1), capped at max_s.
A later event for the same purchase waits until the earlier one has left 'pending'.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import base64
from pathlib import Path
from typing import Any, Callable

import aiohttp

from ..secretfile import read_secret, write_secret
from ..store import Store
from ..store.games import DELIVERY_FIELDS, GSQL, row_dict
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

    def rotate(self, keep_old: bool = True) -> str:
        old = self.secrets()[:1] if keep_old and self.path.exists() else []
        fresh = new_secret()
        write_secret(self.path, ("\n".join([fresh, *old]) + "\n").encode())
        return fresh


def event_body(d: dict[str, Any]) -> bytes:
    return json.dumps({"id": int(d["event_id"]), "type": d["type"], "created_at": int(d["event_created_at"]),
                       "data": json.loads(d["data"])}, sort_keys=True, separators=(",", ":")).encode()


class WebhookDeliverer:
    def __init__(self, cfg: GamesConfig, store: Store, data_dir: Path,
                 clock: Callable[[], float], hub=None) -> None:
        self.cfg, self.store, self.clock, self.hub = cfg, store, clock, hub
        self.endpoints: dict[str, WebhookEndpoint] = {w.name: w for w in cfg.webhooks}
        self.secrets = {w.name: SecretFile(w.secret_path(data_dir)) for w in cfg.webhooks}
        self._session: aiohttp.ClientSession | None = None
        self.delivered = self.failed_attempts = 0

    def check_secrets(self) -> None:
        """At start-up: create missing secret files, refuse unreadable or empty ones."""
        for name, f in self.secrets.items():
            if not f.secrets():
                from ..errors import ConfigError
                raise ConfigError(f"{f.path}: webhook {name!r} secret file holds no secret")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run_once(self) -> int:
        """Attempt every delivery that is due now. Returns how many were attempted."""
        now = int(self.clock())
        rows = await self.store.query(GSQL["due_deliveries"], (now, BATCH))
        if not rows:
            return 0
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": "micropay-webhooks/1"}, connector=aiohttp.TCPConnector(limit=PARALLEL))
        sem = asyncio.Semaphore(PARALLEL)

        async def one(d: dict[str, Any]) -> None:
            async with sem:
                await self._attempt(d)
        await asyncio.gather(*(one(row_dict(DELIVERY_FIELDS, r)) for r in rows))
        return len(rows)

    async def _attempt(self, d: dict[str, Any]) -> None:
        ep = self.endpoints.get(d["endpoint"])
        now = int(self.clock())
        lease = now + int(ep.timeout_s if ep else 0) + LEASE_S
        if not await self.store.query(GSQL["claim_delivery"], (d["event_id"], d["endpoint"], d["next_at"], lease)):
            return   # another deliverer took it
        if ep is None:
            error = "endpoint no longer configured"
        else:
            body = event_body(d)
            headers = {"Content-Type": "application/json", EVENT_ID_HEADER: str(d["event_id"]),
                       EVENT_TYPE_HEADER: d["type"], "Micropay-Delivery-Attempt": str(int(d["attempts"]) + 1),
                       SIGNATURE_HEADER: sign(body, self.secrets[ep.name].secrets(), now)}
            error = None
            try:
                assert self._session is not None
                async with self._session.post(ep.url, data=body, headers=headers, allow_redirects=False,
                                              timeout=aiohttp.ClientTimeout(total=ep.timeout_s)) as resp:
                    await resp.read()
                    if not 200 <= resp.status < 300:
                        error = f"HTTP {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__
        done_at = int(self.clock())
        if error is None:
            await self.store.query(GSQL["delivery_done"], (d["event_id"], d["endpoint"], done_at))
            self.delivered += 1
            log.info("webhook %s delivered to %s (event %s, attempt %d)", d["type"], d["endpoint"],
                     d["event_id"], int(d["attempts"]) + 1)
            return
        self.failed_attempts += 1
        attempts = int(d["attempts"]) + 1
        give_up = done_at - int(d["created_at"]) >= self.cfg.retry.give_up_after_s
        nxt = done_at + self.cfg.retry.delay(attempts)
        await self.store.query(GSQL["delivery_retry"], (d["event_id"], d["endpoint"], done_at, nxt, error,
                                                        "failed" if give_up else "pending"))
        if give_up:
            log.error("webhook to %s gave up after %d attempts (event %s): %s; "
                      "requeue with: micropay webhooks redeliver %s", d["endpoint"], attempts, d["event_id"],
                      error, d["event_id"])
        else:
            log.warning("webhook to %s failed (event %s, attempt %d): %s; next in %ds", d["endpoint"],
                        d["event_id"], attempts, error, nxt - done_at)

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
            rows = await self.store.query(GSQL["next_due"])
            if rows and rows[0][0] is not None:
                wait = max(0.05, min(idle_s, int(rows[0][0]) - self.clock()))
            if ev is not None:
                await self.hub.wait(ev, wait)
            else:
                await asyncio.sleep(wait)


async def list_deliveries(store: Store, status: str = "", endpoint: str = "", subject: str = "",
                          limit: int = 50) -> list[dict[str, Any]]:
    rows = await store.query(GSQL["list_deliveries"], (status, endpoint, subject, limit))
    return [row_dict(DELIVERY_FIELDS, r) for r in rows]


async def get_deliveries(store: Store, event_id: int) -> list[dict[str, Any]]:
    return [row_dict(DELIVERY_FIELDS, r) for r in await store.query(GSQL["get_deliveries"], (event_id,))]


async def redeliver(store: Store, event_id: int, endpoint: str = "", now: int = 0) -> list[str]:
    return [r[0] for r in await store.query(GSQL["redeliver"], (event_id, endpoint, now))]
