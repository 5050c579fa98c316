"""Fleet mode on a real network (issue 20). Two merchant nodes run the plugin's agent
against one PostgreSQL store; two `micropay serve` processes in fleet mode hold no node
rights and hand out the agents' invoices; a payer node pays through L402 and Payment.

- Invoices of both nodes are handed out and paid, and every payment reaches the
  sidecars as settled through the store.
- kill -9 of one node's lightningd: once its heartbeat is older than the timeout, every
  new challenge names the other node; an invoice of the dead node handed out before the
  kill, paid after it returns, settles in the store and unlocks the resource.
- The payment queue: a game payout and a session refund are paid by an agent whose node
  has the outbound liquidity (not by the one without), once, within the operator's caps
  (a second payout over the per-player cap is refused and nothing leaves); a payout in
  flight when its lightningd is killed -9 is paid exactly once after the restart.
- A Payment session sold by a fleet sidecar: its deposit invoice is the agent's, and the
  close's refund is paid by the agent through the queue exactly once, also when the
  agent's lightningd is killed -9 with the refund's HTLC held by the payer.
"""
from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import pytest

from micropay.client.payer import Budget, L402Client, NodeWallet, TokenCache
from micropay.games.config import PayoutCaps
from micropay.games.payouts import Payouts
from micropay.games.schema import GAMES_SCHEMA
from micropay.lightning.cln import ClnNode
from micropay.lightning.fleet import FleetBackend
from micropay.store import open_store_from_url
from micropay.store.core import CORE_SCHEMA
from micropay.store.fleet import FLEET_SCHEMA, FleetRepository

from ..conftest import PG_SKIP_REASON, drop_pg_schema, pg_url_with_fresh_schema
from ..helpers_proc import ServerProcess, free_port
from .test_kill_campaigns import KILLED, kill_and_restart
from .test_l402_cln import wait_until
from .test_sessions_cln import give_outbound_liquidity, no_htlcs
from .util import helper_plugin, opts

HEARTBEAT_TIMEOUT_S = 5
CAPS = {"micropay-fleet-pay-max-msat": 40_000_000, "micropay-fleet-pay-subject-day-msat": 50_000_000,
        "micropay-fleet-pay-day-msat": 150_000_000, "micropay-fleet-pay-max-fee-msat": 100_000}
FLEET_TOML = """
service = "fleet"
demo = true
data_dir = "{data}"
[backend]
kind = "fleet"
heartbeat_timeout_s = {hb}
ask_timeout_s = 10
pool_depth = 3
[store]
url = "{url}"
[[routes]]
method = "GET"
path = "/api/joke"
price_msat = 21000
description = "joke"
[[routes]]
method = "GET"
path = "/api/fortune/*"
price_msat = 30000
description = "fortune"
"""


@pytest.fixture
def fleet_url():
    if PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    url = pg_url_with_fresh_schema()
    yield url
    asyncio.run(drop_pg_schema(url))


async def open_repo(url: str) -> FleetRepository:
    store = open_store_from_url(url, (FLEET_SCHEMA,))
    await store.open()
    return FleetRepository(store)


async def live(repo: FleetRepository, n: int) -> bool:
    return len(await repo.live_nodes(int(time.time() * 1000) - HEARTBEAT_TIMEOUT_S * 1000)) >= n


def start_sidecars(tmp_path, url: str, n: int = 2) -> list[ServerProcess]:
    cfg = tmp_path / "fleet.toml"
    cfg.write_text(FLEET_TOML.format(data=tmp_path / "data", hb=HEARTBEAT_TIMEOUT_S, url=url))
    servers = []
    for _ in range(n):          # one after the other: the first creates the shared root keys
        port = free_port()
        servers.append(ServerProcess(["serve", "--config", str(cfg), "--listen", f"127.0.0.1:{port}"],
                                     tmp_path, port))
    return servers


async def challenge(http, url: str) -> tuple[str, str]:
    """A fresh L402 challenge: (macaroon, invoice)."""
    async with http.get(url) as r:
        assert r.status == 402, await r.text()
        l402 = [h for h in r.headers.getall("WWW-Authenticate") if h.startswith("L402 ")][0]
    return re.search(r'macaroon="([^"]+)"', l402).group(1), re.search(r'invoice="([^"]+)"', l402).group(1)


