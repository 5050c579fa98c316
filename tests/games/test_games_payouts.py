"""Payouts: caps per player and per day hold under concurrency, idempotency, failures."""
import asyncio

import pytest

from micropay.games.config import PayoutCaps
from micropay.games.payouts import PayoutCapReached, Payouts
from micropay.lightning.sandbox import SandboxNetwork

from ..games_util import start_game_sidecar


async def _payouts(store, per_player=1000, per_day=2500):
    net = SandboxNetwork()
    game = net.add_node("game", 10_000_000)
    players = {p: net.add_node(p) for p in ("alice", "bob", "carol")}
    return Payouts(PayoutCaps(per_player, per_day, 0), store, game), players


async def test_caps_hold_under_concurrency(store):
    payouts, players = await _payouts(store)

    async def one(player, i):
        inv = await players[player].create_invoice(300, f"l{i}", "reward", 600)
        try:
            p, _ = await payouts.create({"player_id": player, "destination": inv.bolt11,
                                         "idempotency_key": f"{player}-{i}"})
            return p["status"]
        except PayoutCapReached as exc:
            return exc.detail["cap"]
    # 20 concurrent 300 msat payouts to alice: her cap of 1000 allows exactly 3
    results = await asyncio.gather(*(one("alice", i) for i in range(20)))
    assert results.count("paid") == 3 and results.count("per_player_day") == 17
    assert players["alice"].balance_msat == 900
    # bob and carol race for the rest of the day's 2500: 1600 left -> 5 more payouts
    results = await asyncio.gather(*(one(p, i) for i in range(20, 32) for p in ("bob", "carol")))
    assert results.count("paid") == 5, results
    assert players["bob"].balance_msat + players["carol"].balance_msat == 1500
    assert set(results) <= {"paid", "per_day", "per_player_day"}


async def test_idempotent_and_failed_payouts_release_the_cap(store):
    payouts, players = await _payouts(store, per_player=1000, per_day=10_000)
    inv = await players["alice"].create_invoice(800, "a", "reward", 600)
    body = {"player_id": "alice", "destination": inv.bolt11, "idempotency_key": "win-1"}
    first, created = await payouts.create(body)
    again, created_again = await payouts.create(body)
    assert created and not created_again and again["id"] == first["id"] and first["status"] == "paid"
    assert players["alice"].balance_msat == 800
    # an invoice someone else already paid: the payout fails, and does not use the cap
    other = await players["bob"].create_invoice(900, "b", "x", 600)
    players["carol"].balance_msat = 10_000
    await players["carol"].pay(other.bolt11)
    failed, _ = await payouts.create({"player_id": "bob", "destination": other.bolt11, "idempotency_key": "f"})
    assert failed["status"] == "failed" and "already paid" in failed["error"]
    inv2 = await players["bob"].create_invoice(1000, "c", "reward", 600)
    ok, _ = await payouts.create({"player_id": "bob", "destination": inv2.bolt11, "idempotency_key": "g"})
    assert ok["status"] == "paid"
    with pytest.raises(Exception, match="different payout"):
        await payouts.create(dict(body, player_id="bob"))


async def test_payout_http_api(tmp_path):
    gs = await start_game_sidecar(tmp_path)
    try:
        gs.rt.node.balance_msat = 5_000_000
        inv = await gs.payer.create_invoice(250_000, "w", "prize", 600)
        body = {"player_id": "alice", "destination": "lightning:" + inv.bolt11, "idempotency_key": "prize-1"}
        status, p, _ = await gs.call("POST", "/v1/payouts", body)
        assert status == 201 and p["status"] == "paid" and p["amount_msat"] == 250_000, p
        status, same, _ = await gs.call("POST", "/v1/payouts", body)
        assert status == 200 and same["id"] == p["id"]
        status, got, _ = await gs.call("GET", f"/v1/payouts/{p['id']}")
        assert status == 200 and got["preimage"] == p["preimage"]
        big = await gs.payer.create_invoice(900_000, "big", "prize", 600)
        status, err, _ = await gs.call("POST", "/v1/payouts", {"player_id": "alice", "destination": big.bolt11,
                                                               "idempotency_key": "prize-2"})
        assert status == 409 and err["cap"] == "per_player_day" and err["used_msat"] == 250_000
        for bad in ({"player_id": "a", "destination": "lnbcrt1garbage", "idempotency_key": "x"},
                    {"player_id": "a", "destination": "lno1qqq", "idempotency_key": "x", "amount_msat": 5},
                    {"player_id": "a", "destination": inv.bolt11, "idempotency_key": "y", "amount_msat": 7},
                    {"player_id": "a", "destination": 5, "idempotency_key": "x"}):
            status, err, _ = await gs.call("POST", "/v1/payouts", bad)
            assert status == 400, (bad, err)
        reader = await gs.call("POST", "/v1/payouts", body, key=(await _reader_key(gs)))
        assert reader[0] == 403 and "--scope payouts:write" in reader[1]["detail"]   # says how to get one
    finally:
        await gs.close()


async def _reader_key(gs):
    from micropay.games.apikeys import create_key
    key, _ = await create_key(gs.rt.store, "purchases only", ["purchases:write"])
    return key
