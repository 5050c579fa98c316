"""The sidecar's HTTP server: aiohttp's, with what a client may hold of it bounded
(connections, a request head's size and the time it may take to arrive), requests aiohttp
cannot parse logged once per interval instead of a traceback each, and an access log that
keeps tokens out. sidecar/app.py's make_runner sets it up from the config."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from .limits import (HEADERS_LATE, Connections, ThrottledLog, escape_for_log, flush_throttled_logs, peer_key,
                     throttle_accept_errors)

log = logging.getLogger("micropay.sidecar")


# Per-line and per-field limits above aiohttp's 8 KiB default, so that an oversized
# Authorization header reaches the gate and gets a JSON 400 (the gate's own limit is
# 8 KiB); never above the head's total (`max_request_head_bytes`, see _Guarded).
MAX_HEADER_BYTES = 64 * 1024


class HeadTooLarge(BadHttpMessage):
    code = 431
    message = "Request Header Fields Too Large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"request head over {limit} bytes")
        self.limit = limit


HEAD_TOO_LARGE = ThrottledLog(log, logging.INFO, "431 to %s: request head over %d bytes (max_request_head_bytes)")
MALFORMED = ThrottledLog(log, logging.INFO, "answered %s to %s: malformed request (%s)")


class _MalformedRequests(logging.Filter):
    """aiohttp's server logger writes a traceback for every request it cannot parse
    (and for each 431 of ours): a disk filler for any client. Such reports are counted
    and logged once per interval (MALFORMED); everything else passes."""

    micropay_malformed_filter = True

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or record.levelno < logging.WARNING:
            return True                  # (aiohttp logs non-HTTP bytes on a first request at debug)
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        if isinstance(exc, HeadTooLarge):
            HEAD_TOO_LARGE(remote, exc.limit)
        else:
            what = str(exc.message or type(exc).__name__).strip().splitlines()
            MALFORMED(exc.code or 400, remote, escape_for_log(what[0] if what else type(exc).__name__)[:200])
        return False


def throttle_malformed_requests() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(getattr(f, "micropay_malformed_filter", False) for f in server_log.filters):
        server_log.addFilter(_MalformedRequests())


def settle_heap() -> None:
    """After start-up: move everything allocated so far out of the garbage collector's
    view, so collections during serving only walk request-time objects."""
    import gc
    gc.collect()
    gc.freeze()


class AccessLog(AbstractAccessLogger):
    """One line per request, without the query string: it may carry a purchase's
    client token (EventSource cannot send headers), and tokens stay out of logs. The
    path is logged as the client sent it (not decoded: `%0a` stays `%0a`), with any
    control character escaped, so that no request can write a line of its own."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info('%s "%s %s" %s %s %.1fms', request.remote, escape_for_log(request.method),
                         escape_for_log(request.raw_path.split("?", 1)[0]),
                         response.status, response.body_length, time * 1000)


def _head_end(data: bytes, *, first: bool) -> int:
    """Where the first (or last) blank line ending a head in `data` ends; -1 if none."""
    find = data.find if first else data.rfind
    ends = [i + len(t) for t in (b"\r\n\r\n", b"\n\n") if (i := find(t)) >= 0]
    return (min(ends) if first else max(ends)) if ends else -1


