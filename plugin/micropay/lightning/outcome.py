"""The one rule that settles a payment from the node's own record of it.

Everything that pays (stream payments, game payouts, session refunds, the client's
payments from a node) asks this module, never its own copy of the rule, what became of
a payment whose result it did not see (a crash, a lost connection, a restart):

    complete                       -> SUCCEEDED, with the Payment (preimage, fee);
    failed                         -> FAILED: nothing of it is out;
    pending, an HTLC in a channel  -> IN_FLIGHT: it may still complete or fail; wait;
    pending, no HTLC behind it     -> IN_FLIGHT until it has been seen so for
                                      `grace_s` (ORPHAN_GRACE_S), then FAILED with
                                      `orphaned` set: it is dead, the money never left;
    no record                      -> NOT_SENT: the attempt never reached the node.

Why a pending record can be dead: lightningd writes a payment part's record before it
saves the part's HTLC, so a lightningd killed in between restarts with a `pending`
record that no channel carries (seen with v26.06.6 in the kill campaigns). Nothing
can complete it: after a restart lightningd only re-sends HTLCs its channels saved,
and the xpay that made the part died with the old lightningd. It never marks the
record failed either, and it refuses to pay the same payment hash again while it is
pending. So calling it failed pays nothing twice: nothing of it left, the same hash
cannot be paid by this node again, and a retry is a new payment (a new invoice or a
new label), which its owner already counts as such.

Why the grace: a live lightningd also shows a pending part with no HTLC for the
moment between writing the record and adding the HTLC, and xpay adds parts while it
retries. So the rule wants the same record seen pending with no HTLC at two moments
`grace_s` apart (an HTLC seen in between starts the count again): `orphan_since` is
when it was first seen so, and the caller keeps it (in memory, as the stream runner
and the payout loop do, or persisted, as the client does in its ledger) and passes it
back on the next look. A caller that knows no part can be made any more (lightningd
restarted since the attempt, and nothing retried it since) may pass the attempt's
start as `orphan_since`. The grace must outlast the longest retry window of the
payments it judges (xpay's retry_for: 30 s for streams, 60 s by default).

What NOT_SENT allows: paying the same payment hash again at once (lightningd pays a
hash at most once). Paying it under a new hash or label (a keysend, a new invoice)
also needs no xpay of the running lightningd to be still working on the old attempt
before writing its record: the stream runner waits RECONCILE_GRACE_S for that unless
lightningd started after the attempt.

Limit: an HTLC is looked for in lightningd's channels (listpeerchannels, every state,
on-chain ones included while the channel is listed). A channel lightningd has
forgotten (long after it closed) no longer shows its HTLCs; a payment still pending
then is far older than any grace.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .base import Node, Payment

__all__ = ["ORPHAN_DETAIL", "ORPHAN_GRACE_S", "OrphanWatch", "Outcome", "Settled", "settle_payment"]

ORPHAN_GRACE_S = 60                # seconds
ORPHAN_DETAIL = "lightningd recorded the payment but no HTLC carries it (it cannot complete)"


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"     # the node completed it: `payment` has the preimage and fee
    FAILED = "failed"           # nothing of it is out (recorded failed, or dead: `orphaned`)
    IN_FLIGHT = "in_flight"     # pending: wait and look again
    NOT_SENT = "not_sent"       # the node has no record of it: it never reached the node


@dataclass(frozen=True, slots=True)
class Settled:
    outcome: Outcome
    payment_hash: str = ""              # "" when the node has no record and none was given
    payment: Payment | None = None      # when SUCCEEDED
    orphaned: bool = False              # FAILED because it was dead (pending, no HTLC, past the grace)
    orphan_since: float | None = None   # IN_FLIGHT with no HTLC: when first seen so (keep it, pass it back)
    detail: str = ""

    @property
    def final(self) -> bool:
        return self.outcome in (Outcome.SUCCEEDED, Outcome.FAILED)


async def settle_payment(node: Node, *, payment_hash: str | None = None, label: str | None = None,
                         sendpays_start: int = 0, orphan_since: float | None, now: float,
                         grace_s: float = ORPHAN_GRACE_S) -> Settled:
    """What became of one of our payments, by the rule above. Give the payment hash (any
    payment of ours to it counts: payouts, the client), or the label it was made under
    with `sendpays_start`, where the node's records stood before it (only that attempt
    counts: stream payments, refunds). `orphan_since`: what the last look returned in
    Settled.orphan_since (None the first time). Reads the node; changes nothing."""
    if (payment_hash is None) == (label is None):
        raise ValueError("give the payment's hash or its label, not both")
    if label is not None:
        found = await node.lookup_payment(label, sendpays_start)
    else:
        assert payment_hash is not None
        found = await node.payment_status(payment_hash)
    h = (found.payment_hash if found is not None and found.payment_hash else None) or payment_hash or ""
    if found is None:
        return Settled(Outcome.NOT_SENT, h, detail="the node has no record of the payment")
    if found.state == "complete":
        return Settled(Outcome.SUCCEEDED, h, found.payment)
    if found.state != "pending":
        return Settled(Outcome.FAILED, h, detail="the node recorded the payment as failed")
    if h and await node.htlc_in_flight(h):
        return Settled(Outcome.IN_FLIGHT, h, detail="an HTLC of the payment is in a channel")
    since = now if orphan_since is None else min(orphan_since, now)
    if now - since >= grace_s:
        return Settled(Outcome.FAILED, h, orphaned=True, detail=ORPHAN_DETAIL)
    return Settled(Outcome.IN_FLIGHT, h, orphan_since=since,
                   detail="recorded pending with no HTLC behind it yet")


class OrphanWatch:
    """settle_payment with `orphan_since` kept in memory, per payment (by label or hash),
    for a loop that looks at the same payments again and again in one process. A new
    process starts the grace again: a dead payment is settled at most one grace later."""

    def __init__(self, node: Node, *, grace_s: float = ORPHAN_GRACE_S) -> None:
        self.node, self.grace_s = node, grace_s
        self._since: dict[str, float] = {}

    async def settle(self, *, now: float, payment_hash: str | None = None, label: str | None = None,
                     sendpays_start: int = 0) -> Settled:
        key = f"label:{label}" if label is not None else f"hash:{payment_hash}"
        settled = await settle_payment(self.node, payment_hash=payment_hash, label=label,
                                       sendpays_start=sendpays_start, orphan_since=self._since.get(key),
                                       now=now, grace_s=self.grace_s)
        if settled.orphan_since is None:
            self._since.pop(key, None)
        else:
            self._since[key] = settled.orphan_since
        # payments nobody asks about any more (settled elsewhere) are not kept for ever
        for stale in [k for k, t in self._since.items() if now - t > 10 * self.grace_s]:
            del self._since[stale]
        return settled