async def settled_in_store(repo: FleetRepository, payment_hash: str) -> bool:
    rows = await repo.store.query("SELECT COUNT(*) FROM micropay_fleet_settlements WHERE payment_hash = $1",
                                  (payment_hash,))
    return rows[0][0] == 1


async def sidecar_saw_paid(repo: FleetRepository, payment_hash: str, msat: int) -> bool:
    rows = await repo.store.query("SELECT received_msat FROM micropay_challenges WHERE payment_hash = $1 "
                                  "AND paid_at IS NOT NULL", (payment_hash,))
    return bool(rows) and rows[0][0] == msat


async def test_two_sidecars_sell_for_two_agent_nodes_and_a_killed_node_is_left_out(node_factory, fleet_url,
                                                                                  tmp_path):
    agent = opts(**{"micropay-fleet-store": fleet_url, **CAPS})
    l1, l2, l3 = node_factory.get_nodes(3, opts=[{"may_reconnect": True},
                                                 dict(agent, may_reconnect=True, broken_log=KILLED), agent])
    node_factory.join_nodes([l1, l2], wait_for_announce=True)
    node_factory.join_nodes([l1, l3], wait_for_announce=True)
    repo = await open_repo(fleet_url)
    payer = ClnNode(l1.rpc.socket_path)
    await payer.connect()
    servers: list[ServerProcess] = []
    try:
        assert await wait_until(lambda: live(repo, 2), 60), "the agents never beat"
        servers = await asyncio.to_thread(start_sidecars, tmp_path, fleet_url)

        # a payer node pays through L402 and Payment, at both sidecars: 8 paid requests
        for i in range(8):
            client = L402Client(NodeWallet(payer), Budget(max_per_request_msat=50_000),
                                TokenCache(tmp_path / f"c{i}.json"), prefer_payment=i % 4 >= 2)
            res = await client.get(servers[i % 2].url + "/api/joke")
            assert res.status == 200, (i, res.status, res.body[:300])
        pays = [p for p in l1.rpc.listpays()["pays"] if p["status"] == "complete"]
        assert len(pays) == 8
        assert {p["destination"] for p in pays} == {l2.info["id"], l3.info["id"]}, "not both nodes were paid"
        for p in pays:          # every one reached the store's feed, and the sidecars' records
            assert await wait_until(lambda: settled_in_store(repo, p["payment_hash"]), 30), p
            assert await wait_until(lambda: sidecar_saw_paid(repo, p["payment_hash"], 21_000), 30), p

        async with aiohttp.ClientSession() as http:
            # an invoice of l2 handed out before the kill; l2 is killed with -9
            for _ in range(40):
                mac, held = await challenge(http, servers[0].url + "/api/fortune/a")
                if l1.rpc.decode(held)["payee"] == l2.info["id"]:
                    break
            else:
                raise AssertionError("no invoice of l2 in 40 challenges")
            l2.daemon.kill()
            await asyncio.sleep(HEARTBEAT_TIMEOUT_S + 1.5)
            # every challenge from here on names l3, at both sidecars, L402 and Payment alike
            for i in range(10):
                _, inv = await challenge(http, servers[i % 2].url + ("/api/joke" if i % 2 else "/api/fortune/b"))
                assert l1.rpc.decode(inv)["payee"] == l3.info["id"], f"challenge {i} named the dead node"

            # l2 returns; the invoice it issued before dying is paid and settles in the store
            await asyncio.to_thread(kill_and_restart, l2, l1)
            await asyncio.to_thread(l2.wait_channel_active, l2.get_channel_scid(l1))
            assert await wait_until(lambda: live(repo, 2), 60), "l2's agent did not come back"
            paid = l1.rpc.call("xpay", {"invstring": held})
            h = l1.rpc.decode(held)["payment_hash"]
            assert await wait_until(lambda: settled_in_store(repo, h), 30), "l2's paid invoice never settled"
            async with http.get(servers[1].url + "/api/fortune/a",
                                headers={"Authorization": f"L402 {mac}:{paid['payment_preimage']}"}) as r:
                assert r.status == 200, await r.text()
    finally:
        for s in servers:
            s.stop()
        await payer.close()
        await repo.store.close()


HOLD_MSAT = 7_777_000


