"""Servers on a background event loop, and raw HTTP requests that no client library rewrites.

`http.client.putrequest` sends the request target exactly as given (no dot-segment
removal, no re-encoding), which is what an attacker's request line looks like. Tests
that drive it from synchronous code (hypothesis) run the servers on a loop in a thread.
"""
from __future__ import annotations

import asyncio
import http.client
import threading
from dataclasses import dataclass, field

from aiohttp import web


class LoopThread:
    """An asyncio loop on a daemon thread; `run(coro)` waits for the result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: dict[str, str]


@dataclass
class RecordingUpstream:
    """An upstream that answers 200 to everything and records what reached it."""

    seen: list[Seen] = field(default_factory=list)
    runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> "RecordingUpstream":
        async def record(request: web.Request) -> web.Response:
            self.seen.append(Seen(request.method, request.raw_path, dict(request.headers)))
            return web.Response(text=f"upstream served {request.raw_path}")
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def raw_request(port: int, method: str, target: str, headers: dict[str, str] | None = None,
                timeout: float = 10, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """Send `method target HTTP/1.1` byte for byte; returns (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, dict(resp.getheaders()), body
    finally:
        conn.close()
