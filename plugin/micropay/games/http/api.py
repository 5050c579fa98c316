"""HTTP routes of the purchases API (described by /openapi.json).

Game servers authenticate with `Authorization: Bearer mpk_...` (an API key with the
needed scope). A player's client holds the purchase's client token (`mpc_...`,
returned when the purchase is created) and can read only that purchase and its events.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from aiohttp import web

from ...core.errors import BadRequest
from ..config import SKU
from ..models import PLAYER_ID
from ..purchases import CURSOR
from ..service import Games
from .common import authorize_purchase, json_body, query_int, query_str, require_key

log = logging.getLogger("micropay.api")
STATUSES = ("pending", "paid", "expired")


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
        player_id=query_str(request, "player_id", re.compile(PLAYER_ID.pattern or ""), PLAYER_ID.what),
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
        doc = document(games.cfg)
        for path, item in games.openapi_extra_paths.items():      # priced routes, with x-payment-info
            doc["paths"].setdefault(path, item)
        games.openapi = doc
    return web.json_response(games.openapi, headers={"Access-Control-Allow-Origin": "*"})
