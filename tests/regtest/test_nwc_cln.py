"""Nostr Wallet Connect served by the plugin on a real network: node l1 serves NWC on a
relay on loopback; clients (rust-nostr's, and requests built here) spend from it; what
the payee's node received and what left l1 are read from the nodes themselves."""
import asyncio
import json
import random
import time

import pytest
from pyln.client import RpcError

from micropay.nostr import nip44
from micropay.nostr.event import sign_event
from micropay.nostr.relay import Relay
from micropay.nwc.uri import parse_uri

from .test_kill_campaigns import KILLED, SEED, kill_and_restart
from .util import helper_plugin, opts

n = pytest.importorskip("nostr_sdk", reason="nostr-sdk is not installed (pip install '.[test]')")
HOLD_MSAT = 777_777                       # what the hold plugin keeps in flight for 10 s


def _create(node, **params):
    return node.rpc.call("micropay-nwc-create", {"name": "agent", "budget_msat": 100_000, **params})


async def test_a_third_party_client_spends_from_the_node(node_factory, nostr_relay):
    l1, l2 = node_factory.line_graph(2, opts=[opts(**{"micropay-nwc-relay": nostr_relay.url}), {}],
                                     wait_for_announce=True)
    l1.rpc.xpay(l2.rpc.invoice(20_000_000, "float", "so that l2 can pay l1 back")["bolt11"])
    created = _create(l1, budget_msat=60_000, budget_period="daily")
    assert created["state"] == "active" and created["uri"].startswith("nostr+walletconnect://")
    assert parse_uri(created["uri"]).secret.hex() not in json.dumps(l1.rpc.call("micropay-nwc-list"))
    await asyncio.sleep(0.5)
    client = n.NostrWalletConnect(n.NostrWalletConnectUri.parse(created["uri"]))

    info = await client.get_info()
    assert info.pubkey == l1.info["id"] and info.network == "regtest"
    assert (await client.get_balance()).balance == 60_000           # the budget, not the node's balance

    bill = l2.rpc.invoice(21_000, "bill", "a bill")
    paid = await client.pay_invoice(n.PayInvoiceRequest(id=None, invoice=bill["bolt11"], amount=None))
    got = l2.rpc.listinvoices("bill")["invoices"][0]
    assert got["status"] == "paid" and got["amount_received_msat"] == 21_000 and paid.preimage == got["payment_preimage"]
    pays = [p for p in l1.rpc.listpays()["pays"] if p["payment_hash"] == bill["payment_hash"]]
    fee = int(pays[0]["amount_sent_msat"]) - 21_000
    conn = l1.rpc.call("micropay-nwc-list")["connections"][0]
    assert conn["used_msat"] == 21_000 + fee and (paid.fees_paid or 0) == fee

    made = await client.make_invoice(n.MakeInvoiceRequest(amount=5_000, description="tip", description_hash=None,
                                                          expiry=None))
    l2.rpc.xpay(made.invoice)
    await asyncio.sleep(0)
    for _ in range(100):
        looked = await client.lookup_invoice(n.LookupInvoiceRequest(payment_hash=made.payment_hash, invoice=None))
        if looked.settled_at is not None:
            break
        await asyncio.sleep(0.1)
    assert looked.settled_at is not None and looked.amount == 5_000

    too_much = l2.rpc.invoice(40_000, "too-much", "over budget")
    with pytest.raises(Exception, match=r"\[QuotaExceeded\]"):
        await client.pay_invoice(n.PayInvoiceRequest(id=None, invoice=too_much["bolt11"], amount=None))
    assert l2.rpc.listinvoices("too-much")["invoices"][0]["status"] == "unpaid"

    l1.rpc.call("micropay-nwc-revoke", {"id": "agent"})
    with pytest.raises(Exception):
        await asyncio.wait_for(client.get_balance(), 15)
    with pytest.raises(RpcError) as bad:
        _create(l1, budget_msat="lots")
    assert bad.value.error["code"] == -32602


