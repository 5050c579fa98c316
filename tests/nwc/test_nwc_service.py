"""The plugin's NWC service on a sandbox node, driven through a real relay on loopback by
rust-nostr's NWC client (nostr-sdk): a client that is not ours."""
from __future__ import annotations

import asyncio

import pytest

from micropay.lightning.sandbox import SandboxNetwork
from micropay.nwc.runner import NwcRunner
from micropay.nwc.uri import parse_uri

from .util import nwc_service

n = pytest.importorskip("nostr_sdk", reason="nostr-sdk is not installed (pip install '.[test]')")
ALL = ("get_info", "get_balance", "make_invoice", "pay_invoice", "pay_keysend", "lookup_invoice",
       "list_transactions")


@pytest.fixture
async def wallet(tmp_path, nostr_relay):
    net = SandboxNetwork()
    node = net.add_node("alice", balance_msat=10_000_000)
    shop = net.add_node("shop", balance_msat=1_000_000)
    async with nwc_service(node, tmp_path, nostr_relay.url, alias="alice") as runner:
        yield runner, node, shop

async def connect(runner, **kw):
    args = dict(budget_msat=100_000, budget_period="daily", methods=ALL, max_fee_msat=1_000)
    args.update(kw)
    created = await runner.service.create(kw.pop("name", "app"), **{k: v for k, v in args.items() if k != "name"})
    await runner.changed()
    await asyncio.sleep(0.3)                 # the relay has the new subscription and the info event
    return created, n.NostrWalletConnect(n.NostrWalletConnectUri.parse(created["uri"]))


async def test_a_third_party_client_uses_the_service(wallet):
    runner, node, shop = wallet
    created, client = await connect(runner)
    uri = parse_uri(created["uri"])
    assert uri.relays == (runner.pool.urls[0],) and created["state"] == "active"
    assert created["uri"].count(uri.secret.hex()) == 1 and uri.secret.hex() not in str(await runner.service.list())

    info = await client.get_info()
    assert info.alias == "alice" and info.network == "regtest" and info.pubkey == await node.node_id()
    assert (await client.get_balance()).balance == 100_000             # the budget bounds what it sees

    made = await client.make_invoice(n.MakeInvoiceRequest(amount=5_000, description="coffee",
                                                          description_hash=None, expiry=None))
    dec = await node.decode(made.invoice)
    assert dec.amount_msat == 5_000 and dec.payee == await node.node_id() and dec.description == "coffee"
    await shop.pay(made.invoice)
    for _ in range(100):
        looked = await client.lookup_invoice(n.LookupInvoiceRequest(payment_hash=made.payment_hash, invoice=None))
        if looked.settled_at is not None:
            break
        await asyncio.sleep(0.05)
    assert looked.amount == 5_000 and looked.preimage

    bill = await shop.create_invoice(30_000, "bill-1", "a bill", 600)
    paid = await client.pay_invoice(n.PayInvoiceRequest(id=None, invoice=bill.bolt11, amount=None))
    assert paid.preimage and shop.invoice_status(bill.payment_hash) == "paid"
    view = (await runner.service.list())[0]
    assert view["used_msat"] == 30_000 + (paid.fees_paid or 0)
    assert (await client.get_balance()).balance == 100_000 - view["used_msat"]

    again = await client.pay_invoice(n.PayInvoiceRequest(id=None, invoice=bill.bolt11, amount=None))
    assert again.preimage == paid.preimage                    # the same invoice twice pays once
    assert (await runner.service.list())[0]["used_msat"] == view["used_msat"]

    txs = await client.list_transactions(n.ListTransactionsRequest(_from=None, until=None, limit=10, offset=None,
                                                                   unpaid=None, transaction_type=None))
    assert sorted((str(t.transaction_type), t.amount) for t in txs) == sorted(
        [(str(n.TransactionType.INCOMING), 5_000), (str(n.TransactionType.OUTGOING), 30_000)])


