"""Forwarding the collaborators' shares of paid tips through the node, exactly once.

A share's row was written with its tip's settlement (creators/repository.py). Per
attempt: (1) the attempt is written first (status sending, its number, where the
node's payment records stand, and for an offer or a Lightning Address the invoice
fetched for it); (2) the node pays it (keysend under the label
`micropay-tipshare-<tip>-<index>-<attempt>`, or the invoice); (3) the outcome is
written. A share found `sending` (a crash, a lost answer) is settled from the node's
record by the rule every payer shares (lightning/outcome.py), never by paying again:

    complete             -> paid;
    pending              -> looked at again shortly (dead after the grace -> as failed);
    failed               -> nothing is out: retried later as a new attempt;
    no record            -> the attempt never reached the node, or an xpay of it is still
                            looking for a route: nothing is done until RECONCILE_GRACE_S has
                            passed since it began; then a BOLT11 invoice still valid is paid
                            again (one payment hash: the node pays it at most once), else a new
                            attempt is made (a new label, a new invoice).

Work is done only from the row a claim returns (under its lease), and every write
names the attempt it expects: a process working from an older read changes nothing.

A refused attempt (also one that got no invoice) is retried with backoff, MAX_ATTEMPTS
times, then the share is failed with the reason (the tips API shows it). Fees are the
address owner's: a collaborator receives the whole share; each attempt may spend up to
the address's `split_max_fee_msat`, and never more than a tenth of the share, in routing
fees on top. Shares under the address's `split_min_msat` are not made at all: they
wait in the carry (creators/repository.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Awaitable, Callable, NoReturn

from ..core.errors import MicropayError, PaymentFailed, PaymentUnknown
from ..lightning.base import Node, Payment
from ..lightning.outcome import OrphanWatch, Outcome, Settled
from ..store import Store
from .repository import Share, ShareRepository, ShareStatus

log = logging.getLogger("micropay.creators")
AddressInvoices = Callable[[str, int, "str | None"], Awaitable[tuple[str, str]]]
LEASE_S = 90
RENEW_EVERY_S = 20
RETRY_FOR_S = 30               # the node's own retry window per attempt
RECONCILE_GRACE_S = RETRY_FOR_S + 30
LOOK_AGAIN_S = 5               # a payment still in flight is looked at again after this
MAX_ATTEMPTS = 8
MAX_FEE_PPM = 100_000          # a share's routing fee is at most a tenth of it
FIRST_RETRY_S = 30
MAX_RETRY_S = 3600
BATCH = 20


def retry_delay(attempt: int) -> int:
    return min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** max(0, attempt - 1))


class ShareForwarder:
    def __init__(self, store: Store, node: Node, *, address_invoices: AddressInvoices | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.repo, self.node, self.clock = ShareRepository(store), node, clock
        self.address_invoices = address_invoices
        self._outcomes = OrphanWatch(node)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> NoReturn:
        """Forward due shares for the life of the task; a failure only delays the next pass."""
        while True:
            try:
                await self.forward_due()
                nxt = await self.repo.next_at()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("forwarding tip shares failed: %s", exc)
                nxt = None
            wait = 30.0 if nxt is None else min(30.0, max(0.5, nxt - self.clock()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def forward_due(self) -> int:
        """One pass over the shares that are due. Returns how many were acted on."""
        n = 0
        for seen in await self.repo.due(int(self.clock()), BATCH):
            now = int(self.clock())
            s = await self.repo.claim(seen, now + LEASE_S, now)   # the row as it is now, leased
            if s is None:
                continue                      # another process has it, or it moved on
            n += 1
            work = _Work(s)
            async with self._leased(work):
                try:
                    await self._forward(work)
                except MicropayError as exc:  # the node or store is away: look again shortly
                    log.warning("tip %s share %d: %s; trying again shortly", s.tip_id, s.idx, exc.message)
                    await self.repo.release(work.row, int(self.clock()) + LOOK_AGAIN_S)
        return n

    @contextlib.asynccontextmanager
    async def _leased(self, work: "_Work"):
        async def renew() -> None:
            while True:
                await asyncio.sleep(RENEW_EVERY_S)
                try:
                    await self.repo.renew(work.row, int(self.clock()) + LEASE_S)
                except Exception as exc:          # keep trying: the lease is what keeps others off
                    log.warning("tip %s share %d: renewing its lease failed: %s", work.row.tip_id, work.row.idx, exc)
        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()

    async def _forward(self, work: "_Work") -> None:
        s = work.row
        if s.status is ShareStatus.SENDING:
            settled = await self._look(s)
            if settled.outcome is Outcome.SUCCEEDED:
                return await self._paid(s, settled.payment)
            if settled.outcome is Outcome.IN_FLIGHT:
                return await self.repo.release(s, int(self.clock()) + LOOK_AGAIN_S)
            if settled.outcome is Outcome.FAILED:
                return await self._retry(s, s.attempt, settled.detail or "the node recorded the payment as failed")
            # NOT_SENT: the node has no record of the attempt. An xpay of the node may still
            # be working on it (no record yet) until the grace has passed since it began.
            since = self.clock() - (s.started_at or 0)
            if since < RECONCILE_GRACE_S:
                return await self.repo.release(s, int((s.started_at or 0) + RECONCILE_GRACE_S))
            if s.invoice is not None and await self._reusable(s.invoice):
                return await self._pay(work, s.invoice)      # the same hash: paid at most once
        await self._attempt(work)

    async def _look(self, s: Share) -> Settled:
        now = self.clock()
        if s.payment_hash is not None:
            return await self._outcomes.settle(payment_hash=s.payment_hash, now=now)
        return await self._outcomes.settle(label=_label(s, s.attempt), sendpays_start=s.sendpays_start or 0, now=now)

    async def _reusable(self, invoice: str) -> bool:
        """Whether a BOLT11 invoice of an attempt that never left can still be paid as is (a
        BOLT12 invoice is not decoded here: a new one is fetched)."""
        if invoice.lower().startswith("lni"):
            return False
        try:
            return (await self.node.decode(invoice)).expires_at > self.clock() + RETRY_FOR_S + 5
        except MicropayError:
            return False

    async def _attempt(self, work: "_Work") -> None:
        s = work.row
        attempt = s.attempt + 1
        if attempt > MAX_ATTEMPTS:
            await self._give_up(s, s.error or "no attempt succeeded")
            return
        now = int(self.clock())
        if s.kind == "node":
            start = await self.node.sendpays_position()
            begun = await self.repo.begin_attempt(s, attempt, None, None, start, now)
            if begun is not None:
                work.row = begun
                await self._keysend(work)
            return
        try:
            if s.kind == "offer":
                invoice, payment_hash = await self.node.fetch_invoice(s.destination, s.amount_msat)
            else:
                if self.address_invoices is None:
                    raise PaymentFailed("this process cannot pay Lightning Addresses")
                invoice, payment_hash = await self.address_invoices(
                    s.destination, s.amount_msat, f"share of a tip to {s.address}")
        except PaymentFailed as exc:          # no invoice: nothing can be out; the attempt counts
            await self._retry(s, attempt, f"could not get an invoice: {exc.message}")
            return
        begun = await self.repo.begin_attempt(s, attempt, invoice, payment_hash, None, now)
        if begun is not None:
            work.row = begun
            await self._pay(work, invoice)

    async def _keysend(self, work: "_Work") -> None:
        s = work.row
        try:
            p = await self.node.keysend(s.destination, s.amount_msat, label=_label(s, s.attempt),
                                        max_fee_msat=fee_cap(s), retry_for_s=RETRY_FOR_S,
                                        subject=f"creator:{s.address}")
        except PaymentUnknown:
            return await self.repo.release(s, int(self.clock()) + LOOK_AGAIN_S)
        except PaymentFailed as exc:
            return await self._after_refusal(s, exc)
        await self._paid(s, p)

    async def _pay(self, work: "_Work", invoice: str) -> None:
        s = work.row
        try:
            p = await self.node.pay(invoice, max_fee_msat=fee_cap(s), label=_label(s, s.attempt),
                                    retry_for_s=RETRY_FOR_S, subject=f"creator:{s.address}")
        except PaymentUnknown:
            return await self.repo.release(s, int(self.clock()) + LOOK_AGAIN_S)
        except PaymentFailed as exc:
            return await self._after_refusal(s, exc)
        await self._paid(s, p)

    async def _after_refusal(self, s: Share, exc: PaymentFailed) -> None:
        """The node refused the attempt; its record decides (a refusal can come after a
        part of it went out, or for a hash it already paid)."""
        settled = await self._look(s)
        if settled.outcome is Outcome.SUCCEEDED:
            return await self._paid(s, settled.payment)
        if settled.outcome is Outcome.IN_FLIGHT:
            return await self.repo.release(s, int(self.clock()) + LOOK_AGAIN_S)
        await self._retry(s, s.attempt, exc.message)

    async def _retry(self, s: Share, attempt: int, reason: str) -> None:
        """Nothing of attempt `attempt` is out: try again after the backoff, or give up."""
        if attempt >= MAX_ATTEMPTS:
            return await self._give_up(s, reason, attempt)
        delay = retry_delay(attempt)
        log.info("tip %s share %d to %s: attempt %d failed (%s); next in %d s", s.tip_id, s.idx,
                 s.destination[:24], attempt, reason, delay)
        now = int(self.clock())
        await self.repo.retry_later(s, attempt, now + delay, reason, now)

    async def _give_up(self, s: Share, reason: str, attempts: int | None = None) -> None:
        made = s.attempt if attempts is None else attempts
        log.warning("tip %s share %d (%d msat to %s) failed after %d attempts: %s", s.tip_id, s.idx,
                    s.amount_msat, s.destination[:24], made, reason)
        await self.repo.finish(s, ShareStatus.FAILED, int(self.clock()), error=reason, attempts=made)

    async def _paid(self, s: Share, p: Payment | None) -> None:
        fee = p.fee_msat if p is not None else None
        if await self.repo.finish(s, ShareStatus.PAID, int(self.clock()), fee_msat=fee,
                                  preimage=p.preimage if p is not None else None):
            log.info("tip %s share %d paid: %d msat to %s (fee %s msat)", s.tip_id, s.idx, s.amount_msat,
                     s.destination[:24], fee)


class _Work:
    """The share being worked on, as this process last wrote it (a new attempt replaces it)."""

    def __init__(self, row: Share) -> None:
        self.row = row


def fee_cap(s: Share) -> int:
    """What routing may cost for one share: the address's cap, and never more than
    MAX_FEE_PPM of the share (a tiny share never costs the owner more than it is worth)."""
    return min(s.max_fee_msat, s.amount_msat * MAX_FEE_PPM // 1_000_000)


def _label(s: Share, attempt: int) -> str:
    return f"micropay-tipshare-{s.tip_id}-{s.idx}-{attempt}"
