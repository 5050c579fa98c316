"""HTTP access to the sandbox network's customer wallets (sandbox mode only).

    GET  /sandbox/wallets/{name}       balance and node id (created, funded, on first use)
    POST /sandbox/wallets/{name}/pay   {"bolt11": "...", "max_fee_msat": 1000} -> payment
"""
from __future__ import annotations

import json
import re

from aiohttp import web

from ..errors import BadRequest, MicropayError
from .responses import problem_response

WALLET_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
STARTING_BALANCE_MSAT = 100_000_000_000   # 1 BTC of play money
MAX_WALLETS = 1000


def add_sandbox_routes(add, rt) -> None:
    wallets: dict[str, object] = {}

    def wallet(name: str):
        if not WALLET_NAME.fullmatch(name):
            raise BadRequest("wallet name must be 1-64 of A-Z a-z 0-9 _ -")
        w = wallets.get(name)
        if w is None:
            if len(wallets) >= MAX_WALLETS:
                raise BadRequest("too many sandbox wallets")
            w = wallets[name] = rt.sandbox.add_node(f"wallet-{name}", STARTING_BALANCE_MSAT)
        return w

    async def get_wallet(request: web.Request) -> web.Response:
        try:
            w = wallet(request.match_info["name"])
        except MicropayError as err:
            return problem_response(err)
        return web.json_response({"name": request.match_info["name"], "node_id": w.id,
                                  "balance_msat": w.balance_msat, "network": "regtest", "sandbox": True})

    async def pay(request: web.Request) -> web.Response:
        try:
            w = wallet(request.match_info["name"])
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadRequest("body must be JSON") from None
            if not isinstance(body, dict) or not isinstance(body.get("bolt11"), str):
                raise BadRequest("body must be an object with a string 'bolt11'")
            max_fee = body.get("max_fee_msat")
            if max_fee is not None and (not isinstance(max_fee, int) or isinstance(max_fee, bool) or max_fee < 0):
                raise BadRequest("max_fee_msat must be a non-negative integer")
            p = await w.pay(body["bolt11"], max_fee_msat=max_fee)
        except MicropayError as err:
            return problem_response(err)
        return web.json_response({"payment_hash": p.payment_hash, "preimage": p.preimage,
                                  "amount_msat": p.amount_msat, "fee_msat": p.fee_msat,
                                  "balance_msat": w.balance_msat})

    add("GET", "/sandbox/wallets/{name}", get_wallet)
    add("POST", "/sandbox/wallets/{name}/pay", pay)
