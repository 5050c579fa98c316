"""Payouts "crash" at every boundary and a new process resumes them: nothing is paid
twice, nothing paid is forgotten or recorded as failed, and caps hold.

Boundaries: before the reservation is written; after it and before the payment is
sent; after the node has the payment (pending with its HTLC out, pending with no HTLC
behind it, or complete) and before its result came back; after the result and before
it is recorded. The node is a fake behind the Node port that keeps, like lightningd,
its own record of every payment by hash and the HTLCs its channels carry.
"""
import asyncio
import hashlib
import os

import pytest

from micropay.core.errors import PaymentFailed
from micropay.games.config import PayoutCaps
from micropay.games.payouts import Payouts
from micropay.games.repository import FINISH_PAYOUT, PayoutRepository
from micropay.lightning.base import DecodedInvoice, Payment, PaymentStatus


class Crash(BaseException):
    """A process dying at this point: nothing after it runs, no handler sees it."""


class FakeNode:
    """Pays invoices 'lnfake<amount>x<n>' (shaped like BOLT11 text, as the API asks). `record` is the node's own record by payment hash."""

    network = "regtest"

    def __init__(self) -> None:
        self.record: dict[str, PaymentStatus] = {}
        self.sent: dict[str, int] = {}            # payment hash -> times money actually moved
        self.htlcs: set[str] = set()              # payment hashes with an HTLC in a channel
        self.crash_in_pay: str | None = None      # "before", "pending", "pending_no_htlc", "after"
        self.refuse = False                       # channels down: every attempt fails at once
        self.ready = True

    def invoice(self, amount: int) -> str:
        return f"lnfake{amount}x{os.urandom(4).hex()}"

    @staticmethod
    def hash_of(invoice: str) -> str:
        return hashlib.sha256(invoice.encode()).hexdigest()

    async def decode(self, bolt11: str) -> DecodedInvoice:
        amount = int(bolt11[6:].split("x")[0])
        return DecodedInvoice(self.hash_of(bolt11), amount, "02" * 33, 0, 2**40, "", "bcrt")

    async def payment_status(self, payment_hash: str) -> PaymentStatus | None:
        return self.record.get(payment_hash)

    async def htlc_in_flight(self, payment_hash: str) -> bool:
        return payment_hash in self.htlcs

    async def wait_until_ready(self, timeout_s: float) -> bool:
        return self.ready

    def complete(self, invoice: str) -> Payment:
        h = self.hash_of(invoice)
        p = Payment(h, "11" * 32, int(invoice[6:].split("x")[0]), 7)
        if self.record.get(h, PaymentStatus("failed")).state != "complete":
            self.sent[h] = self.sent.get(h, 0) + 1
        self.record[h] = PaymentStatus("complete", p)
        self.htlcs.discard(h)
        return p

    async def pay(self, bolt11: str, max_fee_msat=None, label=None, subject="") -> Payment:
        h = self.hash_of(bolt11)
        if self.record.get(h, PaymentStatus("failed")).state in ("pending", "complete"):
            raise PaymentFailed("already paying or paid")
        if self.refuse:
            self.record[h] = PaymentStatus("failed")
            raise PaymentFailed("All 1 channels to the source are disabled")
        mode, self.crash_in_pay = self.crash_in_pay, None
        if mode == "before":
            raise Crash()
        if mode == "pending":                     # the HTLC is out; lightningd dies
            self.record[h] = PaymentStatus("pending")
            self.htlcs.add(h)
            raise Crash()
        if mode == "pending_no_htlc":             # recorded, killed before the HTLC was saved
            self.record[h] = PaymentStatus("pending")
            raise Crash()
        p = self.complete(bolt11)
        if mode == "after":
            raise Crash()
        return p


CAPS = PayoutCaps(per_player_day_msat=10_000, per_day_msat=50_000, max_fee_msat=100)


@pytest.fixture
def node():
    return FakeNode()


def process(store, node, caps=CAPS, clock=None):
    """A new process: a fresh Payouts over the same store and node."""
    return Payouts(caps, store, node, clock=clock or (lambda: 1_800_000_000.0))


async def status_of(store, pid):
    return (await PayoutRepository(store).by_id(pid)).status


async def only_payout(store):
    rows = await store.query("SELECT id FROM micropay_payouts")
    assert len(rows) == 1
    return rows[0][0]


