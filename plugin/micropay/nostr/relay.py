"""A connection to one Nostr relay (NIP-01 over a websocket), kept open for the life of
its task: reconnected with backoff when the relay goes away, its subscriptions sent again
on every new connection. Publishing waits for the relay's OK, within a timeout.

Bounded: frames above MAX_FRAME bytes end the connection (the relay is then reconnected),
at most MAX_PENDING publishes wait for an OK at once, and an event that does not parse or
verify is dropped, counted and never handed on.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp

from ..core.tasks import Backoff
from .event import Event, parse_event
from .keys import NostrError
from .urls import relay_url

log = logging.getLogger("micropay.nostr")
MAX_FRAME = 512 * 1024
MAX_PENDING = 1024
CONNECT_TIMEOUT_S = 10.0

OnEvent = Callable[[str, Event], Awaitable[None] | None]


class RelayError(Exception):
    """A publish the relay did not take: refused, not connected, or no answer in time."""


@dataclass
class RelayStats:
    connects: int = 0
    dropped_events: int = 0
    notices: list[str] = field(default_factory=list)


class Relay:
    def __init__(self, url: str, on_event: OnEvent, *, session: aiohttp.ClientSession | None = None,
                 backoff: Backoff | None = None, on_connect: Callable[[], Awaitable[None]] | None = None) -> None:
        self.url = relay_url(url)
        self.on_event, self.on_connect = on_event, on_connect
        self._session, self._own_session = session, session is None
        self.backoff = backoff or Backoff(first_s=0.5, max_s=60.0)
        self.subscriptions: dict[str, list[dict[str, Any]]] = {}
        self.stats = RelayStats()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[str, asyncio.Future[tuple[bool, str]]] = {}
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- life ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"nostr-relay {self.url}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._ws is not None:
            await self._ws.close()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def _run(self) -> None:
        while True:
            try:
                await self._connect_and_read()
                self.backoff.reset()
                wait = self.backoff.first_s
            except asyncio.CancelledError:
                raise
            except Exception as exc:            # refused, reset, bad frame: try again later
                wait = self.backoff.next()
                log.warning("relay %s: %s; reconnecting in %.1fs", self.url, exc or type(exc).__name__, wait)
            finally:
                self._connected.clear()
                self._ws = None
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(RelayError(f"relay {self.url} went away"))
                self._pending.clear()
            await asyncio.sleep(wait)

    async def _connect_and_read(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        async with self._session.ws_connect(self.url, max_msg_size=MAX_FRAME, heartbeat=30.0,
                                            timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                                            autoping=True) as ws:
            self._ws = ws
            self.stats.connects += 1
            for sub_id, filters in list(self.subscriptions.items()):
                await ws.send_str(json.dumps(["REQ", sub_id, *filters]))
            self._connected.set()
            log.info("relay %s: connected", self.url)
            if self.on_connect is not None:       # on a task: it may publish, which needs this loop reading
                asyncio.get_running_loop().create_task(self._guarded(self.on_connect()))
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    try:
                        await self._on_message(msg.data)
                    except Exception as exc:         # one odd frame never ends the connection
                        self.stats.dropped_events += 1
                        log.debug("relay %s: dropped a message: %r", self.url, exc)
                elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                    break
            if ws.exception() is not None:
                raise ConnectionError(str(ws.exception()))
            raise ConnectionError("the relay closed the connection")

    async def _guarded(self, coro: Awaitable[None]) -> None:
        try:
            await coro
        except Exception as exc:
            log.warning("relay %s: after connecting: %s", self.url, exc)

    async def _on_message(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            self.stats.dropped_events += 1
            return
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
            return
        kind = msg[0]
        if kind == "EVENT" and len(msg) == 3 and isinstance(msg[1], str) and msg[1] in self.subscriptions:
            try:
                event = parse_event(msg[2])
            except NostrError as exc:
                self.stats.dropped_events += 1
                log.debug("relay %s: dropped an event: %s", self.url, exc)
                return
            try:
                result = self.on_event(msg[1], event)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("relay %s: handling event %s failed", self.url, event.id)
        elif kind == "OK" and len(msg) >= 3 and isinstance(msg[1], str):
            fut = self._pending.pop(msg[1], None)
            if fut is not None and not fut.done():
                fut.set_result((msg[2] is True, str(msg[3]) if len(msg) > 3 else ""))
        elif kind == "NOTICE" and len(msg) >= 2:
            self.stats.notices = [*self.stats.notices[-9:], str(msg[1])[:200]]
            log.info("relay %s says: %s", self.url, str(msg[1])[:200])
        elif kind == "CLOSED" and len(msg) >= 2 and isinstance(msg[1], str) and msg[1] in self.subscriptions:
            log.warning("relay %s closed subscription %s: %s", self.url, msg[1],
                        str(msg[2])[:200] if len(msg) > 2 else "")

    # -- use --------------------------------------------------------------------------
    async def subscribe(self, sub_id: str, filters: list[dict[str, Any]]) -> None:
        """Keep a subscription open: sent now if connected, and again on every reconnect."""
        self.subscriptions[sub_id] = filters
        if self._ws is not None and self.connected:
            await self._ws.send_str(json.dumps(["REQ", sub_id, *filters]))

    async def unsubscribe(self, sub_id: str) -> None:
        if self.subscriptions.pop(sub_id, None) is not None and self._ws is not None and self.connected:
            await self._ws.send_str(json.dumps(["CLOSE", sub_id]))

    async def publish(self, event: Event, timeout_s: float = 10.0) -> None:
        """Send `event` and wait for the relay to take it. Raises RelayError."""
        if self._ws is None or not self.connected:
            raise RelayError(f"not connected to relay {self.url}")
        if len(self._pending) >= MAX_PENDING:
            raise RelayError(f"relay {self.url}: too many events waiting for an answer")
        fut = self._pending.get(event.id)
        if fut is None:
            fut = self._pending[event.id] = asyncio.get_running_loop().create_future()
            await self._ws.send_str(json.dumps(["EVENT", event.as_json()], ensure_ascii=False))
        try:
            accepted, message = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            self._pending.pop(event.id, None)
            raise RelayError(f"relay {self.url} did not answer within {timeout_s:.0f}s") from None
        if not accepted and not message.startswith("duplicate"):
            raise RelayError(f"relay {self.url} refused the event: {message[:200]}")


class RelayPool:
    """The same subscriptions on several relays; a publish goes to every connected one and
    counts as done when one of them took it. Incoming events arrive once per relay that
    has them: the handler dedupes (by event id)."""

    def __init__(self, urls: list[str], on_event: OnEvent, *,
                 on_connect: Callable[[], Awaitable[None]] | None = None) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.urls = list(dict.fromkeys(relay_url(u) for u in urls))
        self.on_event, self.on_connect = on_event, on_connect
        self.relays: list[Relay] = []
        self.subscriptions: dict[str, list[dict[str, Any]]] = {}

    def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self.relays = [Relay(u, self.on_event, session=self._session, on_connect=self.on_connect) for u in self.urls]
        for r in self.relays:
            r.subscriptions = dict(self.subscriptions)     # what was asked for before the start
            r.start()

    async def close(self) -> None:
        for r in self.relays:
            await r.close()
        if self._session is not None:
            await self._session.close()

    async def subscribe(self, sub_id: str, filters: list[dict[str, Any]]) -> None:
        """Kept, and sent to every relay (now, or when it is started)."""
        self.subscriptions[sub_id] = filters
        for r in self.relays:
            await r.subscribe(sub_id, filters)

    async def publish(self, event: Event, timeout_s: float = 10.0) -> bool:
        live = [r for r in self.relays if r.connected]
        if not live:
            return False
        results = await asyncio.gather(*(r.publish(event, timeout_s) for r in live), return_exceptions=True)
        failed = [res for res in results if isinstance(res, BaseException)]
        for exc in failed:
            log.info("publishing %s: %s", event.id[:12], exc)
        return len(failed) < len(results)

    async def wait_connected(self, timeout_s: float) -> bool:
        results = await asyncio.gather(*(r.wait_connected(timeout_s) for r in self.relays))
        return any(results)
