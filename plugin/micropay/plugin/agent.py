"""The node agent of fleet mode (issue 20): on each Core Lightning node, it keeps the
shared store's invoice pools of its node filled, so that sidecars holding no node rights
hand out invoices with one claim in the store instead of a call to a node.

Each round: a heartbeat (node id, time); for every (amount, description) that sidecars
have asked for recently, the node's unclaimed invoices that stay payable long enough are
counted and topped up to the asked depth, a bounded number per round; unclaimed invoices
that are about to expire leave the pool first (so no claim can take them any more), then
the node (`delinvoice`). A crash between the two leaves an unpaid invoice on the node
that nobody holds; it simply expires.

No HTTP and no adapter here: the agent takes the Node port and the fleet repository.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, TypeVar

from ..core.errors import MicropayError, PaymentFailed
from ..lightning.base import Node, Payment, RecordStore, Settlement
from ..lightning.bolt11codec import decode_invoice
from ..lightning.outcome import ORPHAN_GRACE_S, OrphanWatch, Outcome
from ..store.fleet import (ANSWERS_CHANNEL, PAID_CHANNEL, SETTLED_CHANNEL, FleetRepository, FleetSettlement,
                           NodeBeat, PooledInvoice, QueuedPayment, Want)
from .spend_ledger import FULL, MAX_ATTEMPTS, SETTLED, SpendLedger

log = logging.getLogger("micropay.agent")

LABEL_PREFIX = "micropay-fleet-"


PAY_LABEL_PREFIX = "micropay-fleet-pay-"
DAY_MS = 86_400_000


T = TypeVar("T")


async def _all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Run them at once and return their results; the first failure cancels the rest and
    is raised as itself (not inside an ExceptionGroup, so that the agent's loop logs what
    went wrong)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [t.result() for t in tasks]


def _utc_day_start_ms(now: float) -> int:
    return int(now // 86_400 * 86_400 * 1000)
# A payment recorded as sending with no outcome on the node is requeued (or a failed
# record believed) only this long after it was sent: xpay retries for 60 s by default.
REQUEUE_GRACE_S = max(ORPHAN_GRACE_S, 60) + 60
# A queued payment whose fee allowance is over a node's fee cap waits this long for a node
# whose cap covers it, then is tried within the cap of the node that leases it (a session
# refund gets one attempt: a node with the room to route it should have it first).
FEE_GRACE_S = 30
# How long finished rows stay in the store (claimed invoices a day past their expiry,
# answered asks a day, the settlement feed a week): pruned a bounded batch per round.
KEEP_INVOICES_S, KEEP_ASKS_S, KEEP_SETTLEMENTS_S = 86_400, 86_400, 7 * 86_400
PRUNE_BATCH = 1000
# Asks answered at once: lightningd answers several `invoice` calls concurrently (bench_fleet
# measures its raw rate with 8 callers); more than that would only queue in lightningd.
ASK_CONCURRENCY = 8
# Pool invoices are made one at a time: refilling is background work, and 8 at once slowed
# payments forwarded through the node past test_never_blocks' margin (regtest,
# test_an_agent_refilling_and_waiting_on_a_payment_holds_up_none_of_its_nodes_payments:
# 0.29 s against 0.27 s allowed), where the asks' clients are waiting as a 402 would.
REFILL_CONCURRENCY = 1


@dataclass(frozen=True)
class AgentSettings:
    min_left_s: int = 120        # an unclaimed invoice with less to live leaves the pool
    want_ttl_s: int = 900        # a pool nobody asked for in this long is no longer refilled
    per_round: int = 200         # invoices created per round at most (the node's invoice rate)
    prune_per_round: int = 200
    # the operator's caps on what the queue may make this node pay (msat; 0: nothing)
    max_payment_msat: int = 0            # one payment
    per_subject_day_msat: int = 0        # one subject (a player) per UTC day
    per_day_msat: int = 0                # everything per UTC day
    max_fee_msat: int = 5000             # the fee any queued payment may cost at most
    lease_ms: int = 30_000               # a leased payment not sent in this long goes back


class FleetAgent:
    def __init__(self, node: Node, repo: FleetRepository, settings: AgentSettings = AgentSettings(), *,
                 clock: Callable[[], float] = time.time, records: RecordStore | None = None) -> None:
        self.node = node
        self.repo = repo
        self.settings = settings
        self.clock = clock
        # with the node's own records, the caps are checked against them; without (tests,
        # the sandbox), against the shared store's payment table
        self.ledger = SpendLedger(records, clock) if records is not None else None
        self._node_id: str | None = None
        self._watch = OrphanWatch(node)
        self._outbound: int | None = None         # spendable msat, as of the last heartbeat
        self._refused = False

    async def node_id(self) -> str:
        if self._node_id is None:
            self._node_id = await self.node.node_id()
        return self._node_id

    async def beat(self) -> None:
        """The heartbeat: this node is up, and what it can receive and send now."""
        liquidity = await self.node.liquidity()
        self._outbound = liquidity.outbound_msat
        await self.repo.heartbeat(NodeBeat(await self.node_id(), self.node.network, int(self.clock() * 1000),
                                            liquidity.inbound_msat, liquidity.outbound_msat))

    async def refill_once(self, limit: int | None = None) -> int:
        """Top every wanted pool of this node up to its depth; returns how many invoices
        were added (at most `limit`, default `per_round`)."""
        node_id = await self.node_id()
        now = self.clock()
        budget = self.settings.per_round if limit is None else limit
        added = 0
        for want in await self.repo.wants(int((now - self.settings.want_ttl_s) * 1000)):
            if budget <= 0:
                break
            if want.expiry_s <= self.settings.min_left_s:
                log.warning("pool %d msat %r: expiry %d s is not above min_left_s %d; not pooled",
                            want.amount_msat, want.description, want.expiry_s, self.settings.min_left_s)
                continue
            ready = await self.repo.ready_count(node_id, want.amount_msat, want.description,
                                                int(now) + self.settings.min_left_s)
            made = await self._make_pooled(node_id, want, min(budget, max(0, want.depth - ready)))
            budget -= made
            added += made
        return added

    async def _make_pooled(self, node_id: str, want: Want, n: int) -> int:
        """Make `n` invoices for one pool, REFILL_CONCURRENCY at a time, each added to the
        pool as soon as it is made. A refusal by the node stops this pool's round (the
        others are still made). Returns how many were added."""
        if n <= 0:
            return 0
        slots, refused, added = asyncio.Semaphore(REFILL_CONCURRENCY), [False], [0]

        async def make() -> None:
            async with slots:
                if refused[0]:
                    return
                label = LABEL_PREFIX + os.urandom(12).hex()
                try:
                    inv = await self.node.create_invoice(want.amount_msat, label, want.description, want.expiry_s)
                except MicropayError as exc:      # this pool cannot be made: the others still are
                    if not refused[0]:
                        log.warning("pool %d msat %r: the node refused the invoice: %s", want.amount_msat,
                                    want.description[:60], exc)
                    refused[0] = True
                    return
                await self.repo.add(PooledInvoice(inv.payment_hash, node_id, label, want.amount_msat,
                                                  want.description, inv.bolt11, inv.expires_at, None),
                                    int(self.clock() * 1000))
                added[0] += 1
        await _all(make() for _ in range(n))
        return added[0]

    async def prune_once(self) -> int:
        """Take unclaimed invoices that are about to expire out of the pool, then off the
        node; returns how many left the pool."""
        node_id = await self.node_id()
        dropped = 0
        now = int(self.clock())
        await self.repo.forget(now - self.settings.want_ttl_s, now - KEEP_INVOICES_S, now - KEEP_ASKS_S,
                               now - KEEP_SETTLEMENTS_S, PRUNE_BATCH)
        for payment_hash, label in await self.repo.stale(node_id, int(self.clock()) + self.settings.min_left_s,
                                                         self.settings.prune_per_round):
            if await self.repo.drop(payment_hash):      # no claim can take it from here on
                dropped += 1
                await self.node.delete_invoice(label)
        return dropped

    async def answer_asks(self, limit: int = 100) -> int:
        """Make the invoices sidecars asked this node for on demand, each bound to the
        asker's label at once, up to ASK_CONCURRENCY at a time (lightningd answers several
        `invoice` calls at once: one at a time, 16 clients asking together waited behind
        each other, 113 ms at the median in bench_fleet). An ask older than a minute is
        left: its asker gave up. The askers are told (NOTIFY) once the batch is answered,
        refusals included, so that none waits out its timeout for a refusal."""
        node_id = await self.node_id()
        asks = await self.repo.open_asks(node_id, int((self.clock() - 60) * 1000), limit)
        if not asks:
            return 0
        slots = asyncio.Semaphore(ASK_CONCURRENCY)

        async def answer(claim_label: str, amount: int | None, description: str, expiry_s: int,
                         hashed: bool) -> bool:
            async with slots:
                label = LABEL_PREFIX + os.urandom(12).hex()
                try:
                    inv = await self.node.create_invoice(amount, label, description, expiry_s,
                                                         hash_description=hashed)
                except Exception as exc:              # noqa: BLE001 - the asker hears it, the batch goes on
                    if not isinstance(exc, MicropayError):
                        log.warning("ask %s: the node call failed: %r", claim_label, exc)
                    await self.repo.answer(claim_label, None, int(self.clock() * 1000),
                                           error=str(exc)[:200] or type(exc).__name__)
                    return False
                await self.repo.answer(claim_label, PooledInvoice(inv.payment_hash, node_id, label,
                                                                  -1 if amount is None else amount, description,
                                                                  inv.bolt11, inv.expires_at, claim_label),
                                       int(self.clock() * 1000))
                return True
        answered = await _all(answer(*ask) for ask in asks)
        await self.repo.store.notify(ANSWERS_CHANNEL)
        return sum(answered)

    async def record(self, s: Settlement) -> None:
        """One settlement of the node into the fleet's feed (idempotent), then the cursor."""
        if s.label.startswith(LABEL_PREFIX):
            inv = await self.repo.by_node_label(s.label)
            await self.repo.record_settlement(FleetSettlement(0, s.payment_hash, await self.node_id(),
                                                              inv.claim_label if inv else None, s.amount_msat,
                                                              s.preimage, s.paid_at))
            await self.repo.store.notify(SETTLED_CHANNEL)
        await self.repo.advance_pay_index(await self.node_id(), s.pay_index)

    async def follow_settlements(self) -> None:
        """Record the node's settlements from where the store says this agent got to;
        runs until cancelled."""
        await self.beat()                   # the node's row holds the cursor
        async for s in self.node.settlements(await self.repo.pay_index(await self.node_id())):
            await self.record(s)

    # -- the payment queue ------------------------------------------------------------
    def _fee_cap(self, p: QueuedPayment) -> int:
        """The most this node pays in fees for `p`: the payment's allowance, or the node's
        own fee cap if that is lower (the payment is then tried within the node's cap)."""
        return min(p.max_fee_msat, self.settings.max_fee_msat)

    def _refusal(self, p: QueuedPayment, spent_subject: int, spent_all: int) -> str | None:
        st = self.settings
        most = p.amount_msat + self._fee_cap(p)
        if p.amount_msat > st.max_payment_msat:
            return f"over this node's cap per payment ({st.max_payment_msat} msat)"
        if p.subject and spent_subject + most > st.per_subject_day_msat:
            return f"over this node's cap per {p.kind} subject and UTC day ({st.per_subject_day_msat} msat)"
        if spent_all + most > st.per_day_msat:
            return f"over this node's cap per UTC day ({st.per_day_msat} msat)"
        return None

    async def start_payment(self) -> QueuedPayment | None:
        """Lease the oldest queued payment this node has the outbound liquidity for (with
        the fee it would pay: see _fee_cap) and, within the caps, record that it is being sent (label,
        where the node's records stand) before anything is paid. Returns it in state
        "sending", or None (nothing it can carry, or it was refused and failed). A
        payment no node can carry stays queued for one that can."""
        node_id = await self.node_id()
        st = self.settings
        if st.max_payment_msat <= 0 or st.per_day_msat <= 0:
            return None                       # this node pays nothing from the queue: leave it to others
        now_ms = int(self.clock() * 1000)
        since = _utc_day_start_ms(self.clock())
        spent_all = (await self.ledger.today())[0] if self.ledger else await self.repo.spent(node_id, since)
        if self._outbound is None:
            self._outbound = (await self.node.liquidity()).outbound_msat
        # lease only what this node can carry, may pay under its own per-payment cap and may
        # still pay today, and a payout or tip share only if it has a cap per subject: the
        # rest stays queued for a node that can (caps are each node's own, and another's
        # may be higher), or for tomorrow; a refusal would fail it for good. What no node
        # will ever take waits, and shows in the queue's age gauge. A fee allowance over
        # this node's fee cap is left to a node whose cap covers it for FEE_GRACE_S, then
        # paid within this node's cap.
        carry = min(self._outbound, st.per_day_msat - spent_all)
        if carry <= 0:
            return None
        p = await self.repo.lease(node_id, now_ms, st.lease_ms, carry, st.max_payment_msat, st.max_fee_msat,
                                  subjects=st.per_subject_day_msat > 0, fee_grace_ms=FEE_GRACE_S * 1000)
        if p is None:
            return None
        # the fee this node may pay, fixed now: the caps are checked and reserved on it, and
        # a fee cap raised by setconfig before the payment is sent must not raise it
        p = dataclasses.replace(p, max_fee_msat=self._fee_cap(p))
        if self.ledger is not None:
            spent_all, spent_subject = await self.ledger.today(p.subject)
        else:
            spent_subject = await self.repo.spent(node_id, since, p.subject) if p.subject else 0
        refusal = self._mismatch(p) or self._refusal(p, spent_subject, spent_all)
        if refusal is not None:
            await self._refuse(p, node_id, now_ms, refusal)
            return None
        verdict, paid, paid_label = await self._earlier_attempts(p)
        if verdict == "paid":                 # sent before, and the store put it back in the queue
            await self._finish(dataclasses.replace(p, node_label=paid_label), paid, None)
            self._refused = True
            return None
        if verdict == "wait":                 # an attempt of it may still complete: the lease lapses
            return None
        label = PAY_LABEL_PREFIX + os.urandom(12).hex()
        start = await self.node.sendpays_position()
        if self.ledger is not None:
            reserved = await self.ledger.reserve(p.key, p.subject, p.amount_msat + self._fee_cap(p), label, start)
            if reserved == SETTLED:
                await self._refuse(p, node_id, now_ms, "this node's own records show this payment settled already")
                return None
            if reserved == FULL:
                log.warning("queued %s %s: %d attempts recorded for it on this node; not sent again", p.kind,
                            p.key, MAX_ATTEMPTS)
                return None
        sent_ms = int(self.clock() * 1000)
        if not await self.repo.sending(p.key, node_id, label, start, sent_ms):
            return None                       # the lease ran out and someone else has it
        self._outbound = None                 # what it can carry changes: read again next time
        # the row as leased and checked, not as the store says now: a rewrite between the
        # two must not change what is paid, nor the label it is paid under
        return dataclasses.replace(p, state="sending", node_id=node_id, node_label=label, sendpays_start=start,
                                   sent_ms=sent_ms)

    async def _refuse(self, p: QueuedPayment, node_id: str, now_ms: int, why: str) -> None:
        await self.repo.done(p.key, node_id, "failed", now_ms, error=f"refused: {why}")
        await self.repo.store.notify(PAID_CHANNEL)
        log.warning("queued %s %s refused: %s", p.kind, p.key, why)
        self._refused = True                  # pay_once looks at the queue again at once

    def _mismatch(self, p: QueuedPayment) -> str | None:
        """The invoice itself decides what the node pays: it must say what the queue row
        says (the amount the caps were checked on, the hash), or the row is refused. A
        web tier cannot get a large invoice paid by writing a small amount beside it."""
        if p.amount_msat <= 0 or p.max_fee_msat < 0:
            return "the queued amount is not positive, or its fee allowance is negative"
        if p.destination is not None:
            return None                       # keysend: the node sends exactly the row's amount
        try:
            d = decode_invoice(p.bolt11 or "")
        except Exception:                     # noqa: BLE001 - any undecodable invoice is refused
            return "the queued invoice does not decode"
        if p.payment_hash is not None and d.payment_hash != p.payment_hash:
            return "the queued invoice's payment hash is not the one queued"
        if d.amount_msat is None and not p.amountless:
            return "the queued invoice names no amount but was queued as naming one"
        if d.amount_msat is not None and (p.amountless or d.amount_msat != p.amount_msat):
            return f"the queued invoice asks {d.amount_msat} msat, not the {p.amount_msat} msat queued"
        if d.expires_at <= self.clock():
            return "the queued invoice has expired"
        return None

    async def send(self, p: QueuedPayment) -> None:
        """Ask the node to pay a payment recorded as sending, and record the outcome. An
        unknown outcome leaves it sending: `reconcile` settles it from the node's record."""
        fee_cap = self._fee_cap(p)
        try:
            if p.destination:
                paid = await self.node.keysend(p.destination, p.amount_msat, label=p.node_label,
                                               max_fee_msat=fee_cap)
            else:
                assert p.bolt11 is not None
                paid = await self.node.pay(p.bolt11, max_fee_msat=fee_cap, label=p.node_label,
                                           amount_msat=p.amount_msat if p.amountless else None)
        except PaymentFailed as exc:
            await self._finish(p, None, str(exc))
            return
        except MicropayError as exc:          # PaymentUnknown, a node error: settled later
            log.warning("queued %s %s: outcome unknown (%s); settled from the node's record", p.kind, p.key, exc)
            return
        await self._finish(p, paid, None)

    async def _finish(self, p: QueuedPayment, paid: Payment | None, error: str | None) -> None:
        now_ms = int(self.clock() * 1000)
        node_id = await self.node_id()
        if self.ledger is not None:
            # what the node says it sent, not what the row says (a row rewritten to a small
            # amount must not lower the day's total)
            final = 0 if paid is None else (paid.amount_msat or p.amount_msat) + paid.fee_msat
            await self.ledger.settle(p.key, final, p.node_label)
        if paid is not None:
            await self.repo.done(p.key, node_id, "paid", now_ms, preimage=paid.preimage, fee_msat=paid.fee_msat,
                                 payment_hash=paid.payment_hash)
        else:
            await self.repo.done(p.key, node_id, "failed", now_ms, error=error)
        await self.repo.store.notify(PAID_CHANNEL)

    async def reconcile(self) -> int:
        """Settle this node's payments recorded as sending from the node's own record of
        their labels (after a crash or a lost answer): complete -> paid, failed or dead
        -> failed, never reached the node -> back to the queue. Returns how many moved."""
        node_id = await self.node_id()
        moved = 0
        for p in await self.repo.sending_of(node_id):
            settled = await self._watch.settle(now=self.clock(), label=p.node_label,
                                               sendpays_start=p.sendpays_start or 0)
            if settled.outcome is Outcome.SUCCEEDED:
                await self._finish(p, settled.payment, None)
            elif settled.outcome is Outcome.FAILED:
                # every part written so far failed, but xpay may still be about to try
                # another: a recent attempt is only called failed after the grace
                if self.clock() * 1000 - (p.sent_ms or 0) < REQUEUE_GRACE_S * 1000:
                    continue
                await self._finish(p, None, settled.detail)
            elif settled.outcome is Outcome.NOT_SENT:
                # no record yet may also be an xpay still on its way to writing one (it
                # retries for up to 60 s): only an attempt older than the grace goes back
                if self.clock() * 1000 - (p.sent_ms or 0) < REQUEUE_GRACE_S * 1000:
                    continue
                verdict, paid, paid_label = await self._earlier_attempts(p)
                if verdict == "paid":         # under another of its labels than the row says
                    await self._finish(dataclasses.replace(p, node_label=paid_label), paid, None)
                elif verdict == "wait" or not await self.repo.requeue(p.key, node_id):
                    continue
                # the reservation stays in this node's records for the day (the safe side)
            else:
                continue
            moved += 1
        return moved

    async def _earlier_attempts(self, p: QueuedPayment) -> tuple[str, Payment | None, str | None]:
        """What the node's own records say of the attempts this node's ledger holds for
        `p`: ("unsent", ...) when it has no record of any, each older than the grace;
        ("paid", the payment, its label) when one completed; ("wait", ...) otherwise
        (one in flight, failed or too recent to tell). The store's row (its label, where
        to look, when it was sent, its state) is only the store's word: one rewritten to
        look unsent, or put back in the queue, must not get a payment sent again. Without
        the node's records (tests), the row's word is taken."""
        if self.ledger is None:
            return "unsent", None, None
        attempts = await self.ledger.attempts(p.key)
        if not attempts:
            return "unsent", None, None       # nothing reserved for it here: nothing of ours was sent
        now, verdict = self.clock(), "unsent"
        for label, start, sent_at in attempts:
            seen = await self._watch.settle(now=now, label=label, sendpays_start=start)
            if seen.outcome is Outcome.SUCCEEDED:
                return "paid", seen.payment, label
            if seen.outcome is not Outcome.NOT_SENT or now - sent_at < REQUEUE_GRACE_S:
                verdict = "wait"
        if verdict == "wait":
            log.warning("queued %s %s: the store has it as %s, but this node's records hold an attempt of it "
                        "in flight, failed or recent; it is not sent again", p.kind, p.key, p.state)
        return verdict, None, None

    async def pay_once(self) -> bool:
        """Reconcile, then take one queued payment and pay it; True if one was taken (or
        refused: the next one need not wait for the queue's poll)."""
        await self.reconcile()
        self._refused = False
        p = await self.start_payment()
        if p is None:
            return self._refused
        await self.send(p)
        return True

    async def round(self, refill_limit: int | None = None) -> tuple[int, int]:
        await self.beat()
        pruned = await self.prune_once()
        added = await self.refill_once(refill_limit)
        return added, pruned