async def test_crash_before_the_reservation_is_written(store, node):
    inv = node.invoice(3000)
    body = {"player_id": "alice", "destination": inv, "idempotency_key": "k1"}
    real = store.transaction

    async def dies(steps):
        raise Crash()
    store.transaction = dies
    with pytest.raises(Crash):
        await process(store, node).create(body)
    store.transaction = real
    assert await store.query("SELECT id FROM micropay_payouts") == [] and node.sent == {}
    p, created = await process(store, node).create(body)        # the caller retries
    assert created and p["status"] == "paid" and node.sent == {node.hash_of(inv): 1}


@pytest.mark.parametrize("boundary", ["before", "pending", "after", "recording"])
async def test_crash_mid_payout_then_resume(store, node, boundary):
    inv = node.invoice(3000)
    body = {"player_id": "alice", "destination": inv, "idempotency_key": "k1"}
    first = process(store, node)
    if boundary == "recording":                 # the result came back; the store write dies
        real = store.transaction

        async def dies(steps):
            if steps[0].sql == FINISH_PAYOUT:
                raise Crash()
            return await real(steps)
        store.transaction = dies
    else:
        node.crash_in_pay = boundary
    with pytest.raises(Crash):
        await first.create(body)
    if boundary == "recording":
        store.transaction = real
    pid = await only_payout(store)
    assert await status_of(store, pid) == "sending"
    # a restart: the node is back, but its peers are not yet and every new attempt fails
    later = process(store, node, clock=lambda: 1_800_000_000.0 + 60)   # the creator's lease ran out
    node.refuse = True
    await later.resume_sending(ready_timeout_s=0)
    h = node.hash_of(inv)
    if boundary == "before":
        # never sent, and the retry was refused: failed, with nothing paid
        assert await status_of(store, pid) == "failed" and node.sent == {}
        return
    if boundary == "pending":
        # still out at the node: neither paid twice nor called failed; it keeps counting against the caps
        assert await status_of(store, pid) == "sending" and node.sent == {}
        used, _ = await PayoutRepository(store).totals("2027-01-15", "alice")
        assert used == 3000
        node.complete(inv)                       # the HTLC settles
        await process(store, node, clock=lambda: 1_800_000_000.0 + 120).resume_sending(ready_timeout_s=0)
    assert await status_of(store, pid) == "paid" and node.sent == {h: 1}
    again, created = await process(store, node).create(body)    # the game server retries: same payout
    assert not created and again["status"] == "paid" and node.sent == {h: 1}


async def test_a_payout_that_never_left_is_paid_once_on_resume(store, node):
    inv = node.invoice(2000)
    node.crash_in_pay = "before"
    with pytest.raises(Crash):
        await process(store, node).create({"player_id": "bob", "destination": inv, "idempotency_key": "b"})
    resumer = process(store, node, caps=None, clock=lambda: 1_800_000_000.0 + 60)   # payouts now disabled
    assert await resumer.resume_sending(ready_timeout_s=0) == 1
    pid = await only_payout(store)
    assert await status_of(store, pid) == "paid" and node.sent == {node.hash_of(inv): 1}


async def test_resume_keeps_the_fee_cap_it_was_created_under(store, node):
    caps_seen = []
    real_pay = node.pay

    async def pay(bolt11, max_fee_msat=None, label=None, subject=""):
        caps_seen.append(max_fee_msat)
        return await real_pay(bolt11, max_fee_msat, label)
    node.pay = pay
    node.crash_in_pay = "before"
    with pytest.raises(Crash):
        await process(store, node).create({"player_id": "c", "destination": node.invoice(100),
                                           "idempotency_key": "c"})
    await process(store, node, caps=PayoutCaps(10_000, 50_000, 99_999),
                  clock=lambda: 1_800_000_000.0 + 60).resume_sending(ready_timeout_s=0)
    assert caps_seen == [100, 100]


async def test_two_processes_resuming_together_act_once(store, node):
    inv = node.invoice(1000)
    node.crash_in_pay = "before"
    with pytest.raises(Crash):
        await process(store, node).create({"player_id": "d", "destination": inv, "idempotency_key": "d"})
    calls = []
    real_pay = node.pay

    async def slow_pay(bolt11, max_fee_msat=None, label=None, subject=""):
        calls.append(bolt11)
        await asyncio.sleep(0.05)
        return await real_pay(bolt11, max_fee_msat, label)
    node.pay = slow_pay
    clock = lambda: 1_800_000_000.0 + 200  # noqa: E731
    done = await asyncio.gather(*(process(store, node, clock=clock).resume_sending(ready_timeout_s=0)
                                  for _ in range(4)))
    assert sum(done) == 1 and calls == [inv] and node.sent == {node.hash_of(inv): 1}


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def _crash_with(store, node, mode, amount=3000, player="alice", key="k1"):
    inv = node.invoice(amount)
    node.crash_in_pay = mode
    with pytest.raises(Crash):
        await process(store, node).create({"player_id": player, "destination": inv, "idempotency_key": key})
    return inv, await only_payout(store)


