"""In-app purchases on a real network: the sidecar on node B (Core Lightning), the
player paying from node A; webhooks, SSE, receipts, expiry; payouts from B to A over
HTTP and through the plugin's micropay-payout; the paywall in headless Chromium."""
import asyncio
import hashlib
import json
import time

import aiohttp
import pytest
from aiohttp import web
from pyln.client import RpcError

from micropay.games.apikeys import create_key
from micropay.games.signing import verify_webhook
from micropay.lightning.cln import ClnNode
from micropay.core.receipts import verify_receipt

from ..browser import chromium_page
from ..conftest import make_config, serve_app, start_sidecar
from ..games_util import GameSidecar
from .test_l402_cln import wait_until
from .util import opts

GAME = """
service = "game"
[backend]
kind = "cln"
rpc_file = "{rpc}"
[purchases]
expiry_s = {expiry}
[[catalog]]
sku = "gems-100"
title = "100 gems"
price_msat = 50000
[[catalog]]
sku = "article"
title = "Article"
price_msat = 3000
content = "<p id='secret'>Unlocked over Lightning.</p>"
[payouts]
per_player_day_msat = 100000
per_day_msat = 1000000
max_fee_msat = 2000
[[webhooks]]
name = "game"
url = "{hook}"
"""


class TimedClnNode(ClnNode):
    """Notes when lightningd reports each settlement (waitanyinvoice returns)."""

    reported: dict[str, float] = {}

    async def settlements(self, after):
        async for s in super().settlements(after):
            self.reported[s.payment_hash] = time.perf_counter()
            yield s


class Hooks:
    def __init__(self):
        self.events, self.secret_path = [], None
        self.app = web.Application()
        self.app.router.add_post("/hook", self.handle)

    async def handle(self, request):
        body = await request.read()
        secrets = self.secret_path.read_text().split()
        self.events.append(verify_webhook(body, request.headers.get("Micropay-Signature"), secrets))
        return web.Response(status=204)


async def game_sidecar(tmp_path, rpc_file, hook_url, expiry=600):
    node = TimedClnNode(rpc_file)
    await node.connect()
    sc = await start_sidecar(make_config(tmp_path, GAME.format(rpc=rpc_file, hook=hook_url, expiry=expiry)),
                             node=node)
    key, _ = await create_key(sc.rt.store, "game", ["purchases:write", "purchases:read", "events:read",
                                                    "payouts:write"])
    return GameSidecar(sc, key)


async def read_event(resp, timeout=30.0):
    cur = {}
    async def run():
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if not line and "data" in cur:
                return int(cur["id"]), cur["event"], json.loads(cur["data"]), time.perf_counter()
            if line and not line.startswith(":"):
                k, _, v = line.partition(": ")
                cur[k] = v
    return await asyncio.wait_for(run(), timeout)


async def test_purchase_paid_by_another_node(node_factory, tmp_path):
    l1, l2 = node_factory.line_graph(2, wait_for_announce=True)
    hooks = Hooks()
    hrunner, hurl = await serve_app(hooks.app)
    gs = await game_sidecar(tmp_path, l2.rpc.socket_path, f"{hurl}/hook")
    hooks.secret_path = tmp_path / "data" / "webhook-game.secret"
    try:
        body = {"sku": "gems-100", "player_id": "alice", "idempotency_key": "order-1", "metadata": {"lvl": 7}}
        status, p, _ = await gs.call("POST", "/v1/purchases", body)
        assert status == 201 and l1.rpc.decode(p["invoice"])["payee"] == l2.info["id"]
        status, same, _ = await gs.call("POST", "/v1/purchases", body)
        assert status == 200 and same["id"] == p["id"]
        async with aiohttp.ClientSession() as s:
            url = f"{gs.url}/v1/purchases/{p['id']}/events?token={p['client_token']}"
            async with s.get(url) as resp:
                reader = asyncio.create_task(read_event(resp))
                await asyncio.sleep(0.1)
                paid = await asyncio.to_thread(l1.rpc.xpay, p["invoice"])
                eid, etype, data, arrived = await reader
        assert etype == "purchase.paid"
        latency = arrived - TimedClnNode.reported[p["payment_hash"]]
        print(f"settlement reported by lightningd -> SSE event at the client: {latency * 1000:.1f} ms")
        assert 0 <= latency < 0.050, latency
        purchase = data["data"]["purchase"]
        assert purchase["status"] == "paid" and purchase["preimage"] == paid["payment_preimage"]
        receipt = verify_receipt(purchase["receipt"], gs.rt.receipts.pubkey_hex)
        assert (receipt["purchase_id"], receipt["sku"], receipt["player_id"]) == (p["id"], "gems-100", "alice")
        assert receipt["amount_msat"] == 50000 and receipt["preimage"] == paid["payment_preimage"]
        assert hashlib.sha256(bytes.fromhex(receipt["preimage"])).hexdigest() == receipt["payment_hash"]
        async def one_webhook():
            return len(hooks.events) == 1
        assert await wait_until(one_webhook)
        assert hooks.events[0]["type"] == "purchase.paid" and hooks.events[0]["id"] == eid
        assert hooks.events[0]["data"]["purchase"]["receipt"] == purchase["receipt"]
        # paying again is refused by the node; the purchase is paid once
        with pytest.raises(RpcError):
            l1.rpc.xpay(p["invoice"])
        await asyncio.sleep(0.5)
        assert [e.type for e in await gs.games.purchases.events_after(0, p["id"])] == ["purchase.paid"]
        assert len(hooks.events) == 1
    finally:
        await gs.close()
        await hrunner.cleanup()


