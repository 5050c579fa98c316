"""Purchases API over HTTP on 127.0.0.1 with the sandbox backend."""
import asyncio
import hashlib

import pytest

from micropay.games.apikeys import create_key, revoke_key
from micropay.core.receipts import verify_receipt

from ..conftest import FakeClock
from ..games_util import start_game_sidecar


@pytest.fixture
async def gs(tmp_path):
    g = await start_game_sidecar(tmp_path)
    yield g
    await g.close()


async def test_create_is_idempotent_and_paid_once(gs):
    status, p, _ = await gs.call("POST", "/v1/purchases", {"sku": "gems-100", "player_id": "alice",
                                                           "idempotency_key": "order-1", "metadata": {"x": 1}})
    assert status == 201, p
    assert p["status"] == "pending" and p["price_msat"] == 50000 and p["metadata"] == {"x": 1}
    assert p["invoice"].startswith("lnbcrt500n") and p["client_token"].startswith("mpc_")
    status, again, _ = await gs.call("POST", "/v1/purchases", {"sku": "gems-100", "player_id": "alice",
                                                               "idempotency_key": "order-1", "metadata": {"x": 1}})
    assert status == 200 and again["id"] == p["id"] and again["invoice"] == p["invoice"]
    status, err, _ = await gs.call("POST", "/v1/purchases", {"sku": "sword", "player_id": "alice",
                                                             "idempotency_key": "order-1"})
    assert status == 409 and err["reason"] == "idempotency_key_reused"

    paid = await gs.payer.pay(p["invoice"])
    for _ in range(100):
        status, got, _ = await gs.call("GET", f"/v1/purchases/{p['id']}")
        if got["status"] == "paid":
            break
        await asyncio.sleep(0.01)
    assert got["status"] == "paid" and got["amount_received_msat"] == 50000
    assert hashlib.sha256(bytes.fromhex(got["preimage"])).hexdigest() == got["payment_hash"] == paid.payment_hash
    receipt = verify_receipt(got["receipt"], gs.rt.receipts.pubkey_hex)
    assert receipt["type"] == "purchase" and receipt["purchase_id"] == p["id"]
    assert (receipt["sku"], receipt["player_id"], receipt["amount_msat"]) == ("gems-100", "alice", 50000)
    assert receipt["preimage"] == paid.preimage and receipt["payment_hash"] == paid.payment_hash

    # the settlement replayed (e.g. after a restart) changes nothing and adds no event
    s = (await gs.rt.node.settlements(0).__anext__())
    assert await gs.games.purchases.on_settlement(s) is False
    events = await gs.games.purchases.events_after(0, p["id"])
    assert [e.type for e in events] == ["purchase.paid"]


@pytest.mark.parametrize("body, field", [
    ({"sku": "nope", "player_id": "a", "idempotency_key": "k"}, "unknown sku"),
    ({"sku": "gems-100", "player_id": "", "idempotency_key": "k"}, "player_id"),
    ({"sku": "gems-100", "player_id": "a b", "idempotency_key": "k"}, "player_id"),
    ({"sku": "gems-100", "player_id": "a", "idempotency_key": "k" * 200}, "idempotency_key"),
    ({"sku": "gems-100", "player_id": "a", "idempotency_key": "k", "metadata": [1]}, "metadata"),
    ({"sku": "gems-100", "player_id": "a", "idempotency_key": "k", "metadata": {"x": "y" * 5000}}, "metadata"),
    ({"sku": "gems-100", "player_id": "a", "idempotency_key": "k", "price_msat": 1}, "unknown field"),
    ([1, 2], "JSON object"),
    ("{not json", "JSON"),
])
async def test_bad_input_is_400_and_leaves_nothing(gs, body, field):
    status, err, headers = await gs.call("POST", "/v1/purchases", body)
    assert status == 400, err
    assert headers["Content-Type"].startswith("application/problem+json") and field in err["detail"]
    assert (await gs.games.purchases.list())["purchases"] == []


async def test_api_keys_scopes_and_revocation(gs):
    body = {"sku": "gems-100", "player_id": "a", "idempotency_key": "k"}
    status, err, headers = await gs.call("POST", "/v1/purchases", body, headers={})
    assert status == 401 and "Bearer" in headers["WWW-Authenticate"]
    status, err, _ = await gs.call("POST", "/v1/purchases", body, key="mpk_000000000000_" + "A" * 43)
    assert status == 401 and err["error"] == "unauthorized"
    status, err, _ = await gs.call("POST", "/v1/purchases", body, key=gs.key[:-1] + ("A" if gs.key[-1] != "A" else "B"))
    assert status == 401
    read_only, rec = await create_key(gs.rt.store, "reader", ["purchases:read"])
    status, err, _ = await gs.call("POST", "/v1/purchases", body, key=read_only)
    assert status == 403 and "purchases:write" in err["detail"]
    status, _, _ = await gs.call("GET", "/v1/purchases", key=read_only)
    assert status == 200
    assert await revoke_key(gs.rt.store, rec.kid)
    gs.games.keys._cache.clear()     # the running sidecar notices within CACHE_TTL_S
    status, err, _ = await gs.call("GET", "/v1/purchases", key=read_only)
    assert status == 401 and "revoked" in err["detail"]
    rows = await gs.rt.store.query("SELECT * FROM micropay_api_keys")
    secret = read_only[len("mpk_") + 13:]
    assert len(secret) == 43 and all(secret not in str(r) for r in rows)     # only hashes are stored


