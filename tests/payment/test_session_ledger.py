"""The session ledger (micropay/payment/sessions.py) on SQLite and PostgreSQL with sandbox nodes: leases
never serve more than was paid and give back what they did not serve, a close refunds
exactly the rest, and a close interrupted at any step is finished from the node's
record without paying twice."""
import asyncio
import hashlib
import os

import pytest

from micropay.core.errors import PaymentSessionClosed
from micropay.lightning.sandbox import SandboxNetwork
from micropay.payment.scheme import SessionAction
from micropay.payment.sessions import RESUME_AFTER_S, SessionLedger, refund_label
from micropay.store.sessions import RefundStatus, SessionRepository, SessionStatus

from ..conftest import FakeClock

UNIT = 1000


@pytest.fixture
async def world(store):
    clock = FakeClock()
    net = SandboxNetwork(clock)
    merchant, payer = net.add_node("merchant", 10**10), net.add_node("payer", 10**10)
    ledger = SessionLedger(SessionRepository(store), merchant, clock=clock, lease_s=0.2)
    return ledger, merchant, payer, clock


async def open_session(ledger, payer, units=10, return_invoice=None):
    preimage = os.urandom(32)
    sid = hashlib.sha256(preimage).hexdigest()
    ret = return_invoice or (await payer.create_invoice(None, f"ret-{sid[:8]}", "refund", 86400)).bolt11
    deposit = (await ledger.node.create_invoice(units * UNIT, f"dep-{sid[:8]}", "deposit", 600)).bolt11
    act = SessionAction("open", f"ch-{sid[:8]}", sid, "GET /x", UNIT, units * UNIT, os.urandom(32).hex(), ret,
                        deposit)
    await ledger.open(act, int(ledger.clock()))
    return sid


async def test_a_busy_session_takes_bigger_leases_and_a_close_refunds_exactly_the_unserved(world):
    ledger, merchant, payer, clock = world
    sid = await open_session(ledger, payer, units=100)
    served = 0
    for _ in range(37):
        assert await ledger.spend(sid, UNIT)
        served += 1
    rec = await ledger.repo.get(sid)
    assert rec.spent_msat > served * UNIT            # a lease reserved ahead: fewer store writes
    assert ledger._leases[sid].size > 1
    before = payer.balance_msat
    result = await ledger.close(sid)
    assert result.refund_msat == (100 - served) * UNIT and result.refund_status == RefundStatus.SUCCEEDED
    assert payer.balance_msat - before == (100 - served) * UNIT
    assert not await ledger.spend(sid, UNIT)


async def test_units_never_outrun_the_deposit_under_concurrency(world):
    ledger, merchant, payer, clock = world
    sid = await open_session(ledger, payer, units=25)

    async def one():
        return await ledger.spend(sid, UNIT)
    results = await asyncio.gather(*(one() for _ in range(200)))
    assert sum(results) == 25
    rec = await ledger.repo.get(sid)
    assert rec.spent_msat == rec.deposit_msat == 25 * UNIT


async def test_two_ledgers_on_one_store_serve_exactly_the_deposit(world):
    """Two replicas: bursts may leave units in the other's lease for a moment; after the
    leases run out every unit is served, and never one more."""
    ledger, merchant, payer, clock = world
    other = SessionLedger(ledger.repo, merchant, clock=clock, lease_s=0.2)
    sid = await open_session(ledger, payer, units=60)
    served = 0
    for _ in range(3):
        results = await asyncio.gather(*(lg.spend(sid, UNIT) for lg in (ledger, other) for _ in range(40)))
        served += sum(results)
        assert served <= 60
        await asyncio.sleep(0.25)
        await ledger.flush_leases()
        await other.flush_leases()
    assert served == 60


async def test_a_lease_outliving_a_close_is_given_back_before_the_refund(world):
    ledger, merchant, payer, clock = world
    other = SessionLedger(ledger.repo, merchant, clock=clock, lease_s=0.2)
    sid = await open_session(ledger, payer, units=50)
    for _ in range(10):
        assert await other.spend(sid, UNIT)           # the other replica holds a lease now
    assert (await ledger.repo.get(sid)).spent_msat > 10 * UNIT
    flusher = asyncio.create_task(_flush_every(other, 0.05))
    try:
        result = await ledger.close(sid)
    finally:
        flusher.cancel()
    assert result.refund_msat == 40 * UNIT
    assert not await other.spend(sid, UNIT) or (await ledger.repo.get(sid)).status != SessionStatus.OPEN


async def _flush_every(ledger, s):
    while True:
        await asyncio.sleep(s)
        await ledger.flush_leases()


async def test_a_close_interrupted_before_paying_is_finished_once(world):
    ledger, merchant, payer, clock = world
    sid = await open_session(ledger, payer, units=10)
    assert await ledger.spend(sid, UNIT)
    # the crash: status moved to refunding, the refund fixed, the process gone before paying
    assert await ledger.repo.begin_close(sid, int(clock()))
    assert await ledger.repo.fix_refund(sid) == 9 * UNIT
    restarted = SessionLedger(ledger.repo, merchant, clock=clock, lease_s=0.2)
    assert await restarted.resume() == 0                 # too recent: its closer may still be at work
    clock.advance(RESUME_AFTER_S + 1)
    before = payer.balance_msat
    assert await restarted.resume() == 1
    assert payer.balance_msat - before == 9 * UNIT
    assert await restarted.resume() == 0
    assert payer.balance_msat - before == 9 * UNIT       # never twice
    rec = await ledger.repo.get(sid)
    assert rec.status == SessionStatus.CLOSED and rec.refund_status == RefundStatus.SUCCEEDED


