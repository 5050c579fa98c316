"""A small game server that sells items through the micropay sidecar.

- POST /buy            {player_id, sku} -> asks the sidecar for a purchase (API key stays here)
- POST /micropay/webhook  verifies the signature and freshness, de-duplicates by event id,
                          checks the receipt offline, then grants the item
- GET  /inventory/{player_id}

Configuration comes from the environment: MICROPAY_URL, MICROPAY_API_KEY,
MICROPAY_WEBHOOK_SECRET_FILE, MICROPAY_RECEIPT_PUBKEY, GAME_LISTEN (host:port).
"""
from __future__ import annotations

import os
import uuid
from collections import defaultdict

import aiohttp
from aiohttp import web

from micropay.games.signing import WebhookVerificationError, verify_webhook
from micropay.core.receipts import InvalidReceipt, verify_receipt

ITEMS = {"gems-100": ("gems", 100), "dragon-skin": ("dragon-skin", 1)}


class Game:
    def __init__(self) -> None:
        self.sidecar = os.environ["MICROPAY_URL"]
        self.api_key = os.environ["MICROPAY_API_KEY"]
        self.secret_file = os.environ["MICROPAY_WEBHOOK_SECRET_FILE"]
        self.receipt_pubkey = os.environ["MICROPAY_RECEIPT_PUBKEY"]
        self.inventory: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.seen_events: set[int] = set()      # a real game keeps this in its database
        self.granted: set[str] = set()          # purchase ids already granted

    async def buy(self, request: web.Request) -> web.Response:
        body = await request.json()
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{self.sidecar}/v1/purchases", json={
                    "sku": body["sku"], "player_id": body["player_id"],
                    "idempotency_key": body.get("order_id") or str(uuid.uuid4())},
                    headers={"Authorization": f"Bearer {self.api_key}"}) as r:
                purchase = await r.json()
                if r.status not in (200, 201):
                    return web.json_response(purchase, status=r.status)
        # the player's client gets what it needs to pay and to watch this purchase only
        return web.json_response({k: purchase[k] for k in ("id", "invoice", "price_msat", "expires_at",
                                                           "client_token")})

    async def webhook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        secrets = open(self.secret_file).read().split()
        try:
            event = verify_webhook(raw, request.headers.get("Micropay-Signature"), secrets)
        except WebhookVerificationError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if event["id"] in self.seen_events:        # delivered at least once: ignore repeats
            return web.Response(status=204)
        if event["type"] == "purchase.paid":
            purchase = event["data"]["purchase"]
            try:
                receipt = verify_receipt(purchase["receipt"], self.receipt_pubkey)
            except InvalidReceipt as exc:
                return web.json_response({"error": f"bad receipt: {exc.message}"}, status=400)
            if receipt["purchase_id"] not in self.granted:
                item, qty = ITEMS[receipt["sku"]]
                self.inventory[receipt["player_id"]][item] += qty
                self.granted.add(receipt["purchase_id"])
                print(f"game: granted {qty} {item} to {receipt['player_id']} "
                      f"(purchase {receipt['purchase_id']}, {receipt['amount_msat']} msat)", flush=True)
        self.seen_events.add(event["id"])
        return web.Response(status=204)

    async def show_inventory(self, request: web.Request) -> web.Response:
        return web.json_response(self.inventory.get(request.match_info["player_id"], {}))


def main() -> None:
    game = Game()
    app = web.Application()
    app.router.add_post("/buy", game.buy)
    app.router.add_post("/micropay/webhook", game.webhook)
    app.router.add_get("/inventory/{player_id}", game.show_inventory)
    host, _, port = os.environ.get("GAME_LISTEN", "127.0.0.1:8500").rpartition(":")
    web.run_app(app, host=host, port=int(port), print=lambda *_: print(
        f"game: listening on http://{host}:{port}", flush=True))


if __name__ == "__main__":
    main()
