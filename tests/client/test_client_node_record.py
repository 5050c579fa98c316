"""The client paying from a node, after a crash, settles its earlier attempt from the
node's record by the shared rule (lightning/outcome.py): a payment lightningd recorded
and was killed before sending (pending, no HTLC) is dead after the grace, and the
budget it held is given back; one whose HTLC is out is waited for, however long, and
counted once it completes. The node wraps a sandbox node with what a killed
lightningd leaves behind: a pending record, with or without its HTLC."""
import time

import pytest

from micropay.client.payer import Budget, L402Client, NodeWallet, PaymentNeverLeft, TokenCache
from micropay.core.errors import PaymentUnknown
from micropay.lightning.base import PaymentStatus
from micropay.lightning.bolt11codec import decode_invoice
from micropay.lightning.outcome import ORPHAN_GRACE_S

from ..conftest import FakeClock


class Crash(BaseException):
    """The process (and its lightningd) dies here."""


class KilledLightningd:
    """The payer's node. The first payment is recorded pending and lightningd dies, with
    the HTLC out (`htlc=True`) or before saving it. Like lightningd, it refuses to pay a
    hash it holds pending (ClnNode.pay then says the outcome is unknown)."""

    def __init__(self, node, htlc: bool) -> None:
        self.node, self.htlc = node, htlc
        self.crash_next = True
        self.pending: dict[str, str] = {}        # payment hash -> bolt11
        self.htlcs: set[str] = set()
        self.paid: list[str] = []

    def __getattr__(self, name):
        return getattr(self.node, name)

    async def payment_status(self, payment_hash):
        if payment_hash in self.pending:
            return PaymentStatus("pending", payment_hash=payment_hash)
        return await self.node.payment_status(payment_hash)

    async def htlc_in_flight(self, payment_hash):
        return payment_hash in self.htlcs

    async def pay(self, bolt11, max_fee_msat=None, label=None, retry_for_s=None, amount_msat=None):
        h = decode_invoice(bolt11).payment_hash
        if h in self.pending:
            raise PaymentUnknown("the payment is still in flight")
        if self.crash_next:
            self.crash_next = False
            self.pending[h] = bolt11
            if self.htlc:
                self.htlcs.add(h)
            raise Crash()
        self.paid.append(h)
        return await self.node.pay(bolt11, max_fee_msat=max_fee_msat, label=label)

    async def htlc_settles(self, payment_hash):
        bolt11 = self.pending.pop(payment_hash)
        self.htlcs.discard(payment_hash)
        self.paid.append(payment_hash)
        await self.node.pay(bolt11)


def run(node, path, clock, events=None):
    """A new run of the client (micropay get, or one micropay-fetch)."""
    return L402Client(NodeWallet(node), Budget(), TokenCache(path), clock=clock,
                      on_event=(events.append if events is not None else None))


async def _crashed(sidecar, tmp_path, htlc):
    node = KilledLightningd(sidecar.payer, htlc)
    clock = FakeClock(time.time())
    path = tmp_path / "client.json"
    with pytest.raises(Crash):
        await run(node, path, clock).get(sidecar.url + "/api/fortune/1")
    [(h, intent)] = TokenCache(path).state.spends.items()
    assert intent.status == "paying" and h in node.pending
    return node, clock, path, h


async def test_a_payment_recorded_and_never_sent_is_released_after_the_grace(sidecar, tmp_path):
    node, clock, path, dead = await _crashed(sidecar, tmp_path, htlc=False)
    balance = sidecar.payer.balance_msat
    with pytest.raises(PaymentUnknown):          # first seen with no HTLC: it may be a part being added
        await run(node, path, clock).get(sidecar.url + "/api/fortune/1")
    ledger = TokenCache(path)
    assert ledger.state.spends[dead].status == "paying" and ledger.state.spends[dead].orphan_since is not None
    assert ledger.spent(None, 0) >= 5000                    # still held against the budgets
    clock.advance(ORPHAN_GRACE_S)                           # a later run, past the grace
    events = []
    try:
        r = await run(node, path, clock, events).get(sidecar.url + "/api/fortune/1")
    except PaymentNeverLeft:
        r = None                                 # the server offered the dead invoice again
    ledger = TokenCache(path)
    assert dead not in ledger.state.spends
    assert dead in ledger.state.dead and any("dead at the node" in e for e in events)
    assert dead not in node.paid and dead in node.pending   # never paid, never paid twice
    if r is not None:                            # a fresh invoice, paid once, and only it is counted
        assert r.status == 200 and r.paid_msat == 5000 and r.payment_hash != dead
        assert sidecar.payer.balance_msat == balance - 5000
        assert ledger.spent(None, 0) == 5000 + r.fee_msat
    else:
        assert sidecar.payer.balance_msat == balance and ledger.spent(None, 0) == 0


async def test_a_dead_invoice_offered_again_is_refused_without_holding_the_budget(sidecar, tmp_path):
    node, clock, path, dead = await _crashed(sidecar, tmp_path, htlc=False)
    with pytest.raises(PaymentUnknown):
        await run(node, path, clock).get(sidecar.url + "/api/fortune/1")
    clock.advance(ORPHAN_GRACE_S)
    c = run(node, path, clock)
    intent = c.cache.state.spends[dead]
    with pytest.raises(PaymentNeverLeft):
        await c._complete(intent)                # what a session deposit or a re-offered invoice meets
    from micropay.client.payer import Spend
    with pytest.raises(PaymentNeverLeft, match="ask for a new one"):
        c._reserve(Spend(dead, intent.host, 5000, 1000, int(clock()), "paying", intent.origin, intent.bolt11,
                         intent.macaroon), clock())
    assert TokenCache(path).spent(None, 0) == 0 and dead not in node.paid


async def test_a_payment_with_its_htlc_out_is_waited_for_and_counted_once(sidecar, tmp_path):
    node, clock, path, h = await _crashed(sidecar, tmp_path, htlc=True)
    balance = sidecar.payer.balance_msat
    for _ in range(3):                           # well past the grace: an HTLC is never called dead
        with pytest.raises(PaymentUnknown):
            await run(node, path, clock).get(sidecar.url + "/api/fortune/1")
        clock.advance(ORPHAN_GRACE_S)
    ledger = TokenCache(path)
    assert ledger.state.spends[h].status == "paying" and ledger.state.spends[h].orphan_since is None
    assert ledger.state.dead == {}
    await node.htlc_settles(h)                   # the HTLC settles after lightningd is back
    r = await run(node, path, clock).get(sidecar.url + "/api/fortune/1")
    assert r.status == 200 and r.paid_msat == 0  # the earlier payment's token, nothing paid again
    assert node.paid == [h] and sidecar.payer.balance_msat == balance - 5000
    assert [(s.status, s.amount_msat) for s in TokenCache(path).state.spends.values()] == [("paid", 5000)]