async def test_payouts_and_refunds_go_through_the_queue_once_within_caps_also_across_a_kill(node_factory, fleet_url,
                                                                                           tmp_path):
    agent = opts(**{"micropay-fleet-store": fleet_url, **CAPS})
    l1, l2, l3 = node_factory.get_nodes(3, opts=[{"may_reconnect": True, "plugin": helper_plugin("hold"),
                                                  "hold-msat": HOLD_MSAT},
                                                 dict(agent, may_reconnect=True, broken_log=KILLED), agent])
    node_factory.join_nodes([l1, l2], wait_for_announce=True)
    node_factory.join_nodes([l1, l3], wait_for_announce=True)
    give_outbound_liquidity(l1, l2)          # l2 can pay; l3's channel is all on l1's side
    assert await wait_until(lambda: no_htlcs(l1))
    repo = await open_repo(fleet_url)
    backend = FleetBackend(repo, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S)
    await backend.start()
    games = open_store_from_url(f"sqlite:///{tmp_path / 'games.sqlite3'}", (CORE_SCHEMA, GAMES_SCHEMA))
    await games.open()
    payouts = Payouts(PayoutCaps(10**10, 10**10, 100_000), games, backend)
    try:
        async def l2_knows_its_outbound():
            return any(n.node_id == l2.info["id"] and n.outbound_msat > 100_000_000
                       for n in await repo.live_nodes(int(time.time() * 1000) - 5000))
        assert await wait_until(l2_knows_its_outbound, 30), "l2's heartbeat never showed its outbound liquidity"

        # a payout to alice, paid once by l2 (the node that can carry it)
        inv = l1.rpc.invoice(30_000_000, "alice-1", "reward")
        view, _ = await payouts.create({"player_id": "alice", "destination": inv["bolt11"],
                                        "idempotency_key": "alice-1"})
        assert view["status"] == "paid", view
        row = await repo.payment(f"micropay-payout-{view['id']}")
        assert row.node_id == l2.info["id"] and row.subject == "alice"
        again, _ = await payouts.create({"player_id": "alice", "destination": inv["bolt11"],
                                         "idempotency_key": "alice-1"})
        assert again["id"] == view["id"] and again["status"] == "paid"

        # a second one to alice would pass her over the node operator's cap: refused, nothing leaves
        inv2 = l1.rpc.invoice(30_000_000, "alice-2", "reward")
        refused, _ = await payouts.create({"player_id": "alice", "destination": inv2["bolt11"],
                                           "idempotency_key": "alice-2"})
        assert refused["status"] == "failed" and "cap" in refused["error"], refused
        assert l1.rpc.listinvoices("alice-2")["invoices"][0]["status"] == "unpaid"

        # a session refund on an amountless return invoice, paid once with the amount asked
        ret = l1.rpc.call("invoice", {"amount_msat": "any", "label": "ret", "description": "refund"})
        refund = await backend.pay(ret["bolt11"], label="micropay-refund-s1", amount_msat=12_345_000,
                                   max_fee_msat=100_000, retry_for_s=60)
        assert await backend.pay(ret["bolt11"], label="micropay-refund-s1", amount_msat=12_345_000,
                                 max_fee_msat=100_000, retry_for_s=60) == refund
        got = l1.rpc.listinvoices("ret")["invoices"][0]
        assert got["status"] == "paid" and got["amount_received_msat"] == 12_345_000
        assert (await repo.payment("micropay-refund-s1")).node_id == l2.info["id"]

        # kill -9 of the executing lightningd while bob's payout is in flight (l1 holds its HTLC)
        inv3 = l1.rpc.invoice(HOLD_MSAT, "bob-1", "reward")
        creating = asyncio.ensure_future(payouts.create({"player_id": "bob", "destination": inv3["bolt11"],
                                                         "idempotency_key": "bob-1"}))
        await asyncio.to_thread(l1.daemon.wait_for_log, "holding an HTLC")
        await asyncio.to_thread(kill_and_restart, l2, l1)
        await asyncio.wait_for(creating, 90)          # pending or paid: the queue settles it either way

        async def bob_paid():
            row = await repo.payment("micropay-payout-" + (await payouts.repo.by_key("bob-1")).id)
            return row is not None and row.state == "paid"
        assert await wait_until(bob_paid, 120), "the payout in flight at the kill was never settled paid"
        got = l1.rpc.listinvoices("bob-1")["invoices"][0]
        assert got["status"] == "paid" and got["amount_received_msat"] == HOLD_MSAT
        sent = [p for p in l2.rpc.listsendpays()["payments"] if p["payment_hash"] == inv3["payment_hash"]]
        assert [p["status"] for p in sent] == ["complete"], sent            # one attempt, completed once
        # nothing ever left l3, the node without outbound liquidity
        assert l3.rpc.listsendpays()["payments"] == []
    finally:
        await games.close()
        await backend.close()
        await repo.store.close()