async def test_a_pending_payment_with_no_htlc_is_failed_after_the_grace_and_gives_the_caps_back(store, node):
    """lightningd killed between recording the payment and saving its HTLC: the record
    stays pending for ever and nothing can complete it (issue 17, section 7)."""
    from micropay.games.payouts import utc_day
    from micropay.lightning.outcome import ORPHAN_GRACE_S
    inv, pid = await _crash_with(store, node, "pending_no_htlc")
    repo, day = PayoutRepository(store), utc_day(1_800_000_000)
    clock = Clock(1_800_000_000.0 + 60)                     # the creator's lease ran out
    resumer = process(store, node, clock=clock)
    assert await resumer.resume_sending(ready_timeout_s=0) == 1
    assert await status_of(store, pid) == "sending"         # first seen so: it may be a part being added
    assert (await repo.totals(day, "alice"))[0] == 3000
    # a new process starts the grace again: one look is never enough
    clock.t += ORPHAN_GRACE_S + 1
    await process(store, node, clock=clock).resume_sending(ready_timeout_s=0)
    assert await status_of(store, pid) == "sending"
    clock.t += 31                                           # past the lease that look took
    await resumer.resume_sending(ready_timeout_s=0)         # seen so for longer than the grace
    p = await resumer.get(pid)
    assert p["status"] == "failed" and "no HTLC" in p["error"]
    assert node.sent == {} and node.record[node.hash_of(inv)].state == "pending"
    assert await repo.totals(day, "alice") == (0, 0)        # the caps are given back
    big, created = await resumer.create({"player_id": "alice", "destination": node.invoice(10_000),
                                         "idempotency_key": "k2"})
    assert created and big["status"] == "paid"              # the whole player cap is usable again
    again, created = await resumer.create({"player_id": "alice", "destination": inv, "idempotency_key": "k1"})
    assert not created and again["status"] == "failed" and node.sent.get(node.hash_of(inv)) is None


async def test_a_pending_payment_with_its_htlc_out_stays_sending_however_long(store, node):
    from micropay.games.payouts import utc_day
    from micropay.lightning.outcome import ORPHAN_GRACE_S
    inv, pid = await _crash_with(store, node, "pending")
    clock = Clock(1_800_000_000.0 + 60)
    resumer = process(store, node, clock=clock)
    for _ in range(4):                                      # well past the grace, lease after lease
        await resumer.resume_sending(ready_timeout_s=0)
        clock.t += ORPHAN_GRACE_S
    assert await status_of(store, pid) == "sending" and node.sent == {}
    assert (await PayoutRepository(store).totals(utc_day(1_800_000_000), "alice"))[0] == 3000
    node.complete(inv)                                      # the HTLC settles, hours later perhaps
    await resumer.resume_sending(ready_timeout_s=0)
    assert await status_of(store, pid) == "paid" and node.sent == {node.hash_of(inv): 1}


async def test_an_htlc_seen_in_between_starts_the_grace_again(store, node):
    from micropay.lightning.outcome import ORPHAN_GRACE_S
    inv, pid = await _crash_with(store, node, "pending_no_htlc")
    h = node.hash_of(inv)
    clock = Clock(1_800_000_000.0 + 60)
    resumer = process(store, node, clock=clock)
    await resumer.resume_sending(ready_timeout_s=0)         # no HTLC: the grace starts
    clock.t += 31
    node.htlcs.add(h)                                       # an HTLC after all (a part being added)
    await resumer.resume_sending(ready_timeout_s=0)
    node.htlcs.discard(h)
    clock.t += ORPHAN_GRACE_S - 1                           # the grace since the first look is over...
    await resumer.resume_sending(ready_timeout_s=0)
    assert await status_of(store, pid) == "sending"         # ...but not since the HTLC went
    clock.t += ORPHAN_GRACE_S
    await resumer.resume_sending(ready_timeout_s=0)
    assert await status_of(store, pid) == "failed" and node.sent == {}
