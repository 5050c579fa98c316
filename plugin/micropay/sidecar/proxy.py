"""Reverse proxy to the upstream API: bodies streamed both ways, hop-by-hop headers dropped.

The L402 credential is not forwarded (the upstream never sees preimages); the token
id and payment hash are passed as X-L402-Token-Id / X-L402-Payment-Hash instead.
"""
from __future__ import annotations

import logging

import aiohttp
from aiohttp import hdrs, web
from multidict import CIMultiDict

from ..errors import UpstreamError
from ..l402 import SCHEMES
from ..pricing import Pricing
from .gate import PAID

log = logging.getLogger("micropay.proxy")
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Trailers", "Transfer-Encoding", "Upgrade", "Proxy-Connection"))
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
                 timeout: aiohttp.ClientTimeout | None = None) -> None:
        self.pricing, self.default_upstream = pricing, default_upstream
        self.timeout = timeout or aiohttp.ClientTimeout(total=None, connect=10, sock_read=300)
        self._session: aiohttp.ClientSession | None = None

    async def cleanup_ctx(self, app: web.Application):  # aiohttp cleanup context
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), timeout=self.timeout, auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar())
        yield
        await self._session.close()

    def upstream_for(self, request: web.Request) -> str | None:
        rule = self.pricing.match(request.method, request.path)
        return (rule.upstream if rule and rule.upstream else None) or self.default_upstream

    async def handle(self, request: web.Request) -> web.StreamResponse:
        upstream = self.upstream_for(request)
        if upstream is None:
            raise web.HTTPNotFound()
        assert self._session is not None, "proxy used outside its cleanup context"
        headers = _strip_hop_by_hop(request.headers)
        headers.popall(hdrs.HOST, None)
        auth = headers.get(hdrs.AUTHORIZATION, "")
        if auth.split(" ", 1)[0].upper() in SCHEMES:
            headers.popall(hdrs.AUTHORIZATION)
        paid = request.get(PAID)
        if paid is not None:
            headers["X-L402-Token-Id"] = paid.token.token_id_hex
            headers["X-L402-Payment-Hash"] = paid.token.payment_hash.hex()
        peer = request.remote or ""
        prior = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Host"] = request.host
        url = upstream.rstrip("/") + request.rel_url.path_qs
        body = request.content if request.body_exists else None
        try:
            upstream_resp = await self._session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("upstream %s unreachable: %s", upstream, exc)
            raise UpstreamError(f"upstream unavailable ({type(exc).__name__})") from None
        async with upstream_resp:
            response = web.StreamResponse(status=upstream_resp.status, reason=upstream_resp.reason,
                                          headers=_strip_hop_by_hop(upstream_resp.headers))
            if paid is not None:
                response.headers.update(paid.headers)   # receipt, credits left
            await response.prepare(request)
            async for chunk in upstream_resp.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response
