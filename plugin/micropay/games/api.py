"""HTTP routes of the purchases API (described by /openapi.json).

Game servers authenticate with `Authorization: Bearer mpk_...` (an API key with the
needed scope). A player's client holds the purchase's client token (`mpc_...`,
returned when the purchase is created) and can read only that purchase and its events.
"""
from __future__ import annotations

import functools
import json
import logging
import re
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..errors import BadRequest, MicropayError
from ..sidecar.responses import problem_response
from .apikeys import ApiKeyVerifier, Unauthorized
from .config import SKU, GamesConfig
from .payouts import Payouts
from .purchases import CURSOR, PLAYER_ID, Purchases

log = logging.getLogger("micropay.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 64 * 1024
STATUSES = ("pending", "paid", "expired")


class Games:
    """Everything the purchases API needs, held by the sidecar's runtime."""

    def __init__(self, cfg: GamesConfig, purchases: Purchases, payouts: Payouts, keys: ApiKeyVerifier,
                 deliverer=None) -> None:
        self.cfg, self.purchases, self.payouts, self.keys = cfg, purchases, payouts, keys
        self.deliverer = deliverer
        self.paywall_limit = None    # TokenBucket, made on first use
        self.closing = False         # set at shutdown: event streams end
        self.openapi: dict[str, Any] | None = None   # built on first request; the config is fixed


def bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization")
    if auth is None:
        return None
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("Authorization must be 'Bearer <API key or client token>'")
    return value.strip()


async def require_key(games: Games, request: web.Request, scope: str):
    token = bearer(request)
    if token is None:
        raise Unauthorized("an API key is required: Authorization: Bearer mpk_...")
    return await games.keys.verify(token, scope)


async def authorize_purchase(games: Games, request: web.Request, purchase_id: str, scope: str) -> None:
    """An API key with `scope`, or the client token of this very purchase (header or ?token=)."""
    query_token = request.query.get("token")
    if query_token is not None and not 0 < len(query_token) <= 200:
        raise BadRequest("token must be 1-200 characters")
    token = bearer(request) or query_token
    if token is None:
        raise Unauthorized("an API key or this purchase's client token is required")
    if token.startswith("mpc_"):
        if not games.purchases.check_client_token(purchase_id, token):
            raise Unauthorized("client token is not valid for this purchase")
        return
    await games.keys.verify(token, scope)


def api(handler: Callable[[Games, web.Request], Awaitable[web.StreamResponse]], games: Games) -> Handler:
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(games, request)
        except MicropayError as err:
            headers = {"WWW-Authenticate": 'Bearer realm="micropay"'} if err.http_status == 401 else None
            return problem_response(err, headers)
    return wrapped


async def json_body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BadRequest(f"body must be at most {MAX_BODY} bytes")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise BadRequest(f"body must be at most {MAX_BODY} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body must be JSON") from None


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise BadRequest(f"{name} must be an integer in [{lo}, {hi}]")
    return int(raw)


def query_str(request: web.Request, name: str, pattern: re.Pattern[str], what: str) -> str:
    raw = request.query.get(name, "")
    if raw and not pattern.fullmatch(raw):
        raise BadRequest(f"{name} must be {what}")
    return raw


def purchase_out(games: Games, p: dict[str, Any]) -> dict[str, Any]:
    return dict(p, client_token=games.purchases.client_token(p["id"]))


async def catalog(games: Games, request: web.Request) -> web.Response:
    return web.json_response({"items": [it.to_json() for it in games.cfg.catalog]})


async def create_purchase(games: Games, request: web.Request) -> web.Response:
    await require_key(games, request, "purchases:write")
    p, created = await games.purchases.create(await json_body(request))
    return web.json_response(purchase_out(games, p), status=201 if created else 200)


async def get_purchase(games: Games, request: web.Request) -> web.Response:
    pid = request.match_info["id"]
    await authorize_purchase(games, request, pid, "purchases:read")
    return web.json_response(await games.purchases.get(pid))


async def list_purchases(games: Games, request: web.Request) -> web.Response:
    await require_key(games, request, "purchases:read")
    status = request.query.get("status", "")
    if status and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
    return web.json_response(await games.purchases.list(
        player_id=query_str(request, "player_id", PLAYER_ID, "1-128 of A-Z a-z 0-9 . _ : @ -"),
        sku=query_str(request, "sku", SKU, "a catalog sku"), status=status,
        limit=query_int(request, "limit", 50, 1, 200),
        cursor=query_str(request, "cursor", CURSOR, "a next_cursor this API returned")))


async def create_payout(games: Games, request: web.Request) -> web.Response:
    await require_key(games, request, "payouts:write")
    p, created = await games.payouts.create(await json_body(request))
    return web.json_response(p, status=201 if created else 200)


async def get_payout(games: Games, request: web.Request) -> web.Response:
    await require_key(games, request, "payouts:write")
    return web.json_response(await games.payouts.get(request.match_info["id"]))


async def openapi(games: Games, request: web.Request) -> web.Response:
    if games.openapi is None:
        from .openapi import document
        games.openapi = document(games.cfg)
    return web.json_response(games.openapi, headers={"Access-Control-Allow-Origin": "*"})


def add_games_routes(add: Callable[[str, str, Handler], Any], games: Games) -> None:
    from . import live, paywall
    add("GET", "/openapi.json", api(openapi, games))
    add("GET", "/v1/catalog", api(catalog, games))
    add("POST", "/v1/purchases", api(create_purchase, games))
    add("GET", "/v1/purchases", api(list_purchases, games))
    add("GET", "/v1/purchases/{id}", api(get_purchase, games))
    add("GET", "/v1/purchases/{id}/events", api(live.purchase_events, games))
    add("GET", "/v1/events", api(live.app_events, games))
    add("GET", "/v1/ws", api(live.websocket, games))
    add("POST", "/v1/payouts", api(create_payout, games))
    add("GET", "/v1/payouts/{id}", api(get_payout, games))
    add("GET", "/paywall/{sku}", api(paywall.page, games))
    add("POST", "/paywall/{sku}/purchase", api(paywall.purchase, games))
    add("GET", "/paywall/{sku}/content", api(paywall.content, games))