async def test_an_agent_refilling_and_waiting_on_a_payment_holds_up_none_of_its_nodes_payments(node_factory,
                                                                                              fleet_url):
    """The agent shares lightningd's loop with everything else the plugin does. While it
    refills a deep pool (one `invoice` after another) and waits on a queued payout whose
    HTLC the payee holds for 10 s, payments into its node and forwarded through it take
    as long as they did with the agent idle (within test_never_blocks.allowed's margin,
    as the plugin's other waits are measured)."""
    from micropay.store.fleet import Want
    from .test_never_blocks import allowed, paid_in
    agent = opts(**{"micropay-fleet-store": fleet_url, **CAPS})
    l1, l2, l3 = node_factory.line_graph(3, opts=[{}, agent, {"plugin": helper_plugin("hold"),
                                                             "hold-msat": HOLD_MSAT}], wait_for_announce=True)
    repo = await open_repo(fleet_url)
    backend = FleetBackend(repo, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, pool_depth=0)
    await backend.start()
    try:
        assert await wait_until(lambda: live(repo, 1), 60), "the agent never beat"
        for _ in range(2):                                   # warm up routes
            await asyncio.to_thread(paid_in, l1, l2)
            await asyncio.to_thread(paid_in, l1, l3)
        baseline_in = [await asyncio.to_thread(paid_in, l1, l2) for _ in range(5)]
        baseline_fwd = [await asyncio.to_thread(paid_in, l1, l3) for _ in range(5)]

        async def ready() -> int:
            return await repo.ready_count(l2.info["id"], 1000, "busy", int(time.time()) + 60)
        await repo.want(Want(1000, "busy", 600, 3600), int(time.time() * 1000))
        held = l3.rpc.invoice(HOLD_MSAT, "held-payout", "held")["bolt11"]
        paying = asyncio.ensure_future(backend.pay(held, label="micropay-payout-held", max_fee_msat=100_000,
                                                   retry_for_s=60))
        await asyncio.to_thread(l3.daemon.wait_for_log, "holding an HTLC")
        assert await wait_until(lambda: ready_at_least(ready, 1), 30), "the agent never began refilling"
        before = await ready()
        slowest = []
        for _ in range(3):
            into, through = await asyncio.to_thread(paid_in, l1, l2), await asyncio.to_thread(paid_in, l1, l3)
            slowest.append((into, through))
            assert into <= allowed(baseline_in), f"into l2 took {into:.3f}s while its agent worked"
            assert through <= allowed(baseline_fwd), f"through l2 took {through:.3f}s while its agent worked"
        after = await ready()
        still_held = not paying.done()
        assert after > before, f"the pool did not grow while the payments were measured ({before} -> {after})"
        assert still_held, "the queued payout was no longer waiting while the payments were measured"
        paid = await asyncio.wait_for(paying, 60)
        assert paid.amount_msat == HOLD_MSAT
        print(f"baseline into l2 max {max(baseline_in) * 1000:.0f} ms, through l2 max "
              f"{max(baseline_fwd) * 1000:.0f} ms; while the agent refilled ({before} -> {after} pooled) and "
              f"waited on a held payout: into {max(i for i, _ in slowest) * 1000:.0f} ms, "
              f"through {max(t for _, t in slowest) * 1000:.0f} ms")
    finally:
        await backend.close()
        await repo.store.close()


async def ready_at_least(count, n: int) -> bool:
    return await count() >= n


