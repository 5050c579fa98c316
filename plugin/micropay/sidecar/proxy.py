"""Reverse proxy to the upstream API: bodies streamed both ways, hop-by-hop headers dropped.

The upstream receives exactly the canonical target the gate priced (core/canonical.py), never
the client's own spelling of it. The L402 credential is not forwarded (the upstream
never sees preimages); the token id and payment hash are passed as X-L402-Token-Id /
X-L402-Payment-Hash instead. Headers the proxy sets are always its own: a client's copy
is dropped first, in every spelling an upstream may read as ours (`X_L402_Token_Id`:
WSGI and CGI servers map `_` and `-` to one name), and so are the method-override
headers (the gate priced the request's own method) and the URL overrides some
upstreams route on (X-Original-URL, X-Rewrite-URL, X-Original-URI: the gate priced the
request's own path). The proxy adds no header of its own beyond those (no
Accept-Encoding, Accept or User-Agent).

A request body is read before an upstream connection is taken: whole when it is at
most 1 MiB, within `body_timeout_s` (a client trickling its body holds no upstream
connection); a larger one once its first MiB has arrived, the rest streamed at no less
than `body_min_rate_bytes_s` on average (so it holds a connection for a bounded time). Each
client holds at most `upstream_connections_per_client` of the pool at once.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from ..core.errors import UpstreamBusy, UpstreamError, UpstreamUnreachable
from ..http.caching import make_private
from ..l402.wire import SCHEMES
from ..payment.scheme import is_payment
from ..seller.pricing import Pricing
from .gate import BODY, MAX_BOUND_BODY, PAID, STREAM_HEADER, request_target
from .limits import escape_for_log, read_body, rest_of_body
from .session_gate import SESSION_METER, SSE_TYPE, ClientGone, SessionMeter

if TYPE_CHECKING:
    from ..seller.config import Config

log = logging.getLogger("micropay.proxy")
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Trailers", "Transfer-Encoding", "Upgrade", "Proxy-Connection"))
TOKEN_ID_HEADER, PAYMENT_HASH_HEADER = "X-L402-Token-Id", "X-L402-Payment-Hash"
# Set by this proxy only; a client's value would be taken for ours by the upstream.
PROXY_OWNED = (TOKEN_ID_HEADER, PAYMENT_HASH_HEADER, "X-Forwarded-Proto", "X-Forwarded-Host")
# What the client may not pass on when X-Forwarded-For is not trusted.
FORWARDING = ("X-Forwarded-For", "Forwarded", "X-Real-IP")
# Headers that make some frameworks serve another method than the one the gate priced.
METHOD_OVERRIDES = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
# Headers that make some frameworks (legacy Symfony, Zend, IIS's URL Rewrite) serve
# another path than the one the gate priced.
URL_OVERRIDES = ("X-Original-URL", "X-Rewrite-URL", "X-Original-URI")
# Headers aiohttp's client adds when the request has none; a proxy adds none of them.
NOT_ADDED = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
CHUNK = 64 * 1024
# Header names as an upstream may read them: WSGI (wsgiref, gunicorn's environ), CGI and
# PHP turn `-` into `_` (and some other punctuation), case-insensitively.
_FOLD = str.maketrans({c: "-" for c in "_.!#$%&'*+^`|~"})


def header_form(name: str) -> str:
    """The name `name` is read as by an upstream that folds `_` into `-` and ignores case."""
    return name.lower().translate(_FOLD)


_OWNED_FORMS = frozenset(header_form(n) for n in (*PROXY_OWNED, STREAM_HEADER, *METHOD_OVERRIDES,
                                                   *URL_OVERRIDES))
_FORWARDING_FORMS = frozenset(header_form(n) for n in FORWARDING)


@dataclass(frozen=True)
class ProxyLimits:
    pool: int = 256                  # connections to upstreams, in all
    per_client: int = 32             # of which one client may hold at once
    body_timeout_s: float = 30.0     # a body's first MiB (a smaller one: all of it) arrives within this
    max_body_bytes: int = 64 * 1024 ** 2
    body_min_rate: int = 64 * 1024   # a streamed body's rest arrives at this many bytes/s on average

    @classmethod
    def of(cls, cfg: "Config") -> "ProxyLimits":
        return cls(pool=cfg.upstream_connections, per_client=cfg.upstream_connections_per_client,
                   body_timeout_s=cfg.body_timeout_s, max_body_bytes=cfg.max_body_bytes,
                   body_min_rate=cfg.body_min_rate_bytes_s)


def _strip_hop_by_hop(headers: "CIMultiDict[str] | aiohttp.typedefs.LooseHeaders") -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict(headers)
    listed = {t.strip().lower() for v in out.getall(hdrs.CONNECTION, []) for t in v.split(",")}
    for name in list(out.keys()):
        if name.lower() in HOP_BY_HOP or name.lower() in listed:
            out.popall(name, None)
    return out


class ReverseProxy:
    def __init__(self, pricing: Pricing, default_upstream: str | None,
                 timeout: aiohttp.ClientTimeout | None = None, *, trust_forwarded_for: bool = False,
                 client_key: Callable[[web.Request], str] | None = None, limits: ProxyLimits | None = None) -> None:
        self.pricing, self.default_upstream = pricing, default_upstream
        self.trust_forwarded_for = trust_forwarded_for
        self.timeout = timeout or aiohttp.ClientTimeout(total=None, connect=10, sock_read=300)
        self.limits = limits or ProxyLimits()
        self.client_key = client_key or (lambda request: request.remote or "")
        self.held: dict[str, int] = {}        # upstream connections in use, per client
        self._session: aiohttp.ClientSession | None = None

    async def cleanup_ctx(self, app: web.Application):  # aiohttp cleanup context
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.limits.pool), timeout=self.timeout, auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=NOT_ADDED)
        yield
        await self._session.close()

    def upstream_for(self, method: str, path: str) -> str | None:
        rule = self.pricing.match(method, path)
        return (rule.upstream if rule and rule.upstream else None) or self.default_upstream

    def forward_headers(self, request: web.Request) -> CIMultiDict[str]:
        headers = _strip_hop_by_hop(request.headers)
        headers.popall(hdrs.HOST, None)
        auth = headers.get(hdrs.AUTHORIZATION, "")
        if auth.split(" ", 1)[0].upper() in SCHEMES or is_payment(auth):
            headers.popall(hdrs.AUTHORIZATION)      # the preimage never reaches the upstream
        prior = ", ".join(headers.getall("X-Forwarded-For", ())) if self.trust_forwarded_for else ""
        for name in list(headers.keys()):
            form = header_form(name)
            # Ours (and the stream secret, method and URL overrides) in any spelling; the
            # forwarding headers unless trusted, and then in their own spelling only.
            if form in _OWNED_FORMS or (form in _FORWARDING_FORMS
                                         and (not self.trust_forwarded_for or name.lower() != form)):
                headers.popall(name, None)
        paid = request.get(PAID)
        if paid is not None:
            if paid.token_id:
                headers[TOKEN_ID_HEADER] = paid.token_id
            headers[PAYMENT_HASH_HEADER] = paid.payment_hash    # a session's: its deposit's
        peer = request.remote or ""
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Host"] = request.host
        return headers

    async def handle(self, request: web.Request) -> web.StreamResponse:
        target = request_target(request)
        upstream = self.upstream_for(request.method, target.path)
        if upstream is None:
            raise web.HTTPNotFound()
        assert self._session is not None, "proxy used outside its cleanup context"
        url = URL(upstream.rstrip("/") + target.path_qs, encoded=True)
        # A body the gate read (to bind a Payment charge to it) is forwarded as read; any
        # other is read here first (a larger one: its first MiB, then streamed), so that a
        # client sending it slowly holds no upstream connection while it does.
        limits = self.limits
        body = request.get(BODY)
        if body is None and request.body_exists:
            first, whole = await read_body(request, max_bytes=limits.max_body_bytes,
                                           timeout_s=limits.body_timeout_s, buffer_bytes=MAX_BOUND_BODY)
            body = first if whole else rest_of_body(request, first, max_bytes=limits.max_body_bytes,
                                                    idle_s=limits.body_timeout_s, min_rate=limits.body_min_rate)
        client = self.client_key(request)
        held = self.held.get(client, 0)
        if held >= limits.per_client:
            raise UpstreamBusy(f"this client has {held} requests at the upstream already, its share of the "
                               "proxy's connections; retry when one has finished", retry_after_s=1)
        self.held[client] = held + 1
        try:
            return await self._forward(request, upstream, url, body, target.path)
        finally:
            left = self.held.get(client, 1) - 1
            if left > 0:
                self.held[client] = left
            else:
                self.held.pop(client, None)

    async def _forward(self, request: web.Request, upstream: str, url: URL, body, path: str) -> web.StreamResponse:
        assert self._session is not None
        try:
            upstream_resp = await self._session.request(
                request.method, url, headers=self.forward_headers(request), data=body, allow_redirects=False)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            log.warning("upstream %s unreachable: %s", upstream, exc)
            raise UpstreamUnreachable(f"upstream unavailable ({type(exc).__name__})") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The request may have reached the upstream (and been acted on): not refundable.
            # (A streamed body that broke a limit, limits.BodyCut, arrives here too.)
            log.warning("upstream %s failed: %s", upstream, exc)
            raise UpstreamError(f"upstream failed ({type(exc).__name__})") from None
        async with upstream_resp:
            response = web.StreamResponse(status=upstream_resp.status, reason=upstream_resp.reason,
                                          headers=_strip_hop_by_hop(upstream_resp.headers))
            paid = request.get(PAID)
            if paid is not None:
                response.headers.update(paid.headers)   # receipt, credits left
                make_private(response.headers)          # a receipt is never for a shared cache
            await response.prepare(request)
            meter = request.get(SESSION_METER)
            try:
                # (a HEAD has no body to meter: its unit is the request's, like any other)
                if meter is not None and upstream_resp.content_type == SSE_TYPE and request.method != "HEAD":
                    await metered_events(upstream_resp.content.iter_chunked(CHUNK), response, meter)
                    return response
                async for chunk in upstream_resp.content.iter_chunked(CHUNK):
                    await response.write(chunk)
            except ConnectionError:
                # Writing to the client failed: ClientConnectionResetError for a closing
                # transport (also a ClientError: told apart first), a plain ConnectionError
                # ("Connection lost") for a write that waited on a full socket when the
                # client reset it. Nothing is wrong upstream.
                log.info("client %s disconnected during the response to %s %s", request.remote, request.method,
                         escape_for_log(path))
                return response
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Too late for an error response: cut the connection so that the client
                # sees a truncated body rather than a complete-looking one.
                log.warning("upstream %s broke off its response: %s", upstream, exc)
                if request.transport is not None:
                    request.transport.abort()
                return response
            await response.write_eof()
            return response

    # The gate need not redirect a non-canonical spelling: the canonical target is what is forwarded.
    handle.forwards_target = True  # type: ignore[attr-defined]


# An event ends at an empty line; a line ends in CRLF, LF or CR, mixed as the SSE
# standard allows (`\n\r\n` ends an event too).
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
MAX_EVENT = 1024 ** 2


def _split_event(buf: bytearray) -> bytes | None:
    """The first complete SSE event in `buf` (removed from it), or None. A CR at the
    very end of `buf` may be the first half of a CRLF: wait for the next byte."""
    m = _EVENT_END.search(buf)
    if m is None or (m.end() == len(buf) and buf.endswith(b"\r")):
        return None
    event = bytes(buf[:m.end()])
    del buf[:m.end()]
    return event


def _billable(event: bytes) -> bool | None:
    """True for an event that carries data (one unit), None for the `[DONE]` sentinel,
    False for comments and keep-alives (free). A `data` field may come with a colon and
    a value, or alone (an empty value)."""
    data = [ln for ln in event.splitlines() if ln == b"data" or ln.startswith(b"data:")]
    if not data:
        return False
    if len(data) == 1 and data[0][5:].strip() == b"[DONE]":
        return None
    return True


async def metered_events(chunks, response: web.StreamResponse, meter: SessionMeter) -> None:
    """Forward an upstream SSE stream, spending one session unit per data event (the
    draft's per-chunk billing): when the balance runs out the meter holds the stream for
    a top-up, or ends it. A unit is kept only for an event written to a client that is
    still there: a write that fails, or a client that left, gives it back and ends the
    stream (ConnectionError). A `payment-receipt` event goes before the `[DONE]`
    sentinel, which ends the stream (nothing after it is forwarded or charged), or at
    the end if the upstream sends none."""
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        while (event := _split_event(buf)) is not None:
            billable = _billable(event)
            if billable is None:
                await _deliver(response, meter.receipt_event(), None)
                await _deliver(response, event, None)
                await response.write_eof()
                return
            if billable and not await meter.charge(response):
                await response.write_eof()
                return
            await _deliver(response, event, meter if billable else None)
        if len(buf) > MAX_EVENT:       # an event this large is not SSE: pass it on, one unit
            if not await meter.charge(response):
                await response.write_eof()
                return
            await _deliver(response, bytes(buf), meter)
            buf.clear()
    if buf.strip():
        if _billable(bytes(buf)) and await meter.charge(response):
            await _deliver(response, bytes(buf) + b"\n\n", meter)
    await _deliver(response, meter.receipt_event(), None)
    await response.write_eof()


async def _deliver(response: web.StreamResponse, data: bytes, charged: SessionMeter | None) -> None:
    """Write to the client; if it is gone, the unit `charged` took for this goes back."""
    try:
        if charged is not None and charged.client_gone():
            raise ClientGone("the client disconnected")
        await response.write(data)
    except ConnectionError:          # reset, or lost while the write waited on a full socket
        if charged is not None:
            await charged.undelivered()
        raise
