"""What one client may hold of the sidecar: connections, time to send a request body,
and log lines.

- Connections: at most `max_connections` open at once (by default what the open-files
  limit leaves), and at most a client address's share of them. A connection past
  either is answered with a short 503 / 429 and closed at once.
- Request bodies: the gate and the reverse proxy read a body within `body_timeout_s`
  of asking for it, up to a size limit, before anything else is spent on it (an
  upstream connection, a charge). A body too large to read first (over 1 MiB) is
  streamed after its first MiB, at no less than `body_min_rate_bytes_s` on average:
  it holds an upstream connection for a bounded time, however it is paced.
- Log lines: what a client can cause many times a second (a refused connection, a
  closed silent one, a body cut off mid-way, the accept loop's "too many open files")
  is logged once per interval with a count, never once per event.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from aiohttp import web

from ..core.errors import RequestBodyTooLarge, RequestTimeout
from ..http.bodies import ClientGoneMidBody
from ..core.ratelimit import client_address

log = logging.getLogger("micropay.sidecar")
LOG_INTERVAL_S = 10.0
# Descriptors left to everything but client connections (store, key files, logs, the
# resolver) when max_connections comes from the open-files limit; an upstream pool is
# reserved on top.
RESERVED_FDS = 64


class ThrottledLog:
    """One kind of event, logged at most once per `interval_s`: the first at once, the
    rest of the interval as one line with their count when it ends."""

    def __init__(self, logger: logging.Logger, level: int, message: str,
                 interval_s: float = LOG_INTERVAL_S) -> None:
        self.logger, self.level, self.message, self.interval_s = logger, level, message, interval_s
        self.pending, self.args = 0, ()
        self.total = 0
        self._logged_at = -float("inf")
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, *args: Any) -> None:
        self.total += 1
        self.pending += 1
        self.args = args
        if self._timer is not None:
            return
        wait = self._logged_at + self.interval_s - time.monotonic()
        if wait <= 0:
            self.flush()
            return
        try:
            self._timer = asyncio.get_running_loop().call_later(wait, self.flush)
        except RuntimeError:                 # no loop (a test calling it directly)
            self.flush()

    def flush(self) -> None:
        self._timer = None
        if not self.pending:
            return
        if self.pending == 1:
            self.logger.log(self.level, self.message, *self.args)
        else:
            self.logger.log(self.level, self.message + " (%d times in the last %g s; the latest shown)",
                            *self.args, self.pending, self.interval_s)
        self.pending = 0
        self._logged_at = time.monotonic()


ACCEPT_FAILED = ThrottledLog(log, logging.ERROR, "cannot accept connections: %s (raise the open-files limit, "
                             "or lower max_connections)")
HEADERS_LATE = ThrottledLog(log, logging.INFO, "closed a connection from %s: request headers not complete "
                            "within %.0f s of connecting")
CONNECTION_REFUSED = ThrottledLog(log, logging.WARNING, "refused a connection from %s: %s")
BODY_LATE = ThrottledLog(log, logging.INFO, "%s %s from %s: %s")
BODY_CUT = ThrottledLog(log, logging.INFO, "%s %s from %s: the client closed the connection in the middle of "
                        "its request body")


def flush_throttled_logs() -> None:
    for throttled in (ACCEPT_FAILED, HEADERS_LATE, CONNECTION_REFUSED, BODY_LATE, BODY_CUT):
        if throttled._timer is not None:
            throttled._timer.cancel()
        throttled.flush()


def throttle_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio logs a traceback for every failed accept() (EMFILE, ENFILE, ENOBUFS,
    ENOMEM), up to a backlog's worth per attempt, and retries every second: a disk
    filler while descriptors run out. Count them and log one line per interval instead;
    every other report goes where it went before."""
    previous = loop.get_exception_handler()
    if getattr(previous, "micropay_accept_throttle", False):
        return

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            ACCEPT_FAILED(context.get("exception"))
        elif getattr(getattr(context.get("handle"), "_callback", None), "__name__", "") == "_start_serving":
            # One of the retries asyncio scheduled for each failed accept, run after the
            # listening socket was closed (at shutdown): nothing is wrong.
            log.debug("an accept retry after the listener closed: %s", context.get("exception"))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.micropay_accept_throttle = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


def open_files_limit() -> int | None:
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def connection_limit(configured: int, upstream_pool: int) -> int:
    """`max_connections`, or when it is 0 what the open-files limit leaves for client
    connections (at least 32; 10,000 where the limit is unknown)."""
    if configured:
        return configured
    soft = open_files_limit()
    if soft is None:
        return 10_000
    return max(32, soft - RESERVED_FDS - upstream_pool)


