"""The purchases service on both stores: limits under concurrency, once-only settlement,
and transactions that keep all of a state change or none of it."""
import asyncio
from pathlib import Path

import pytest

from micropay.games.config import CatalogItem, GamesConfig, WebhookEndpoint
from micropay.games.purchases import Conflict, Purchases
from micropay.games.repository import MARK_PURCHASE_PAID, PURCHASE_BY, NewEvent
from micropay.lightning.base import Settlement
from micropay.lightning.sandbox import SandboxNetwork
from micropay.core.receipts import ReceiptSigner
from micropay.store.base import Step


def service(store, tmp_path, hooks=()):
    cfg = GamesConfig(catalog=(CatalogItem("sword", "Sword", 1000, max_per_player=2),),
                      webhooks=tuple(WebhookEndpoint(h, "http://127.0.0.1:9/", Path("s")) for h in hooks))
    net = SandboxNetwork()
    return Purchases(cfg, store, net.add_node("game"), ReceiptSigner.load_or_create(tmp_path / "rk"), "g",
                     b"k" * 32), net


async def test_player_limit_holds_under_concurrency(store, tmp_path):
    purchases, _ = service(store, tmp_path)

    async def one(i):
        try:
            await purchases.create({"sku": "sword", "player_id": "alice", "idempotency_key": f"k{i}"})
            return "created"
        except Conflict as exc:
            return exc.detail["reason"]
    results = await asyncio.gather(*(one(i) for i in range(12)))
    assert results.count("created") == 2 and results.count("purchase_limit_reached") == 10
    # the same key, concurrently: one purchase
    same = await asyncio.gather(*(purchases.create({"sku": "sword", "player_id": "bob", "idempotency_key": "x"})
                                  for _ in range(8)))
    assert len({p["id"] for p, _ in same}) == 1 and sum(created for _, created in same) == 1


async def test_settlement_is_recorded_once_with_its_outbox(store, tmp_path):
    purchases, net = service(store, tmp_path, hooks=("a", "b"))
    p, _ = await purchases.create({"sku": "sword", "player_id": "carol", "idempotency_key": "k"})
    payer = net.add_node("payer", 10_000)
    paid = await payer.pay(p["invoice"])
    s = Settlement(1, f"micropay-purchase-{p['id']}", p["payment_hash"], 1000, paid.preimage, 1_800_000_000)
    results = await asyncio.gather(*(purchases.on_settlement(s) for _ in range(5)))
    assert results.count(True) == 1
    events = await purchases.events_after(0)
    assert [e.type for e in events] == ["purchase.paid"]
    rows = await store.query("SELECT endpoint, status FROM micropay_webhook_deliveries ORDER BY endpoint")
    assert rows == [("a", "pending"), ("b", "pending")]
    assert (await purchases.get(p["id"]))["status"] == "paid"


async def test_a_failing_step_rolls_everything_back(store, tmp_path):
    purchases, _ = service(store, tmp_path, hooks=("a",))
    p, _ = await purchases.create({"sku": "sword", "player_id": "dave", "idempotency_key": "k"})
    ev = NewEvent("purchase.paid:x", "purchase.paid", p["id"], "dave", {}, 1)
    mark = Step(MARK_PURCHASE_PAID, (p["payment_hash"], 1, 1000, "00", "r"), required=True)
    with pytest.raises(Exception):
        await store.transaction([mark, *ev.steps(["a"]), Step("SELECT no_such_column FROM micropay_events", ())])
    assert (await purchases.get(p["id"]))["status"] == "pending"
    assert await purchases.events_after(0) == []
    # a required step that finds nothing rolls back what came before it, and says which
    tx = await store.transaction([*ev.steps(["a"]), Step(PURCHASE_BY["id"], ("pur_nope",), required=True)])
    assert not tx.ok and tx.failed_step == 2
    assert await purchases.events_after(0) == []
    assert await store.query("SELECT COUNT(*) FROM micropay_webhook_deliveries") == [(0,)]
