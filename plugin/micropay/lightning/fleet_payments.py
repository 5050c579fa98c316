"""Fleet mode's paying side for sidecars (issue 20): a payment the web tier wants made
(a session refund, a game payout, a tip share) goes into the store's payment queue,
keyed by the caller's label (idempotent), and waits for the node agent that executes it
under its operator's caps (plugin/agent.py). The node's record of it is read back from
the queue (`status_by_label`, `status_by_hash`), so the settle rule every payer shares
works unchanged. FleetBackend (fleet.py) answers the Node port's paying calls with this.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from ..core.errors import PaymentFailed, PaymentUnknown
from ..store.fleet import QUEUED_CHANNEL, FleetRepository, QueuedPayment
from .base import Payment, PaymentStatus
from .bolt11codec import decode_invoice

KINDS = (("micropay-refund-", "refund"), ("micropay-payout-", "payout"), ("micropay-tipshare-", "tip share"))


class FleetPayments:
    """The payment queue, seen from a sidecar. `paid` is set when an agent reports an
    outcome (FleetBackend listens for it); without that, waiters poll."""

    def __init__(self, repo: FleetRepository, *, poll_s: float, clock: Callable[[], float]) -> None:
        self.repo, self.poll_s, self.clock = repo, poll_s, clock
        self.paid = asyncio.Event()

    async def pay(self, bolt11: str, max_fee_msat: int | None, label: str | None, retry_for_s: int | None,
                  amount_msat: int | None, subject: str) -> Payment:
        decoded = decode_invoice(bolt11)
        if decoded.amount_msat is None and amount_msat is None:
            raise PaymentFailed("an amountless invoice needs the amount to pay")
        if decoded.amount_msat is not None and amount_msat is not None:
            raise PaymentFailed("the invoice names its amount; no other amount can be paid on it")
        amount = decoded.amount_msat if decoded.amount_msat is not None else amount_msat
        assert amount is not None
        return await self._queue_and_wait(QueuedPayment(
            label or f"micropay-hash-{decoded.payment_hash}", _kind(label), subject, bolt11, None,
            decoded.payment_hash,
            amount, decoded.amount_msat is None, 5000 if max_fee_msat is None else max_fee_msat), retry_for_s)

    async def keysend(self, destination: str, amount_msat: int, *, label: str | None,
                      max_fee_msat: int | None, extratlvs: dict[str, str] | None,
                      retry_for_s: int | None, subject: str) -> Payment:
        if label is None:
            raise PaymentFailed("fleet mode: a keysend through the queue needs a label (its idempotency key)")
        if extratlvs:
            raise PaymentFailed("fleet mode: the payment queue carries no TLV records")
        return await self._queue_and_wait(QueuedPayment(label, _kind(label), subject, None, destination, None,
                                                        amount_msat, False,
                                                        5000 if max_fee_msat is None else max_fee_msat),
                                          retry_for_s)

    async def _queue_and_wait(self, p: QueuedPayment, retry_for_s: int | None) -> Payment:
        queued = await self.repo.enqueue(p, int(self.clock() * 1000))
        if (queued.bolt11, queued.destination, queued.amount_msat) != (p.bolt11, p.destination, p.amount_msat):
            raise PaymentFailed(f"label {p.key!r} already names another queued payment")
        await self.repo.store.notify(QUEUED_CHANNEL)
        deadline = time.monotonic() + (60 if retry_for_s is None else retry_for_s) + 5
        while True:
            found = await self.repo.payment(p.key)
            assert found is not None
            if found.state == "paid":
                return _paid(found)
            if found.state == "failed":
                raise PaymentFailed(f"the node agent did not pay it: {found.error}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise PaymentUnknown(f"queued payment {p.key} is {found.state}; look it up by its label later")
            self.paid.clear()
            try:
                await asyncio.wait_for(self.paid.wait(), min(left, self.poll_s * 4))
            except asyncio.TimeoutError:
                pass

    async def status_by_hash(self, payment_hash: str) -> PaymentStatus | None:
        found = await self.repo.payment_by_hash(payment_hash)
        return None if found is None else _status(found)

    async def status_by_label(self, label: str) -> PaymentStatus | None:
        found = await self.repo.payment(label)
        return None if found is None else _status(found)

    async def in_flight(self, payment_hash: str) -> bool:
        """A queued payment not settled yet counts as carried: its agent settles it from
        its node's record, so nobody here may call it dead."""
        found = await self.repo.payment_by_hash(payment_hash)
        return found is not None and found.state not in ("paid", "failed")


def _kind(label: str | None) -> str:
    for prefix, kind in KINDS:
        if label and label.startswith(prefix):
            return kind
    return "other"


def _paid(p: QueuedPayment) -> Payment:
    return Payment(p.payment_hash or "", p.preimage or "", p.amount_msat, p.fee_msat or 0)


def _status(p: QueuedPayment) -> PaymentStatus:
    if p.state == "paid":
        return PaymentStatus("complete", _paid(p), p.payment_hash or "")
    if p.state == "failed":
        return PaymentStatus("failed", None, p.payment_hash or "")
    return PaymentStatus("pending", None, p.payment_hash or "")