class Watcher:
    """Every answer (kind 23195) the relay carries for one client, decrypted."""

    def __init__(self, url, uri):
        self.uri, self.answers = uri, []
        self.relay = Relay(url, self.on_event)

    def on_event(self, sub, ev):
        text = nip44.decrypt(ev.content, nip44.conversation_key(self.uri.client, ev.pubkey))
        self.answers.append((ev.first("e"), json.loads(text)))

    async def start(self):
        await self.relay.subscribe("answers", [{"kinds": [23195], "#p": [self.uri.client.pubkey]}])
        self.relay.start()
        assert await self.relay.wait_connected(10)

    async def pay(self, bolt11):
        return await self.send("pay_invoice", {"invoice": bolt11})

    async def send(self, method, params):
        text = json.dumps({"method": method, "params": params})
        ev = sign_event(self.uri.client, 23194, nip44.encrypt(text, nip44.conversation_key(self.uri.client,
                                                                                       self.uri.service_pubkey)),
                        [["p", self.uri.service_pubkey], ["encryption", "nip44_v2"]])
        await self.relay.publish(ev)
        return ev.id

    async def wait_answer(self, rid, timeout):
        deadline = time.monotonic() + timeout
        while not self.for_request(rid) and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        return bool(self.for_request(rid))

    def for_request(self, rid):
        return [a for e, a in self.answers if e == rid]


async def test_kill_lightningd_mid_pay_invoice(node_factory, nostr_relay):
    """kill -9 of the serving node while a pay_invoice is out (the payee holds the HTLC):
    after the restart the request is answered once, by the node's own record, the payee was
    paid at most once, and the connection's budget counts exactly what left the node."""
    r = random.Random(f"{SEED}-nwc")
    print(f"nwc: seed {SEED} (MICROPAY_KILL_SEED={SEED} replays it)")
    l1, l2, l3 = node_factory.line_graph(
        3, opts=[{"may_reconnect": True},
                 opts(may_reconnect=True, broken_log=KILLED, **{"micropay-nwc-relay": nostr_relay.url}),
                 {"may_reconnect": True, "plugin": helper_plugin("hold")}],
        wait_for_announce=True)
    # a budget with no period: a daily one starts again at midnight UTC, and a run across
    # midnight then reads a used amount of 0 for the new day (one run did: both payments
    # made at 23:59, the budget read at 00:00)
    uri = parse_uri(_create(l2, budget_msat=3 * HOLD_MSAT, budget_period="never")["uri"])
    watcher = Watcher(nostr_relay.url, uri)
    await watcher.start()
    await asyncio.sleep(0.5)
    outcomes = []
    for i in range(2):
        inv = l3.rpc.invoice(HOLD_MSAT, f"held-{i}", "held")
        rid = await watcher.pay(inv["bolt11"])
        await asyncio.sleep(r.uniform(0.2, 4.0))             # before, while or after the HTLC is out
        await asyncio.to_thread(kill_and_restart, l2, l1, l3)
        if not await watcher.wait_answer(rid, 90):
            # killed before the service took the request in: relays keep no ephemeral
            # events, so it is gone; nothing of it may have left the node, and the
            # client's retry (a new request for the same invoice) is answered instead
            assert not [p for p in l2.rpc.listsendpays()["payments"] if p["payment_hash"] == inv["payment_hash"]]
            outcomes.append("lost, retried")
            print(f"nwc: request {rid[:12]} was lost with the node; answers so far {watcher.answers}, "
                  f"watcher connected {watcher.relay.connected}, {watcher.relay.stats}")
            rid = await watcher.pay(inv["bolt11"])
            assert await watcher.wait_answer(rid, 90)
        await asyncio.sleep(3)                                # a second answer would come now
        answers = watcher.for_request(rid)
        print(f"nwc: request {rid[:12]}: answers {answers}")
        assert len(answers) == 1, answers
        paid_at_payee = l3.rpc.listinvoices(f"held-{i}")["invoices"][0]["status"] == "paid"
        assert (answers[0]["error"] is None) == paid_at_payee, (answers, paid_at_payee)
        outcomes.append("paid" if paid_at_payee else answers[0]["error"]["code"])
    left = sum(int(p["amount_sent_msat"]) for p in l2.rpc.listpays()["pays"] if p["status"] == "complete")
    used = l2.rpc.call("micropay-nwc-list")["connections"][0]["used_msat"]
    assert used == left, (used, left)
    print(f"nwc: 2 kills mid pay_invoice, outcomes {outcomes}, {left} msat left the node, budget used {used}")
    await watcher.relay.close()


