"""Live events: Server-Sent Events per purchase and per app, and a WebSocket.

Events come from the store (micropay_events, ids increasing), so a listener resumes
exactly where it left off: SSE with the Last-Event-ID header (browsers send it on
reconnect) or ?last_event_id=, the WebSocket with ?last_event_id=.

One EventFeed per process reads each new event from the store once and keeps the
newest ones in memory; every listener takes what it needs from there, so an event
costs one store read whatever the number of listeners. Only a listener resuming from
further back than the feed holds reads the store itself, until it has caught up.
Events written by another process sharing the store are noticed by one poller per
process (setup.watch_foreign_events) within a second.

Concurrent streams are capped overall and per credential (API key, or a purchase's
client token): past the cap, a 429 with Retry-After.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from typing import Callable

from aiohttp import WSMsgType, web

from ...core.errors import BadRequest
from ...core.inputs import decimal
from ..events import BATCH, FEED_CAPACITY, EventHub
from ..repository import EventRecord
from ..service import Games
from .common import authorize_purchase, require_key

log = logging.getLogger("micropay.live")
KEEPALIVE_S = 15.0
PRESENCE_S = 1.0       # how often a waiting stream checks that its listener is still there


@functools.lru_cache(maxsize=FEED_CAPACITY)
def _payload(e: EventRecord) -> str:
    """An event as sent, serialised once for all its listeners."""
    return json.dumps(e.to_json(), separators=(",", ":"))


def _resume_from(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if raw is None or raw == "":
        return None
    value = decimal(raw)
    if value is None:
        raise BadRequest("Last-Event-ID must be an event id this API sent")
    return value


async def _start_after(games: Games, request: web.Request, subject: str) -> int:
    after = _resume_from(request)
    if after is not None:
        return after
    if subject:
        return 0            # one purchase: replay its whole (short) history
    return await games.purchases.last_event_id()   # the app stream: from now on


async def _stream(games: Games, after: int, subject: str, send, alive) -> None:
    """Send events with id > after, forever; `send(event)` writes one (None: a keep-alive),
    `alive()` says whether the listener is still there."""
    feed, hub = games.feed, games.purchases.hub
    while alive() and not games.closing:
        changed, written = feed.current(), hub.current()
        found = feed.after(after, subject)
        if found is None:            # further back than the feed holds: read the store
            events = await games.purchases.events_after(after, subject, BATCH)
            for e in events:
                await send(e)
                after = e.id
            if len(events) == BATCH:
                continue
            if feed.floor is not None:
                after = max(after, feed.floor)   # everything up to the feed's floor was just read
                continue
            woke = await _wait(written, alive)   # no feed (yet): wake on any write
        else:
            events, after = found
            for e in events:
                await send(e)
            woke = await _wait(changed, alive)
        if not woke:
            await send(None)


async def _wait(ev: asyncio.Event, alive: Callable[[], bool]) -> bool:
    """True when `ev` is set or the listener has left; False when it is time for a
    keep-alive. A listener that left frees its stream slot within PRESENCE_S."""
    for _ in range(int(KEEPALIVE_S / PRESENCE_S)):
        if await EventHub.wait(ev, PRESENCE_S) or not alive():
            return True
    return False


async def _sse(games: Games, request: web.Request, subject: str, credential: str) -> web.StreamResponse:
    with games.streams.hold(credential):
        after = await _start_after(games, request, subject)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        await resp.write(b"retry: 2000\n\n")

        async def send(e) -> None:
            if e is None:
                await resp.write(b": keep-alive\n\n")
                return
            await resp.write(f"id: {e.id}\nevent: {e.type}\ndata: {_payload(e)}\n\n".encode())

        transport = request.transport
        with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
            await _stream(games, after, subject, send,
                          lambda: transport is not None and not transport.is_closing())
        return resp


async def purchase_events(games: Games, request: web.Request) -> web.StreamResponse:
    pid = request.match_info["id"]
    credential = await authorize_purchase(games, request, pid, "events:read")
    await games.purchases.get(pid)   # 404 for an unknown purchase
    return await _sse(games, request, pid, credential)


async def app_events(games: Games, request: web.Request) -> web.StreamResponse:
    key = await require_key(games, request, "events:read")
    return await _sse(games, request, "", f"key:{key.kid}")


async def websocket(games: Games, request: web.Request) -> web.StreamResponse:
    """?purchase_id= narrows to one purchase (required with a client token)."""
    pid = request.query.get("purchase_id", "")
    if pid:
        credential = await authorize_purchase(games, request, pid, "events:read")
        await games.purchases.get(pid)
    else:
        credential = f"key:{(await require_key(games, request, 'events:read')).kid}"
    with games.streams.hold(credential):
        after = await _start_after(games, request, pid)
        ws = web.WebSocketResponse(heartbeat=KEEPALIVE_S)
        await ws.prepare(request)

        async def drain() -> None:   # the client sends nothing we need; notice when it leaves
            async for msg in ws:
                if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                    break
        reader = asyncio.create_task(drain())

        async def send(e) -> None:
            if e is not None:
                await ws.send_str(_payload(e))

        try:
            with contextlib.suppress(ConnectionResetError):
                await _stream(games, after, pid, send, lambda: not ws.closed and not reader.done())
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await ws.close()
        return ws
