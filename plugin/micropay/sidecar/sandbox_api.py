"""HTTP access to the sandbox network's customer wallets (sandbox mode only).

    GET  /sandbox/wallets/{name}          balance and node id (created, funded, on first use)
    POST /sandbox/wallets/{name}/pay      {"bolt11": "...", "max_fee_msat": 1000} -> payment
    POST /sandbox/wallets/{name}/invoice  {"amount_msat": 1000, "description": "..."} -> an invoice
                                          this wallet is paid on (to try payouts, say); without
                                          amount_msat, an amountless one (a session's return invoice)

A new invoice is a new invoice whichever node makes it: the invoice endpoint draws on the
same per-client token bucket as the gate's challenges (`[challenges]
per_client_per_minute`), and past it answers 429 with Retry-After.
"""
from __future__ import annotations

import os
import re

from aiohttp import web

from ..core.errors import BadRequest, MicropayError, RateLimited, RequestBodyTooLarge
from ..http.bodies import read_request_body
from ..http.problems import problem_response
from ..core.inputs import load_json
from ..lightning.sandbox import PLAY_MONEY_MSAT
from ..core.params import MAX_MSAT

WALLET_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_WALLETS = 1000
MAX_BODY = 64 * 1024


async def _body(request: web.Request) -> bytes:
    """The request body, read within the server's body deadline (408 past it)."""
    raw, complete = await read_request_body(request, MAX_BODY)
    if not complete:
        raise RequestBodyTooLarge(f"the request body must be at most {MAX_BODY} bytes")
    return raw


def add_sandbox_routes(add, rt) -> None:
    wallets: dict[str, object] = {}

    def wallet(name: str):
        if not WALLET_NAME.fullmatch(name):
            raise BadRequest("wallet name must be 1-64 of A-Z a-z 0-9 _ -")
        w = wallets.get(name)
        if w is None:
            if len(wallets) >= MAX_WALLETS:
                raise BadRequest("too many sandbox wallets")
            w = wallets[name] = rt.sandbox.add_node(f"wallet-{name}", PLAY_MONEY_MSAT)
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
            body = load_json(await _body(request))
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

    async def invoice(request: web.Request) -> web.Response:
        try:
            w = wallet(request.match_info["name"])
            body = load_json(await _body(request))
            if not isinstance(body, dict):
                raise BadRequest("body must be an object")
            amount, description = body.get("amount_msat"), body.get("description", "sandbox wallet")
            if amount is not None and (not isinstance(amount, int) or isinstance(amount, bool)
                                       or not 0 < amount <= MAX_MSAT):
                raise BadRequest("amount_msat must be a positive integer (or left out: any amount)")
            if not isinstance(description, str) or len(description) > 200:
                raise BadRequest("description must be a string of at most 200 characters")
            wait = rt.gate.challenger.bucket.take(rt.gate.client_key(request))
            if wait > 0:
                raise RateLimited("too many new invoices requested; wait", retry_after_s=int(wait) + 1)
            inv = await w.create_invoice(amount, f"wallet-{os.urandom(8).hex()}", description, 3600)
        except MicropayError as err:
            return problem_response(err)
        return web.json_response({"bolt11": inv.bolt11, "payment_hash": inv.payment_hash,
                                  "amount_msat": inv.amount_msat, "expires_at": inv.expires_at})

    add("GET", "/sandbox/wallets/{name}", get_wallet)
    add("POST", "/sandbox/wallets/{name}/pay", pay)
    add("POST", "/sandbox/wallets/{name}/invoice", invoice)