async def test_a_close_interrupted_after_paying_is_not_paid_again(world):
    ledger, merchant, payer, clock = world
    sid = await open_session(ledger, payer, units=10)
    assert await ledger.repo.begin_close(sid, int(clock()))
    refund = await ledger.repo.fix_refund(sid)
    rec = await ledger.repo.get(sid)
    # the attempt as _refund makes it: its start recorded, paid under its label, then the crash
    await ledger.repo.start_refund(sid, await merchant.sendpays_position())
    await merchant.pay(rec.return_invoice, amount_msat=refund, label=refund_label(sid))
    before = payer.balance_msat
    clock.advance(RESUME_AFTER_S + 1)
    assert await SessionLedger(ledger.repo, merchant, clock=clock).resume() == 1
    assert payer.balance_msat == before
    assert (await ledger.repo.get(sid)).refund_status == RefundStatus.SUCCEEDED


async def test_a_refund_that_fails_closes_the_session_anyway_and_is_not_retried(world):
    ledger, merchant, payer, clock = world
    stranger = SandboxNetwork(clock).add_node("elsewhere", 0)      # a return invoice nobody can route to
    ret = (await stranger.create_invoice(None, "ret", "refund", 86400)).bolt11
    sid = await open_session(ledger, payer, units=10, return_invoice=ret)
    result = await ledger.close(sid)
    assert result.refund_status == RefundStatus.FAILED and result.refund_msat == 10 * UNIT
    rec = await ledger.repo.get(sid)
    assert rec.status == SessionStatus.CLOSED
    clock.advance(RESUME_AFTER_S + 1)
    assert await ledger.resume() == 0
    with pytest.raises(PaymentSessionClosed):
        await ledger.close(sid)


class _PendingRefundNode:
    """The merchant's node after a kill -9 mid-refund: lightningd recorded the refund's
    payment as pending; `htlc` says whether a channel carries its HTLC. Everything else
    is the sandbox node's."""

    def __init__(self, node, htlc: bool) -> None:
        self._node, self.htlc, self.paid = node, htlc, 0

    def __getattr__(self, name):
        return getattr(self._node, name)

    async def lookup_payment(self, label, start):
        from micropay.lightning.base import PaymentStatus
        return PaymentStatus("pending", payment_hash="ab" * 32) if label.startswith("micropay-refund-") else None

    async def htlc_in_flight(self, payment_hash):
        return self.htlc

    async def pay(self, *a, **kw):
        self.paid += 1
        return await self._node.pay(*a, **kw)


@pytest.mark.parametrize("htlc", [False, True])
async def test_a_refund_left_pending_by_a_crash_is_settled_by_the_one_rule(world, htlc):
    """Pending with no HTLC behind it for the grace: dead, the session closes with the
    refund failed, and nothing is paid again. Pending with its HTLC out: it stays
    refunding, however long, and is never paid a second time."""
    from micropay.lightning.outcome import ORPHAN_GRACE_S
    ledger, merchant, payer, clock = world
    sid = await open_session(ledger, payer, units=10)
    assert await ledger.repo.begin_close(sid, int(clock()))
    assert await ledger.repo.fix_refund(sid) == 10 * UNIT
    await ledger.repo.start_refund(sid, await merchant.sendpays_position())     # the attempt, then the crash
    node = _PendingRefundNode(merchant, htlc)
    restarted = SessionLedger(ledger.repo, node, clock=clock, lease_s=0.2)
    clock.advance(RESUME_AFTER_S + 1)
    before = payer.balance_msat
    assert await restarted.resume() == 0                      # first seen pending: within the grace
    assert (await ledger.repo.get(sid)).status == SessionStatus.REFUNDING
    clock.advance(ORPHAN_GRACE_S + 1)
    assert await restarted.resume() == (0 if htlc else 1)
    rec = await ledger.repo.get(sid)
    if htlc:
        assert rec.status == SessionStatus.REFUNDING and rec.refund_status is None
    else:
        assert rec.status == SessionStatus.CLOSED and rec.refund_status == RefundStatus.FAILED
    assert node.paid == 0 and payer.balance_msat == before


async def test_a_node_lost_during_the_refund_leaves_it_to_the_nodes_record_not_a_guess(world):
    """The connection to lightningd dies while the refund is out (a kill -9): the close
    does not call it failed; the node's record settles it once it is back, paid once."""
    from micropay.core.errors import NodeError, PaymentUnknown
    ledger, merchant, payer, clock = world

    class DiesAfterPaying:
        def __init__(self, node):
            self._node = node

        def __getattr__(self, name):
            return getattr(self._node, name)

        async def pay(self, *a, **kw):
            await self._node.pay(*a, **kw)               # it went out...
            raise NodeError("connection to lightningd closed")      # ...and the answer was lost

    sid = await open_session(ledger, payer, units=10)
    before = payer.balance_msat
    dying = SessionLedger(ledger.repo, DiesAfterPaying(merchant), clock=clock, lease_s=0.2)
    with pytest.raises(PaymentUnknown):
        await dying.close(sid)
    assert (await ledger.repo.get(sid)).status == SessionStatus.REFUNDING
    clock.advance(RESUME_AFTER_S + 1)
    assert await SessionLedger(ledger.repo, merchant, clock=clock).resume() == 1
    rec = await ledger.repo.get(sid)
    assert rec.status == SessionStatus.CLOSED and rec.refund_status == RefundStatus.SUCCEEDED
    assert payer.balance_msat - before == 10 * UNIT                  # once
