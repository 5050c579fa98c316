"""Live events: Server-Sent Events per purchase and per app, and a WebSocket.

Events come from the store (micropay_events, ids increasing), so a listener resumes
exactly where it left off: SSE with the Last-Event-ID header (browsers send it on
reconnect) or ?last_event_id=, the WebSocket with ?last_event_id=. Listeners in this
process are woken the moment an event is written; events written by another process
sharing the store are noticed by one poller per process (setup.watch_foreign_events)
within a second. Listeners never poll the store themselves.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web

from ..errors import BadRequest
from ..store.games import GSQL
from .api import authorize_purchase, require_key

if TYPE_CHECKING:
    from .api import Games

KEEPALIVE_S = 15.0
BATCH = 200


def _resume_from(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise BadRequest("Last-Event-ID must be an event id this API sent")
    return int(raw)


async def _start_after(games: "Games", request: web.Request, subject: str) -> int:
    after = _resume_from(request)
    if after is not None:
        return after
    if subject:
        return 0            # one purchase: replay its whole (short) history
    rows = await games.purchases.store.query(GSQL["last_event_id"])
    return int(rows[0][0])  # the app stream: from now on


async def _stream(games: "Games", after: int, subject: str, send, alive) -> None:
    """Send events with id > after, forever; `send(event)` writes one, `alive()` says
    whether the listener is still there."""
    hub = games.purchases.hub
    while alive() and not games.closing:
        ev = hub.current()
        events = await games.purchases.events_after(after, subject, BATCH)
        for e in events:
            await send(e)
            after = e.id
        if len(events) == BATCH:
            continue
        if not await hub.wait(ev, KEEPALIVE_S):
            await send(None)


async def _sse(games: "Games", request: web.Request, subject: str) -> web.StreamResponse:
    after = await _start_after(games, request, subject)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    await resp.write(b"retry: 2000\n\n")

    async def send(e) -> None:
        if e is None:
            await resp.write(b": keep-alive\n\n")
            return
        data = json.dumps(e.to_json(), separators=(",", ":"))
        await resp.write(f"id: {e.id}\nevent: {e.type}\ndata: {data}\n\n".encode())

    transport = request.transport
    with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
        await _stream(games, after, subject, send,
                      lambda: transport is not None and not transport.is_closing())
    return resp


async def purchase_events(games: "Games", request: web.Request) -> web.StreamResponse:
    pid = request.match_info["id"]
    await authorize_purchase(games, request, pid, "events:read")
    await games.purchases.get(pid)   # 404 for an unknown purchase
    return await _sse(games, request, pid)


async def app_events(games: "Games", request: web.Request) -> web.StreamResponse:
    await require_key(games, request, "events:read")
    return await _sse(games, request, "")


async def websocket(games: "Games", request: web.Request) -> web.StreamResponse:
    """?purchase_id= narrows to one purchase (required with a client token)."""
    pid = request.query.get("purchase_id", "")
    if pid:
        await authorize_purchase(games, request, pid, "events:read")
        await games.purchases.get(pid)
    else:
        await require_key(games, request, "events:read")
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
            await ws.send_str(json.dumps(e.to_json(), separators=(",", ":")))

    try:
        with contextlib.suppress(ConnectionResetError):
            await _stream(games, after, pid, send, lambda: not ws.closed and not reader.done())
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await ws.close()
    return ws