async def test_purchase_expires_on_the_node_and_in_the_api(node_factory, tmp_path):
    l1, l2 = node_factory.line_graph(2, wait_for_announce=True)
    hooks = Hooks()
    hrunner, hurl = await serve_app(hooks.app)
    gs = await game_sidecar(tmp_path, l2.rpc.socket_path, f"{hurl}/hook", expiry=2)
    hooks.secret_path = tmp_path / "data" / "webhook-game.secret"
    try:
        p = await gs.buy(player="bob", key="late")
        async with aiohttp.ClientSession() as s, s.get(f"{gs.url}/v1/purchases/{p['id']}/events",
                                                       headers=gs.auth()) as resp:
            _, etype, data, _ = await read_event(resp, timeout=20)
        assert etype == "purchase.expired" and data["data"]["purchase"]["status"] == "expired"
        with pytest.raises(RpcError):
            l1.rpc.xpay(p["invoice"])
        _, got, _ = await gs.call("GET", f"/v1/purchases/{p['id']}")
        assert got["status"] == "expired"
        assert l2.rpc.listinvoices(payment_hash=p["payment_hash"])["invoices"][0]["status"] == "expired"
        async def expired_webhook():
            return [e["type"] for e in hooks.events] == ["purchase.expired"]
        assert await wait_until(expired_webhook)
    finally:
        await gs.close()
        await hrunner.cleanup()


async def test_payouts_to_another_node(node_factory, tmp_path):
    l1, l2 = node_factory.line_graph(2, wait_for_announce=True, opts=[{}, opts(**{
        "micropay-payout-player-day-msat": 60_000, "micropay-payout-day-msat": 1_000_000})])
    # give node B (the game) outbound liquidity
    inv = l2.rpc.invoice(500_000_000, "fund", "fund")["bolt11"]
    l1.rpc.xpay(inv)
    gs = await game_sidecar(tmp_path, l2.rpc.socket_path, "http://127.0.0.1:9/unused")
    try:
        prize = l1.rpc.invoice(40_000, "prize-1", "prize")["bolt11"]
        body = {"player_id": "alice", "destination": prize, "idempotency_key": "win-1"}
        status, po, _ = await gs.call("POST", "/v1/payouts", body)
        assert status == 201 and po["status"] == "paid", po
        assert l1.rpc.listinvoices("prize-1")["invoices"][0]["status"] == "paid"
        status, again, _ = await gs.call("POST", "/v1/payouts", body)
        assert status == 200 and again["id"] == po["id"]
        too_much = l1.rpc.invoice(70_000, "prize-2", "prize")["bolt11"]
        status, err, _ = await gs.call("POST", "/v1/payouts", {"player_id": "alice", "destination": too_much,
                                                               "idempotency_key": "win-2"})
        assert status == 409 and err["cap"] == "per_player_day"
        assert l1.rpc.listinvoices("prize-2")["invoices"][0]["status"] == "unpaid"

        # the plugin's RPC on node B, to an invoice and to an offer of node A
        inv3 = l1.rpc.invoice(30_000, "prize-3", "prize")["bolt11"]
        r = l2.rpc.call("micropay-payout", {"player_id": "carol", "destination": inv3, "idempotency_key": "p3"})
        assert r["status"] == "paid" and r["created"] is True
        r2 = l2.rpc.call("micropay-payout", {"player_id": "carol", "destination": inv3, "idempotency_key": "p3"})
        assert r2["id"] == r["id"] and r2["created"] is False
        offer = l1.rpc.offer("any", "prizes")["bolt12"]
        r4 = l2.rpc.call("micropay-payout", {"player_id": "carol", "destination": offer, "amount_msat": "25sat",
                                             "idempotency_key": "p4"})
        assert r4["status"] == "paid" and r4["amount_msat"] == 25_000, r4["error"]
        with pytest.raises(RpcError) as exc:
            l2.rpc.call("micropay-payout", {"player_id": "carol", "destination": offer, "amount_msat": 10_000,
                                            "idempotency_key": "p5"})
        assert exc.value.error["code"] == 1414 and "cap" in exc.value.error["message"]
        with pytest.raises(RpcError) as exc:
            l2.rpc.call("micropay-payout", {"player_id": "bad id", "destination": inv3, "idempotency_key": "p6"})
        assert exc.value.error["code"] == -32602
    finally:
        await gs.close()


async def test_paywall_in_chromium_over_cln(node_factory, tmp_path):
    l1, l2 = node_factory.line_graph(2, wait_for_announce=True)
    gs = await game_sidecar(tmp_path, l2.rpc.socket_path, "http://127.0.0.1:9/unused")
    try:
        async with chromium_page() as page:
            await page.goto(f"{gs.url}/paywall/article")
            await page.wait_for_selector("body[data-state=awaiting-payment]", timeout=20_000)
            invoice = (await page.text_content("#invoice")).strip()
            assert l1.rpc.decode(invoice)["amount_msat"] == 3000
            await page.evaluate("window.__noReload = 1")
            await asyncio.to_thread(l1.rpc.xpay, invoice)
            await page.wait_for_selector("#secret", state="visible", timeout=10_000)
            assert await page.text_content("#secret") == "Unlocked over Lightning."
            assert await page.evaluate("window.__noReload") == 1
    finally:
        await gs.close()