class Connections:
    """The open client connections, in all and per client address. A client's share is
    `per_client`, and never more than a quarter of the limit."""

    def __init__(self, limit: int, per_client: int, *, by_address: bool = True) -> None:
        self.limit = limit
        self.share = min(per_client, max(1, limit // 4))
        self.by_address = by_address          # False behind a proxy: every peer is the proxy
        self.open = 0
        self.per_address: dict[str, int] = {}

    def admit(self, peer: str) -> bytes | None:
        """None if a connection from `peer` may stay open (and is now counted); else the
        response to write before closing it."""
        if self.open >= self.limit:
            CONNECTION_REFUSED(peer, f"{self.open} connections are open (max_connections = {self.limit})")
            return _refusal(503, "Service Unavailable", "the server holds as many connections as it takes; "
                            "retry shortly")
        if self.by_address:
            held = self.per_address.get(peer, 0)
            if held >= self.share:
                CONNECTION_REFUSED(peer, f"it holds {held} connections (its share: {self.share})")
                return _refusal(429, "Too Many Requests", f"this address holds {held} connections, its share "
                                "of the server; close some or reuse them (keep-alive)")
            self.per_address[peer] = held + 1
        self.open += 1
        return None

    def release(self, peer: str) -> None:
        self.open -= 1
        if self.by_address:
            held = self.per_address.get(peer, 0) - 1
            if held > 0:
                self.per_address[peer] = held
            else:
                self.per_address.pop(peer, None)


def peer_key(transport: asyncio.BaseTransport) -> str:
    """The address a connection counts against (IPv6 per /64, like the rate limits)."""
    peer = transport.get_extra_info("peername")
    host = peer[0] if isinstance(peer, (tuple, list)) and peer else (peer or "unix")
    return client_address(str(host), (), 0)


def _refusal(status: int, reason: str, detail: str) -> bytes:
    import json
    body = json.dumps({"type": "about:blank", "title": reason, "status": status,
                       "error": "too_many_connections", "detail": detail}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/problem+json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 5\r\nConnection: close\r\n\r\n").encode() + body


async def read_body(request: web.Request, *, max_bytes: int, timeout_s: float,
                    buffer_bytes: int) -> tuple[bytes, bool]:
    """Read a request body within `timeout_s`: all of it when it is at most
    `buffer_bytes`, else its first `buffer_bytes` or a little more. Returns (what was
    read, True if that is the whole body). RequestBodyTooLarge for a declared length
    over `max_bytes`; RequestTimeout when the body (or its first part) is late."""
    length = request.content_length
    if length is not None and length > max_bytes:
        raise RequestBodyTooLarge(f"the request body is {length} bytes; this server takes at most {max_bytes}")
    content, parts, n = request.content, [], 0
    try:
        async with asyncio.timeout(timeout_s):
            while n <= buffer_bytes:
                chunk = await content.readany()
                if not chunk:
                    return b"".join(parts), True
                parts.append(chunk)
                n += len(chunk)
                if n > max_bytes:
                    raise RequestBodyTooLarge(f"the request body is over {max_bytes} bytes, the most this "
                                              "server takes")
    except TimeoutError:
        raise _late(request, f"{n} bytes of the request body arrived in {timeout_s:.0f} s") from None
    except ConnectionResetError:
        raise client_gone(request) from None
    return b"".join(parts), content.at_eof()


def client_gone(request: web.Request) -> ClientGoneMidBody:
    """A client that closed its connection mid-body: counted in a throttled log line
    (never a traceback per event: a disk filler), and answered to nobody."""
    BODY_CUT(request.method, escape_for_log(request.raw_path.split("?", 1)[0]), request.remote)
    return ClientGoneMidBody()


def _late(request: web.Request, what: str) -> RequestTimeout:
    BODY_LATE(request.method, escape_for_log(request.raw_path.split("?", 1)[0]), request.remote, what)
    return RequestTimeout(f"{what}; a request body must arrive within the server's body deadline "
                          "(send it at once, or at a steady pace)")


async def rest_of_body(request: web.Request, first: bytes, *, max_bytes: int, idle_s: float,
                       min_rate: int | None = None) -> AsyncIterator[bytes]:
    """`first` (read by read_body), then the rest of the body as it arrives: no pause
    longer than `idle_s`, at most `max_bytes` in all, and (with `min_rate`) at an average
    of at least `min_rate` bytes a second with `idle_s` to spare: by `t` seconds after the
    first part, at least (t - idle_s) x min_rate bytes more have arrived. So a body holds
    an upstream connection for at most idle_s + max_bytes / min_rate seconds, however
    it is paced. A body that breaks a rule ends the upload with BodyCut (the upstream
    has received part of it)."""
    yield first
    n, content = len(first), request.content
    started, rest = time.monotonic(), 0
    while True:
        wait, rate_bound = idle_s, False
        if min_rate:
            due = started + idle_s + rest / min_rate - time.monotonic()
            if due < idle_s:
                wait, rate_bound = due, True
        try:
            if wait <= 0:
                raise TimeoutError
            async with asyncio.timeout(wait):
                chunk = await content.readany()
        except TimeoutError:
            if rate_bound:
                _late(request, f"the request body arrived slower than {min_rate} bytes/s "
                      f"({rest} bytes in {time.monotonic() - started:.0f} s after its first part)")
                raise BodyCut(f"the client sent its request body slower than {min_rate} bytes/s") from None
            _late(request, f"no part of the request body arrived for {idle_s:.0f} s")
            raise BodyCut(f"the client paused its request body for over {idle_s:.0f} s") from None
        except ConnectionResetError:
            client_gone(request)
            raise BodyCut("the client closed the connection in the middle of its request body") from None
        if not chunk:
            return
        n += len(chunk)
        rest += len(chunk)
        if n > max_bytes:
            raise BodyCut(f"the request body passed {max_bytes} bytes, the most this server takes")
        yield chunk


class BodyCut(Exception):
    """A streamed request body broke a limit after part of it was forwarded."""


def escape_for_log(text: str) -> str:
    """`text` with every control character (C0, DEL, C1, line and paragraph separators)
    and every raw byte that was not UTF-8 percent-encoded: nothing a client sends can
    start a line of its own, or pass for another, in a log."""
    if text.isprintable() and text.isascii():
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0 or not ch.isprintable() or 0xD800 <= o < 0xE000:
            raw = ch.encode("utf-8", "surrogateescape" if 0xDC80 <= o <= 0xDCFF else "surrogatepass")
            out.append("".join(f"%{b:02X}" for b in raw))
        else:
            out.append(ch)
    return "".join(out)