async def test_player_client_sees_only_its_own_purchase(gs):
    a = await gs.buy(player="alice", key="a1")
    b = await gs.buy(player="bob", key="b1")
    status, got, _ = await gs.call("GET", f"/v1/purchases/{a['id']}", key=a["client_token"])
    assert status == 200 and got["id"] == a["id"] and "client_token" not in got
    status, _, _ = await gs.call("GET", f"/v1/purchases/{b['id']}", key=a["client_token"])
    assert status == 401
    status, _, _ = await gs.call("GET", f"/v1/purchases/{b['id']}?token={a['client_token']}", headers={})
    assert status == 401
    status, _, _ = await gs.call("GET", "/v1/purchases", key=a["client_token"])
    assert status == 401      # listing needs an API key
    status, _, _ = await gs.call("GET", f"/v1/purchases/{a['id']}/events?token=mpc_forged", headers={})
    assert status == 401


async def test_listing_filters_and_pages(gs):
    ids = [(await gs.buy(player=f"p{i % 2}", key=f"k{i}"))["id"] for i in range(7)]
    first = await gs.buy(player="p0", key="k0")
    await gs.payer.pay(first["invoice"])
    seen, cursor = [], ""
    while True:
        status, page, _ = await gs.call("GET", f"/v1/purchases?limit=3{'&cursor=' + cursor if cursor else ''}")
        assert status == 200 and len(page["purchases"]) <= 3
        seen += [p["id"] for p in page["purchases"]]
        if not page["next_cursor"]:
            break
        cursor = page["next_cursor"]
    assert sorted(seen) == sorted(ids) and len(seen) == 7
    _, page, _ = await gs.call("GET", "/v1/purchases?player_id=p1")
    assert {p["player_id"] for p in page["purchases"]} == {"p1"} and len(page["purchases"]) == 3
    for _ in range(100):
        _, page, _ = await gs.call("GET", "/v1/purchases?status=paid")
        if page["purchases"]:
            break
        await asyncio.sleep(0.01)
    assert [p["id"] for p in page["purchases"]] == [first["id"]]
    for q in ("status=bogus", "limit=0", "limit=201", "limit=x", "cursor=@@@"):
        status, err, _ = await gs.call("GET", f"/v1/purchases?{q}")
        assert status == 400, (q, err)


async def test_expiry_and_per_player_limit(tmp_path):
    clock = FakeClock()
    gs = await start_game_sidecar(tmp_path, clock=clock)
    try:
        sword = await gs.buy(sku="sword", player="carol", key="s1")
        status, err, _ = await gs.call("POST", "/v1/purchases", {"sku": "sword", "player_id": "carol",
                                                                 "idempotency_key": "s2"})
        assert status == 409 and err["reason"] == "purchase_limit_reached"
        clock.advance(601)
        _, got, _ = await gs.call("GET", f"/v1/purchases/{sword['id']}")
        assert got["status"] == "expired"           # past expiry, even before the sweeper ran
        assert await gs.games.purchases.expire_due() == 1
        assert await gs.games.purchases.expire_due() == 0
        events = await gs.games.purchases.events_after(0, sword["id"])
        assert [e.type for e in events] == ["purchase.expired"]
        # an expired purchase no longer holds the player's slot
        again = await gs.buy(sku="sword", player="carol", key="s3")
        assert again["status"] == "pending" and again["id"] != sword["id"]
    finally:
        await gs.close()


async def test_catalog_is_public(gs):
    status, cat, _ = await gs.call("GET", "/v1/catalog", headers={})
    assert status == 200
    assert [i["sku"] for i in cat["items"]] == ["gems-100", "sword", "article-1"]
    assert cat["items"][1]["max_per_player"] == 1 and cat["items"][2]["unlockable"] is True


async def test_access_log_leaves_tokens_out(gs, caplog):
    import logging

    p = await gs.buy(player="erin", key="e1")
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        await gs.call("GET", f"/v1/purchases/{p['id']}?token={p['client_token']}", headers={})
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert any(f"/v1/purchases/{p['id']}" in line for line in lines), lines
    assert not any(p["client_token"] in line for line in lines)


async def test_filtered_listing_pages_through_everything(tmp_path):
    clock = FakeClock()
    gs = await start_game_sidecar(tmp_path, clock=clock)
    try:
        early = [await gs.buy(player="p", key=f"e{i}") for i in range(2)]
        clock.advance(1)
        paid = await gs.buy(player="p", key="paid")       # a non-match between matches
        await gs.payer.pay(paid["invoice"])
        clock.advance(1)
        early.append(await gs.buy(player="p", key="e2"))
        clock.advance(601)                       # e0, e1, e2 are now expired
        for _ in range(100):
            if (await gs.games.purchases.get(paid["id"]))["status"] == "paid":
                break
            await asyncio.sleep(0.01)
        seen, cursor = [], ""
        while True:
            _, page, _ = await gs.call("GET", f"/v1/purchases?status=expired&limit=2"
                                              f"{'&cursor=' + cursor if cursor else ''}")
            seen += [p["id"] for p in page["purchases"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == [p["id"] for p in sorted(early, key=lambda p: (p["created_at"], p["id"]))]
    finally:
        await gs.close()