async def test_budget_exhausted_is_quota_exceeded_and_nothing_leaves(wallet):
    runner, node, shop = wallet
    _, client = await connect(runner, budget_msat=20_000, max_fee_msat=1_000)
    big = await shop.create_invoice(19_500, "big", "too much with the fee cap", 600)
    with pytest.raises(Exception, match=r"\[QuotaExceeded\]"):
        await client.pay_invoice(n.PayInvoiceRequest(id=None, invoice=big.bolt11, amount=None))
    assert shop.invoice_status(big.payment_hash) == "unpaid"
    ok = await shop.create_invoice(19_000, "ok", "fits", 600)
    await client.pay_invoice(n.PayInvoiceRequest(id=None, invoice=ok.bolt11, amount=None))
    assert shop.invoice_status(ok.payment_hash) == "paid"


async def test_restricted_methods_and_revoked_connections(wallet):
    runner, node, shop = wallet
    created, client = await connect(runner, methods=("get_info", "make_invoice"))
    await client.get_info()
    bill = await shop.create_invoice(1_000, "r", "restricted", 600)
    with pytest.raises(Exception, match=r"\[Restricted\]"):
        await client.pay_invoice(n.PayInvoiceRequest(id=None, invoice=bill.bolt11, amount=None))
    assert (await runner.service.revoke(created["id"]))["state"] == "revoked"
    await runner.changed()
    with pytest.raises(Exception):
        await asyncio.wait_for(client.get_info(), 15)
    assert shop.invoice_status(bill.payment_hash) == "unpaid"


async def test_a_restarted_service_answers_its_connections(wallet, tmp_path):
    """The connections outlive the service: a new one on the same store (a plugin restart)
    subscribes to their keys at once and answers them."""
    runner, node, shop = wallet
    created, client = await connect(runner)
    await client.get_info()
    await runner.close()
    again = NwcRunner(node, runner.store, tmp_path / "nwc_secret", runner.pool.urls, node_info=runner.service.node_info)
    await again.start()
    try:
        assert await again.pool.wait_connected(10)
        await asyncio.sleep(0.3)
        assert (await asyncio.wait_for(client.get_balance(), 15)).balance == 100_000
    finally:
        await again.close()


async def test_notifications_reach_the_client(wallet):
    """payment_received when an invoice the connection made is paid, payment_sent when
    it pays; NIP-44 (kind 23197) and NIP-04 (23196) twins, addressed to the client only."""
    import json

    from micropay.nostr import nip04, nip44
    from micropay.nostr.relay import Relay
    runner, node, shop = wallet
    created, client = await connect(runner)
    uri = parse_uri(created["uri"])
    seen = []
    watch = Relay(runner.pool.urls[0], lambda sub, ev: seen.append(ev))
    await watch.subscribe("n", [{"kinds": [23196, 23197], "#p": [uri.client.pubkey]}])
    watch.start()
    try:
        assert await watch.wait_connected(10)
        made = await client.make_invoice(n.MakeInvoiceRequest(amount=4_000, description="note me",
                                                              description_hash=None, expiry=None))
        await shop.pay(made.invoice)
        bill = await shop.create_invoice(3_000, "n-bill", "notify", 600)
        await client.pay_invoice(n.PayInvoiceRequest(id=None, invoice=bill.bolt11, amount=None))
        for _ in range(100):
            if len(seen) >= 4:
                break
            await asyncio.sleep(0.05)
        got = []
        for ev in seen:
            assert ev.pubkey == uri.service_pubkey and ev.first("p") == uri.client.pubkey
            text = (nip44.decrypt(ev.content, nip44.conversation_key(uri.client, ev.pubkey)) if ev.kind == 23197
                    else nip04.decrypt(ev.content, uri.client, ev.pubkey))
            body = json.loads(text)
            got.append((ev.kind, body["notification_type"], body["notification"]["amount"],
                        body["notification"]["state"]))
        assert sorted(got) == sorted([(23197, "payment_received", 4_000, "settled"),
                                      (23196, "payment_received", 4_000, "settled"),
                                      (23197, "payment_sent", 3_000, "settled"),
                                      (23196, "payment_sent", 3_000, "settled")])
    finally:
        await watch.close()