async def test_a_fleet_sidecars_session_refund_is_paid_by_the_agent_once_across_a_kill(node_factory, fleet_url,
                                                                                       tmp_path):
    """A Payment session sold by a fleet sidecar (no node rights): the deposit invoice is
    the agent's, paid by the payer's node over Lightning; the close's refund goes into the
    payment queue and l2's agent pays it onto the payer's return invoice, whose HTLC the
    payer holds while l2's lightningd is killed -9 and restarted. The refund is paid
    exactly once (one attempt on l2, the return invoice paid once with the refund), and
    the session ends closed with the refund succeeded."""
    from micropay.core.errors import PaymentUnknown
    from micropay.payment import scheme as pa

    from ..conftest import make_config, start_sidecar
    from ..payment.test_sessions import DEPOSIT_UNITS, UNIT_MSAT, routes, start_upstream
    from .test_sessions_cln import assert_refunded_once, resume_until_closed, to_us_msat
    refund_msat = (DEPOSIT_UNITS - 1) * UNIT_MSAT              # the open's event spends one unit
    agent = opts(**{"micropay-fleet-store": fleet_url, **CAPS})
    l1, l2 = node_factory.line_graph(
        2, opts=[{"may_reconnect": True, "plugin": helper_plugin("hold"), "hold-msat": refund_msat},
                 dict(agent, may_reconnect=True, broken_log=KILLED)], wait_for_announce=True)
    give_outbound_liquidity(l1, l2)
    assert await wait_until(lambda: no_htlcs(l1))
    up_runner, up_url, seen = await start_upstream()
    toml = routes(up_url) + (f'[backend]\nkind = "fleet"\nheartbeat_timeout_s = {HEARTBEAT_TIMEOUT_S}\n'
                             f'ask_timeout_s = 10\n[store]\nurl = "{fleet_url}"\n')
    sc = await start_sidecar(make_config(tmp_path, toml))
    rt, runner, url = sc.rt, sc.runner, sc.url
    repo = await open_repo(fleet_url)
    ledger = rt.gate.sessions
    try:
        async def l2_can_pay():
            return any(n.node_id == l2.info["id"] and n.outbound_msat > refund_msat
                       for n in await repo.live_nodes(int(time.time() * 1000) - 5000))
        assert await wait_until(l2_can_pay, 30), "l2's agent never reported its outbound liquidity"
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/gen?n=1") as r:
                assert r.status == 402, await r.text()
                (ch,) = [c for c in pa.parse_challenges(r.headers.getall("WWW-Authenticate")) if c.intent == "session"]
            deposit = pa.decode_request(ch)["depositInvoice"]
            assert l1.rpc.decode(deposit)["payee"] == l2.info["id"], "the deposit invoice is not the agent's"
            paid = l1.rpc.call("xpay", {"invstring": deposit})
            ret = l1.rpc.call("invoice", {"amount_msat": "any", "label": "ret", "description": "refund"})
            auth = pa.format_session_credential(ch, {"action": "open", "preimage": paid["payment_preimage"],
                                                     "returnInvoice": ret["bolt11"]})
            async with http.get(url + "/gen?n=1", headers={"Authorization": auth}) as r:
                assert r.status == 200, await r.text()
                await r.read()
        assert seen["gen"] == [0]
        sid = pa.decode_request(ch)["paymentHash"]
        await asyncio.sleep(ledger.lease_s + 0.1)
        await ledger.flush_leases()
        assert await wait_until(lambda: no_htlcs(l1))
        before = to_us_msat(l1)
        closing = asyncio.ensure_future(ledger.close(sid))
        await asyncio.to_thread(l1.daemon.wait_for_log, "holding an HTLC")     # the agent's refund is out
        row = await repo.payment_by_hash(ret["payment_hash"])
        assert row is not None and row.key.startswith("micropay-refund-") and row.kind == "refund"
        assert row.state == "sending" and row.node_id == l2.info["id"] and row.amount_msat == refund_msat
        await asyncio.to_thread(kill_and_restart, l2, l1)
        try:
            await asyncio.wait_for(closing, 120)
        except PaymentUnknown:                   # the close does not guess; a later resume settles it
            pass
        await asyncio.to_thread(l2.wait_channel_active, l2.get_channel_scid(l1))
        await resume_until_closed(ledger.repo, rt.node, sid, 120)
        inv = await assert_refunded_once(ledger.repo, sid, l1, l2, refund_msat)
        final = await repo.payment_by_hash(inv["payment_hash"])
        assert final.state == "paid" and final.node_id == l2.info["id"]
        assert to_us_msat(l1) - before == refund_msat, "the payer's node did not get exactly the refund"
    finally:
        await runner.cleanup()
        await up_runner.cleanup()
        await repo.store.close()
