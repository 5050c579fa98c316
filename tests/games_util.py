"""Helpers for the purchases API tests: a sidecar with a catalog and an API key."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from micropay.games.apikeys import create_key

from .conftest import make_config, start_sidecar

GAMES_TOML = """
service = "game"
[purchases]
expiry_s = 600
[[catalog]]
sku = "gems-100"
title = "100 gems"
price_msat = 50000
[[catalog]]
sku = "sword"
title = "Sword"
price_msat = 120000
max_per_player = 1
[[catalog]]
sku = "article-1"
title = "The article"
price_msat = 2000
description = "A paywalled article"
content = "<p id='secret'>The secret ending.</p>"
[payouts]
per_player_day_msat = 1000000
per_day_msat = 5000000
max_fee_msat = 1000
"""


class GameSidecar:
    def __init__(self, sc, key: str) -> None:
        self.sc, self.key = sc, key
        self.rt, self.payer, self.url = sc.rt, sc.payer, sc.url

    @property
    def games(self):
        return self.rt.games

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    async def call(self, method: str, path: str, body=None, headers=None, key: str | None = None):
        hdrs = self.auth(key) if headers is None else headers
        async with aiohttp.ClientSession() as s:
            async with s.request(method, self.url + path, headers=hdrs,
                                 data=None if body is None else (body if isinstance(body, (bytes, str))
                                                                 else json.dumps(body))) as r:
                raw = await r.read()
                try:
                    data = json.loads(raw)
                except ValueError:
                    data = raw
                return r.status, data, r.headers.copy()

    async def buy(self, sku="gems-100", player="p1", key="k1", **extra):
        status, p, _ = await self.call("POST", "/v1/purchases",
                                       {"sku": sku, "player_id": player, "idempotency_key": key, **extra})
        assert status in (200, 201), p
        return p

    async def close(self) -> None:
        await self.sc.runner.cleanup()
        if self.games.deliverer is not None:
            await self.games.deliverer.close()


async def start_game_sidecar(tmp_path: Path, toml_text: str = GAMES_TOML, clock=None,
                             scopes=("purchases:write", "purchases:read", "events:read", "payouts:write"),
                             manual_delivery: bool = False, **overrides) -> GameSidecar:
    sc = await start_sidecar(make_config(tmp_path, toml_text, **overrides), clock=clock)
    if manual_delivery:   # the test drives deliverer.run_once() itself
        for task in asyncio.all_tasks():
            if task.get_name() == "micropay-webhooks":
                task.cancel()
    key, _ = await create_key(sc.rt.store, "test", list(scopes))
    return GameSidecar(sc, key)
