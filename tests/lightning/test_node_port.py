"""The Node and RecordStore ports are the only way to the node: both adapters provide
every member with the port's parameters, and the services that took Core Lightning
before (the stream engine, the invoice issuer, payouts) run on the sandbox as they are."""
import inspect

import pytest

from micropay.games.payouts import Payouts
from micropay.plugin.invoices import InvoiceIssuer
from micropay.lightning.base import Node, RecordStore
from micropay.lightning.cln import ClnNode
from micropay.lightning.datastore import Datastore
from micropay.lightning.fleet import FleetBackend
from micropay.lightning.memrecords import MemoryRecords
from micropay.lightning.sandbox import SandboxNetwork, SandboxNode
from micropay.store import open_store_from_url
from micropay.streams.runner import StreamRunner
from micropay.streams.schedule import TLV_PODCAST
from micropay.l402.tokens import RootKeyRing, TokenService


def members(port) -> list[str]:
    return [n for n in dir(port) if not n.startswith("_")]


@pytest.mark.parametrize("port,adapters", [(Node, (ClnNode, SandboxNode, FleetBackend)), (RecordStore, (Datastore, MemoryRecords))])
def test_adapters_provide_the_whole_port(port, adapters):
    for adapter in adapters:
        for name in members(port):
            assert hasattr(adapter, name), f"{adapter.__name__} lacks {name}"
            want = getattr(port, name)
            if callable(want) and not isinstance(want, property):
                got = inspect.signature(getattr(adapter, name)).parameters
                assert list(got) == list(inspect.signature(want).parameters), f"{adapter.__name__}.{name}"


async def test_a_stream_runs_on_the_sandbox():
    net = SandboxNetwork()
    payer, payee = net.add_node("payer", 10_000_000), net.add_node("payee")
    t = [1_800_000_000.0]
    runner = StreamRunner(payer, MemoryRecords(), clock=lambda: t[0])
    await runner.load()
    s = await runner.create(payee.id, 1000, 60, 10_000)
    for _ in range(3):
        await runner._step(runner.streams[s["id"]])
        t[0] += 60
    assert payee.balance_msat == 3000 and [amount for amount, _ in payee.keysends_received] == [1000] * 3
    assert all(str(TLV_PODCAST) in tlvs for _, tlvs in payee.keysends_received)       # bLIP-10 record


async def test_the_invoice_issuer_runs_on_the_sandbox(tmp_path):
    net = SandboxNetwork()
    node, payer = net.add_node("merchant"), net.add_node("payer", 10_000_000)
    store = open_store_from_url(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    await store.open()
    try:
        tokens = TokenService(RootKeyRing.load_or_create(tmp_path / "keys.json"), "svc")
        issuer = InvoiceIssuer(node, MemoryRecords(), tokens, store)
        inv = await issuer.issue(2500, "coffee", label="order-1")
        assert await issuer.issue(2500, "coffee", label="order-1") == inv       # idempotent by label
        paid = await payer.pay(inv["bolt11"])
        listed = (await issuer.list())["invoices"]
        assert [(i["label"], i["status"]) for i in listed] == [("order-1", "paid")]
        ok = await issuer.verify(f"{inv['token']}:{paid.preimage}")
        assert ok["valid"] and ok["payment_hash"] == inv["payment_hash"]
    finally:
        await store.close()


async def test_payouts_refuse_offers_on_a_node_that_cannot_pay_them(tmp_path):
    from micropay.core.errors import BadRequest
    from micropay.games.config import PayoutCaps
    from micropay.games.schema import GAMES_SCHEMA
    from micropay.store import CORE_SCHEMA
    store = open_store_from_url(f"sqlite:///{tmp_path / 'db.sqlite3'}", (CORE_SCHEMA, GAMES_SCHEMA))
    await store.open()
    try:
        payouts = Payouts(PayoutCaps(10_000, 10_000), store, SandboxNetwork().add_node("n", 10_000))
        with pytest.raises(BadRequest, match="offers needs the cln backend"):
            await payouts.create({"player_id": "p", "destination": "lno1qqq", "idempotency_key": "k",
                                  "amount_msat": 5})
    finally:
        await store.close()
