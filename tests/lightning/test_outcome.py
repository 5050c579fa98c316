"""The one settle-from-the-node's-record rule (micropay.lightning.outcome), on a fake
node with lightningd's records: by payment hash or by label, and the HTLCs its
channels carry."""
import pytest

from micropay.lightning.base import Payment, PaymentStatus
from micropay.lightning.outcome import ORPHAN_DETAIL, ORPHAN_GRACE_S, OrphanWatch, Outcome, settle_payment

H = "ab" * 32


class Node:
    def __init__(self) -> None:
        self.by_hash: dict[str, PaymentStatus] = {}
        self.by_label: dict[str, PaymentStatus] = {}
        self.htlcs: set[str] = set()
        self.label_lookups: list[tuple[str, int]] = []

    async def payment_status(self, payment_hash):
        return self.by_hash.get(payment_hash)

    async def lookup_payment(self, label, start):
        self.label_lookups.append((label, start))
        return self.by_label.get(label)

    async def htlc_in_flight(self, payment_hash):
        return payment_hash in self.htlcs


async def test_each_record_state():
    node = Node()
    assert (await settle_payment(node, payment_hash=H, orphan_since=None, now=0)).outcome is Outcome.NOT_SENT
    node.by_hash[H] = PaymentStatus("failed")
    s = await settle_payment(node, payment_hash=H, orphan_since=None, now=0)
    assert s.outcome is Outcome.FAILED and not s.orphaned and s.final
    p = Payment(H, "11" * 32, 5000, 3)
    node.by_hash[H] = PaymentStatus("complete", p)
    s = await settle_payment(node, payment_hash=H, orphan_since=None, now=0)
    assert s.outcome is Outcome.SUCCEEDED and s.payment == p and s.payment_hash == H
    node.by_hash[H] = PaymentStatus("pending")
    node.htlcs.add(H)
    s = await settle_payment(node, payment_hash=H, orphan_since=-10 * ORPHAN_GRACE_S, now=0)
    assert s.outcome is Outcome.IN_FLIGHT and s.orphan_since is None and not s.final   # an HTLC: never dead


async def test_pending_with_no_htlc_is_dead_only_once_seen_so_for_the_grace():
    node = Node()
    node.by_hash[H] = PaymentStatus("pending")
    first = await settle_payment(node, payment_hash=H, orphan_since=None, now=100)
    assert first.outcome is Outcome.IN_FLIGHT and first.orphan_since == 100
    within = await settle_payment(node, payment_hash=H, orphan_since=first.orphan_since,
                                  now=100 + ORPHAN_GRACE_S - 0.5)
    assert within.outcome is Outcome.IN_FLIGHT and within.orphan_since == 100
    dead = await settle_payment(node, payment_hash=H, orphan_since=100, now=100 + ORPHAN_GRACE_S)
    assert dead.outcome is Outcome.FAILED and dead.orphaned and dead.detail == ORPHAN_DETAIL
    short = await settle_payment(node, payment_hash=H, orphan_since=100, now=105, grace_s=5)
    assert short.orphaned                                   # the grace is the caller's to choose


async def test_by_label_from_where_the_records_stood():
    node = Node()
    node.by_label["refund-1"] = PaymentStatus("pending", payment_hash=H)
    node.htlcs.add(H)
    s = await settle_payment(node, label="refund-1", sendpays_start=42, orphan_since=None, now=0)
    assert s.outcome is Outcome.IN_FLIGHT and s.payment_hash == H and node.label_lookups == [("refund-1", 42)]
    node.htlcs.clear()
    s = await settle_payment(node, label="refund-1", sendpays_start=42, orphan_since=0, now=ORPHAN_GRACE_S)
    assert s.orphaned and s.payment_hash == H
    with pytest.raises(ValueError):
        await settle_payment(node, label="x", payment_hash=H, orphan_since=None, now=0)
    with pytest.raises(ValueError):
        await settle_payment(node, orphan_since=None, now=0)


async def test_orphan_watch_remembers_since_when_and_forgets_on_an_htlc():
    node = Node()
    node.by_hash[H] = PaymentStatus("pending")
    w = OrphanWatch(node)
    assert (await w.settle(payment_hash=H, now=0)).outcome is Outcome.IN_FLIGHT
    node.htlcs.add(H)
    assert (await w.settle(payment_hash=H, now=30)).outcome is Outcome.IN_FLIGHT   # the count starts again
    node.htlcs.clear()
    assert (await w.settle(payment_hash=H, now=ORPHAN_GRACE_S + 1)).outcome is Outcome.IN_FLIGHT
    assert (await w.settle(payment_hash=H, now=ORPHAN_GRACE_S + 30)).outcome is Outcome.IN_FLIGHT
    assert (await w.settle(payment_hash=H, now=2 * ORPHAN_GRACE_S + 1)).orphaned
    other = OrphanWatch(node)                                # another process: one look is not enough
    assert (await other.settle(payment_hash=H, now=10 * ORPHAN_GRACE_S)).outcome is Outcome.IN_FLIGHT


async def test_orphan_watch_does_not_keep_payments_nobody_asks_about():
    node = Node()
    node.by_hash[H] = PaymentStatus("pending")
    w = OrphanWatch(node)
    await w.settle(payment_hash=H, now=0)
    node.by_hash["cd" * 32] = PaymentStatus("pending")
    await w.settle(payment_hash="cd" * 32, now=11 * ORPHAN_GRACE_S)
    assert list(w._since) == ["hash:" + "cd" * 32]