class _Guarded(RequestHandler):
    """aiohttp's connection handler, with what a client may hold of the server bounded:
    the connection counts against `max_connections` and its address's share (past
    either it gets a short refusal and is closed); a request's head (request line and
    headers) is at most `max_request_head_bytes` in all (past it: 431 and the connection
    closed, so that no connection holds megabytes of headers); and a head must arrive in
    full within `header_timeout_s` of the connection being made, or for a keep-alive
    connection's next request of its first byte, whether or not a request is still being
    answered (past it the connection is closed, after the response in progress). A
    client that connects and sends nothing, or trickles its headers, cannot hold a
    connection for long; an idle keep-alive connection is closed after
    `keepalive_timeout_s` (aiohttp's keep-alive timer)."""

    def __init__(self, *args: Any, header_timeout_s: float, max_head_bytes: int, connections: Connections,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._max_head_bytes = max_head_bytes
        self._head_bytes = 0                    # bytes of a head begun and not yet complete
        self._head_tail = b""                   # the last 3 bytes read
        self._body: Any = None                  # the payload of the latest request, while it arrives
        self._connections, self._counted_as = connections, None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = peer_key(transport)
        refusal = self._connections.admit(peer)
        super().connection_made(transport)
        if refusal is not None:
            transport.write(refusal)          # type: ignore[attr-defined]
            self.force_close()
            return
        self._counted_as = peer
        self._header_timer = self._loop.call_later(self._header_timeout_s, self._headers_overdue)

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close or self._upgraded or self._payload_parser is not None:
            super().data_received(data)
            return
        in_body = self._body is not None and not self._body.is_eof()
        count = self._request_count
        super().data_received(data)
        if self._force_close or self._close:
            return
        emitted = self._request_count - count
        tail, self._head_tail = self._head_tail, (self._head_tail + data[-3:])[-3:]
        if emitted:
            seen = tail + data                  # a head's end may span two reads
            if not in_body:
                end = _head_end(seen, first=True)
                if self._head_bytes + (len(data) if end < 0 else end - len(seen) + len(data)) > self._max_head_bytes:
                    self._head_too_large(emitted)
                    return
            payload = self._messages[-1][1] if self._messages else EMPTY_PAYLOAD
            if payload is EMPTY_PAYLOAD:
                # No body: what follows the last head is the start of the next one.
                end = _head_end(seen, first=False)
                self._head_bytes, self._body = (len(seen) - end if end >= 0 else 0), None
            else:
                # Its body follows; bytes of a next head sent in the same read as the
                # body's end are counted from the next read on (at most one read's worth).
                self._head_bytes, self._body = 0, payload
        elif in_body:
            self._head_bytes = 0
        else:
            self._head_bytes += len(data)
        if self._head_bytes > self._max_head_bytes:
            self._head_too_large(0)
            return
        if self._head_bytes and self._header_timer is None:
            self._header_timer = self._loop.call_later(self._header_timeout_s, self._headers_overdue)
        elif not self._head_bytes and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _head_too_large(self, emitted: int) -> None:
        """Answer 431 in turn (after any request still being answered) and read no more:
        aiohttp's own error response, queued in place of what the head would have become."""
        for _ in range(emitted):
            self._messages.pop()
        exc = HeadTooLarge(self._max_head_bytes)
        self._messages.append((_ErrInfo(status=431, exc=exc, message=exc.args[0]), EMPTY_PAYLOAD))
        self._close = True                     # no more reads; closed after the 431
        self._head_bytes, self._body = 0, None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if self._force_close or self._close:
            return
        if self._request_count == 0 or self._head_bytes:
            HEADERS_LATE(self._counted_as or "?", self._header_timeout_s)
            if not self._messages and self._current_request is None:
                self.force_close()
            else:
                self.close()                   # after the response in progress

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._counted_as is not None:
            self._connections.release(self._counted_as)
            self._counted_as = None
        super().connection_lost(exc)


class _Server(web.Server):
    def __init__(self, *args: Any, header_timeout_s: float, max_head_bytes: int, connections: Connections,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout_s, self._max_head_bytes = header_timeout_s, max_head_bytes
        self.open_connections = connections

    def __call__(self) -> RequestHandler:
        return _Guarded(self, loop=self._loop, header_timeout_s=self._header_timeout_s,
                        max_head_bytes=self._max_head_bytes, connections=self.open_connections, **self._kwargs)


class _Runner(web.AppRunner):
    """An AppRunner whose connections are bounded (see _Guarded), and whose loop logs
    failed accepts once per interval (limits.throttle_accept_errors), as it does the
    requests aiohttp cannot parse (_MalformedRequests)."""

    def __init__(self, app: web.Application, *, header_timeout_s: float, max_head_bytes: int,
                 connections: Connections, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s, self._max_head_bytes = header_timeout_s, max_head_bytes
        self.open_connections = connections

    async def cleanup(self) -> None:
        await super().cleanup()
        flush_throttled_logs()          # what was counted but not yet logged
        for throttled in (HEAD_TOO_LARGE, MALFORMED):
            if throttled._timer is not None:
                throttled._timer.cancel()
            throttled.flush()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        throttle_accept_errors(asyncio.get_running_loop())
        throttle_malformed_requests()
        # Same handler and settings as aiohttp's own server, with the bounds added.
        return _Server(server.request_handler, request_factory=server.request_factory,
                       handler_cancellation=server.handler_cancellation, loop=server._loop,
                       header_timeout_s=self._header_timeout_s, max_head_bytes=self._max_head_bytes,
                       connections=self.open_connections, **server._kwargs)
