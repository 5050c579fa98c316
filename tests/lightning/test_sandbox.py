import asyncio
import hashlib

import bolt11
import pytest
from hypothesis import given, settings, strategies as st

from micropay.core.errors import DuplicateLabel, PaymentFailed
from micropay.lightning.bolt11codec import InvalidInvoice, decode_invoice
from micropay.lightning.sandbox import SandboxNetwork

from ..conftest import FakeClock


@pytest.fixture
def net():
    return SandboxNetwork(FakeClock())


async def test_invoice_is_real_bolt11(net):
    merchant = net.add_node("m")
    inv = await merchant.create_invoice(1234, "l1", "coffee", 600)
    assert inv.bolt11.startswith("lnbcrt12340p1")
    dec = bolt11.decode(inv.bolt11)   # the bolt11 package checks the signature
    assert dec.payee == merchant.id and dec.amount_msat == 1234 and dec.payment_hash == inv.payment_hash
    assert dec.currency == "bcrt" and dec.description == "coffee" and dec.expiry == 600
    assert dec.payment_secret and dec.features


async def test_label_is_idempotent(net):
    m = net.add_node("m")
    a = await m.create_invoice(1000, "same", "d", 600)
    assert await m.create_invoice(1000, "same", "d", 600) == a
    with pytest.raises(DuplicateLabel):
        await m.create_invoice(2000, "same", "d", 600)


async def test_pay_settles_once_and_moves_balance(net):
    m, payer = net.add_node("m"), net.add_node("p", 10_000)
    inv = await m.create_invoice(3000, "x", "d", 600)
    p = await payer.pay(inv.bolt11)
    assert hashlib.sha256(bytes.fromhex(p.preimage)).hexdigest() == inv.payment_hash
    assert (payer.balance_msat, m.balance_msat) == (7000, 3000)
    again = await payer.pay(inv.bolt11)          # idempotent for the same payer
    assert again.preimage == p.preimage and payer.balance_msat == 7000
    other = net.add_node("o", 10_000)
    with pytest.raises(PaymentFailed, match="already paid"):
        await other.pay(inv.bolt11)
    assert m.invoice_status(inv.payment_hash) == "paid"


async def test_failures(net):
    m, poor = net.add_node("m"), net.add_node("p", 10)
    inv = await m.create_invoice(3000, "x", "d", 60)
    with pytest.raises(PaymentFailed, match="insufficient"):
        await poor.pay(inv.bolt11)
    net.clock.advance(61)
    rich = net.add_node("r", 10_000)
    with pytest.raises(PaymentFailed, match="expired"):
        await rich.pay(inv.bolt11)
    stranger = SandboxNetwork().add_node("s")
    foreign = await stranger.create_invoice(5, "y", "d", 60)
    with pytest.raises(PaymentFailed, match="no route"):
        await rich.pay(foreign.bolt11)
    with pytest.raises(InvalidInvoice):
        await rich.pay("lnbcrt1garbage")


async def test_settlement_stream_resumes_from_cursor(net):
    m, payer = net.add_node("m"), net.add_node("p", 10_000)
    invs = [await m.create_invoice(100 + i, f"l{i}", "d", 600) for i in range(3)]
    await payer.pay(invs[0].bolt11)
    await payer.pay(invs[1].bolt11)
    seen = []

    async def consume(after):
        async for s in m.settlements(after):
            seen.append(s)
            if s.pay_index == 3:
                return

    task = asyncio.create_task(consume(1))     # already handled #1
    await asyncio.sleep(0.01)
    assert [s.label for s in seen] == ["l1"]
    await payer.pay(invs[2].bolt11)            # arrives while waiting
    await asyncio.wait_for(task, 1)
    assert [(s.pay_index, s.label, s.amount_msat) for s in seen] == [(2, "l1", 101), (3, "l2", 102)]


@pytest.mark.parametrize("text", ["", "x" * 5000, "lnbc1", "lightning:", 42])
def test_decode_rejects_garbage(text):
    with pytest.raises(InvalidInvoice):
        decode_invoice(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.from_regex(r"lnbcrt[0-9a-z]{0,200}", fullmatch=True))
def test_invoice_parser_only_raises_invalid_invoice(text):
    try:
        decode_invoice(text)
    except InvalidInvoice:
        pass
