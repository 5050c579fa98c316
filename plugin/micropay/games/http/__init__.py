"""The purchases API over HTTP (aiohttp): its routes, live events and the browser paywall."""
from __future__ import annotations

from typing import Any, Callable

from ..service import Games
from . import api as http_api
from . import live, paywall
from .common import Handler, api


def add_games_routes(add: Callable[[str, str, Handler], Any], games: Games) -> None:
    add("GET", "/openapi.json", api(http_api.openapi, games))
    add("GET", "/v1/catalog", api(http_api.catalog, games))
    add("POST", "/v1/purchases", api(http_api.create_purchase, games))
    add("GET", "/v1/purchases", api(http_api.list_purchases, games))
    add("GET", "/v1/purchases/{id}", api(http_api.get_purchase, games))
    add("GET", "/v1/purchases/{id}/events", api(live.purchase_events, games))
    add("GET", "/v1/events", api(live.app_events, games))
    add("GET", "/v1/ws", api(live.websocket, games))
    add("POST", "/v1/payouts", api(http_api.create_payout, games))
    add("GET", "/v1/payouts/{id}", api(http_api.get_payout, games))
    add("GET", paywall.BITCOIN_CONNECT_PATH, api(paywall.bitcoin_connect, games))
    add("GET", "/paywall/{sku}", api(paywall.page, games))
    add("POST", "/paywall/{sku}/purchase", api(paywall.purchase, games))
    add("GET", "/paywall/{sku}/content", api(paywall.content, games))
