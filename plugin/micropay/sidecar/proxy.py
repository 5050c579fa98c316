"""Reverse proxy to the upstream API: bodies streamed both ways, hop-by-hop headers dropped.

The upstream receives exactly the canonical target the gate priced (canonical.py), never
the client's own spelling of it. The L402 credential is not forwarded (the upstream
never sees preimages); the token id and payment hash are passed as X-L402-Token-Id /
X-L402-Payment-Hash instead. Headers the proxy sets are always its own: a client's copy
is dropped first.
"""
from __future__ import annotations

import logging

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict
from yarl import URL

from ..errors import UpstreamError, UpstreamUnreachable
from ..http.caching import make_private
from ..l402 import SCHEMES
from ..payment_auth import is_payment
from ..pricing import Pricing
from .gate import BODY, PAID, STREAM_HEADER, request_target
from .session_gate import SESSION_METER, SSE_TYPE, ClientGone, SessionMeter

log = logging.getLogger("micropay.proxy")
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Trailers", "Transfer-Encoding", "Upgrade", "Proxy-Connection"))
TOKEN_ID_HEADER, PAYMENT_HASH_HEADER = "X-L402-Token-Id", "X-L402-Payment-Hash"
# Set by this proxy only; a client's value would be taken for ours by the upstream.
PROXY_OWNED = (TOKEN_ID_HEADER, PAYMENT_HASH_HEADER, "X-Forwarded-Proto", "X-Forwarded-Host")
# What the client may not pass on when X-Forwarded-For is not trusted.
FORWARDING = ("X-Forwarded-For", "Forwarded", "X-Real-IP")
CHUNK = 64 * 1024


def _strip_hop_by_hop(headers: "CIMultiDict[str] | aiohttp.typedefs.LooseHeaders") -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict(headers)
    listed = {t.strip().lower() for v in out.getall(hdrs.CONNECTION, []) for t in v.split(",")}
    for name in list(out.keys()):
        if name.lower() in HOP_BY_HOP or name.lower() in listed:
            out.popall(name, None)
    return out


class ReverseProxy:
    def __init__(self, pricing: Pricing, default_upstream: str | None,
                 timeout: aiohttp.ClientTimeout | None = None, *, trust_forwarded_for: bool = False) -> None:
        self.pricing, self.default_upstream = pricing, default_upstream
        self.trust_forwarded_for = trust_forwarded_for
        self.timeout = timeout or aiohttp.ClientTimeout(total=None, connect=10, sock_read=300)
        self._session: aiohttp.ClientSession | None = None

    async def cleanup_ctx(self, app: web.Application):  # aiohttp cleanup context
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), timeout=self.timeout, auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar())
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
        headers.popall(STREAM_HEADER, None)   # a bearer secret, like the credential
        for name in PROXY_OWNED:
            headers.popall(name, None)
        prior = ", ".join(headers.getall("X-Forwarded-For", ())) if self.trust_forwarded_for else ""
        if not self.trust_forwarded_for:
            for name in FORWARDING:
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
        # A body the gate read (to bind a Payment charge to it) is forwarded as read;
        # any other is streamed.
        body = request.get(BODY)
        if body is None and request.body_exists:
            body = request.content
        try:
            upstream_resp = await self._session.request(
                request.method, url, headers=self.forward_headers(request), data=body, allow_redirects=False)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            log.warning("upstream %s unreachable: %s", upstream, exc)
            raise UpstreamUnreachable(f"upstream unavailable ({type(exc).__name__})") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The request may have reached the upstream (and been acted on): not refundable.
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
                if meter is not None and upstream_resp.content_type == SSE_TYPE:
                    await metered_events(upstream_resp.content.iter_chunked(CHUNK), response, meter)
                    return response
                async for chunk in upstream_resp.content.iter_chunked(CHUNK):
                    await response.write(chunk)
            except ConnectionResetError:
                # Writing to the client failed (aiohttp's ClientConnectionResetError is
                # also a ClientError: told apart first). Nothing is wrong upstream.
                log.info("client %s disconnected during the response to %s %s", request.remote, request.method,
                         target.path)
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


_EVENT_END = (b"\r\n\r\n", b"\n\n", b"\r\r")
MAX_EVENT = 1024 ** 2


def _split_event(buf: bytearray) -> bytes | None:
    """The first complete SSE event in `buf` (removed from it), or None."""
    found = [(i, len(sep)) for sep in _EVENT_END if (i := buf.find(sep)) >= 0]
    if not found:
        return None
    i, n = min(found)
    event = bytes(buf[:i + n])
    del buf[:i + n]
    return event


def _billable(event: bytes) -> bool | None:
    """True for an event that carries data (one unit), None for the `[DONE]` sentinel,
    False for comments and keep-alives (free)."""
    lines = event.splitlines()
    data = [ln for ln in lines if ln.startswith(b"data:")]
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
    stream (ConnectionResetError). A `payment-receipt` event goes before the `[DONE]`
    sentinel, or at the end if the upstream sends none."""
    buf = bytearray()
    receipt_sent = False
    async for chunk in chunks:
        buf += chunk
        while (event := _split_event(buf)) is not None:
            billable = _billable(event)
            if billable is None:
                await _deliver(response, meter.receipt_event(), None)
                receipt_sent = True
            elif billable and not await meter.charge(response):
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
    if not receipt_sent:
        await _deliver(response, meter.receipt_event(), None)
    await response.write_eof()


async def _deliver(response: web.StreamResponse, data: bytes, charged: SessionMeter | None) -> None:
    """Write to the client; if it is gone, the unit `charged` took for this goes back."""
    try:
        if charged is not None and charged.client_gone():
            raise ClientGone("the client disconnected")
        await response.write(data)
    except ConnectionResetError:
        if charged is not None:
            await charged.undelivered()
        raise
