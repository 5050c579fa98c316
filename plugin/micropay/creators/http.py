"""Lightning Addresses over HTTP (aiohttp): the LNURL-pay endpoints wallets call, and the
tips API for the address owner (an API key with `tips:read`).

LNURL answers carry `Access-Control-Allow-Origin: *` (browser wallets call them) and
every refusal is LNURL's own `{"status": "ERROR", "reason": ...}` with a fitting HTTP
status."""
from __future__ import annotations

import re
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..core.errors import BadRequest, MicropayError, NotFound, RateLimited
from ..games.http.common import api, query_int, query_str, require_key
from ..games.service import Games
from . import lnurl
from .service import Creators, TipRefused

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CORS = {"Access-Control-Allow-Origin": "*"}
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?")
_QUERY_KEYS = {"amount", "comment", "nostr", "proofofpayment", "payerdata"}
_STATUSES = re.compile(r"pending|paid|expired")


def _origin(request: web.Request) -> str:
    host = request.host
    if not _HOST.fullmatch(host or ""):
        raise TipRefused("the Host header is not a host name")
    return f"{request.scheme}://{host.lower()}"


def _lnurl(handler: Callable[[web.Request], Awaitable[dict[str, Any]]]) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            doc = await handler(request)
        except RateLimited as exc:
            return web.json_response(lnurl.error(exc.message), status=exc.http_status,
                                     headers={**CORS, "Retry-After": str(exc.retry_after_s)})
        except MicropayError as exc:
            return web.json_response(lnurl.error(exc.message), status=exc.http_status, headers=CORS)
        return web.json_response(doc, headers={**CORS, "Cache-Control": "no-store"})
    return wrapped


def add_creators_routes(add: Callable[[str, str, Handler], Any], creators: Creators, games: Games,
                        client_key: Callable[[web.Request], str]) -> None:
    async def pay_request(request: web.Request) -> dict[str, Any]:
        return creators.pay_request(request.match_info["name"], _origin(request))

    async def callback(request: web.Request) -> dict[str, Any]:
        query: dict[str, str] = {}
        for key, value in request.query.items():
            if key in query:
                raise TipRefused(f"{key} is given twice")
            if key in _QUERY_KEYS:
                query[key] = value
        return await creators.callback(request.match_info["name"], _origin(request), client_key(request), query)

    async def verify(request: web.Request) -> dict[str, Any]:
        return await creators.verify(request.match_info["name"], request.match_info["hash"])

    async def list_tips(games: Games, request: web.Request) -> web.Response:
        await require_key(games, request, "tips:read")
        address = request.query.get("address", "")
        if address and not lnurl.NAME.fullmatch(address):
            raise BadRequest("address must be the name part of one of this server's Lightning Addresses")
        cursor = request.query.get("cursor")
        if cursor is not None and len(cursor) > 100:
            raise BadRequest("cursor is not one this API returned")
        try:
            page = await creators.list(address=address, limit=query_int(request, "limit", 50, 1, 200),
                                       status=query_str(request, "status", _STATUSES, "pending, paid or expired"),
                                       cursor=cursor)
        except TipRefused as exc:
            raise BadRequest(exc.message) from None
        return web.json_response(page)

    async def get_tip(games: Games, request: web.Request) -> web.Response:
        await require_key(games, request, "tips:read")
        tip = await creators.get(request.match_info["id"])
        if tip is None:
            raise NotFound("no such tip")
        return web.json_response(tip)

    add("GET", "/.well-known/lnurlp/{name}", _lnurl(pay_request))
    add("GET", "/lnurlp/{name}/callback", _lnurl(callback))
    add("GET", "/lnurlp/{name}/verify/{hash}", _lnurl(verify))
    add("GET", "/v1/tips", api(list_tips, games))
    add("GET", "/v1/tips/{id}", api(get_tip, games))