async def test_micropay_get_pays_another_nodes_sidecar_through_nwc(node_factory, nostr_relay, tmp_path):
    """`micropay get --wallet nwc:@FILE` on Lightning: l1's plugin serves NWC, the CLI (a
    process of its own) pays the 402 of l2's sidecar from it; l2 received exactly the
    price, and l1's connection counts the price and the fee l1 paid."""
    import os
    import sys

    from micropay.lightning.cln import ClnNode

    from ..conftest import make_config, start_sidecar
    l1, l2 = node_factory.line_graph(2, opts=[opts(**{"micropay-nwc-relay": nostr_relay.url}), {}],
                                     wait_for_announce=True)
    node = ClnNode(l2.rpc.socket_path)
    await node.connect()
    sc = await start_sidecar(make_config(tmp_path), node=node)
    uri_file = tmp_path / "agent.nwc"
    uri_file.write_text(_create(l1, budget_msat=50_000)["uri"])
    uri_file.chmod(0o600)
    await asyncio.sleep(0.5)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "micropay.cli", "get", sc.url + "/api/joke", "--wallet", f"nwc:@{uri_file}",
            "--cache", str(tmp_path / "cache.json"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        assert b"joke" in out
        paid = [i for i in l2.rpc.listinvoices()["invoices"] if i["status"] == "paid"]
        assert [i["amount_received_msat"] for i in paid] == [1000]
        fee = sum(int(p["amount_sent_msat"]) - 1000 for p in l1.rpc.listpays()["pays"] if p["status"] == "complete")
        assert l1.rpc.call("micropay-nwc-list")["connections"][0]["used_msat"] == 1000 + fee
    finally:
        await sc.runner.cleanup()
        await node.close()


async def test_paywall_with_bitcoin_connect_on_the_plugins_nwc(node_factory, nostr_relay, tmp_path):
    """Chromium: l2's paywall (a game sidecar on Core Lightning) with Bitcoin Connect; the
    reader connects l1's NWC URI and unlocks the article with one click; l2 was paid the
    price and the page unlocked over SSE from the purchase's record."""
    from micropay.lightning.cln import ClnNode

    from ..conftest import make_config, serve_app, start_sidecar
    from ..games.test_paywall_wallets import build_bitcoin_connect, unlock_with_bitcoin_connect
    from .test_games_cln import GAME, Hooks
    bundle = build_bitcoin_connect(tmp_path / "bitcoin-connect.js")
    l1, l2 = node_factory.line_graph(2, opts=[opts(**{"micropay-nwc-relay": nostr_relay.url}), {}],
                                     wait_for_announce=True)
    hooks = Hooks()
    hooks.secret_path = tmp_path / "data" / "webhook-game.secret"
    hook_runner, hook_url = await serve_app(hooks.app)
    node = ClnNode(l2.rpc.socket_path)
    await node.connect()
    toml = GAME.format(rpc=l2.rpc.socket_path, hook=hook_url + "/hook", expiry=600)
    sc = await start_sidecar(make_config(tmp_path, toml + f'\n[paywall]\nbitcoin_connect_file = "{bundle}"\n'),
                             node=node)
    uri = _create(l1, budget_msat=20_000)["uri"]
    await asyncio.sleep(0.5)
    try:
        await unlock_with_bitcoin_connect(f"{sc.url}/paywall/article", uri, timeout_s=60)
        paid = [i for i in l2.rpc.listinvoices()["invoices"] if i["status"] == "paid"]
        assert [i["amount_received_msat"] for i in paid] == [3000]
        fee = sum(int(p["amount_sent_msat"]) - 3000 for p in l1.rpc.listpays()["pays"] if p["status"] == "complete")
        assert l1.rpc.call("micropay-nwc-list")["connections"][0]["used_msat"] == 3000 + fee
    finally:
        await sc.runner.cleanup()
        await node.close()
        await hook_runner.cleanup()
