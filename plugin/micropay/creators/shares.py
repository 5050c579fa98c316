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
    no record, invoice   -> the same invoice is paid again (one payment hash: the node
                            pays it at most once), or a new one fetched once it expired;
    no record, keysend   -> a new attempt (new label) once RECONCILE_GRACE_S has passed
                            since the attempt began, so no xpay still routing the old one
                            can add a second payment.

A refused attempt is retried with backoff, MAX_ATTEMPTS times, then the share is
failed with the reason (the tips API shows it). Fees are the address owner's: a
collaborator receives the whole share; each attempt may spend up to the address's
`split_max_fee_msat` in routing fees on top.
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
        for s in await self.repo.due(int(self.clock()), BATCH):
            now = int(self.clock())
            if not await self.repo.claim(s, now + LEASE_S, now):
                continue                      # another process holds it
            n += 1
            async with self._leased(s):
                try:
                    await self._forward(s)
                except MicropayError as exc:  # the node or store is away: look again shortly
                    log.warning("tip %s share %d: %s; trying again shortly", s.tip_id, s.idx, exc.message)
                    await self.repo.release(s, int(self.clock()) + LOOK_AGAIN_S)
        return n

    @contextlib.asynccontextmanager
    async def _leased(self, s: Share):
        async def renew() -> None:
            while True:
                await asyncio.sleep(RENEW_EVERY_S)
                await self.repo.renew(s, int(self.clock()) + LEASE_S)
        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()

    async def _forward(self, s: Share) -> None:
        if s.status is ShareStatus.SENDING:
            settled = await self._look(s)
            if settled.outcome is Outcome.SUCCEEDED:
                return await self._paid(s, settled.payment)
            if settled.outcome is Outcome.IN_FLIGHT:
                return await self.repo.release(s, int(self.clock()) + LOOK_AGAIN_S)
            if settled.outcome is Outcome.FAILED:
                return await self._refused(s, settled.detail or "the node recorded the payment as failed")
            # NOT_SENT: the attempt never reached the node
            if s.invoice is not None and not await self._expired(s.invoice):
                return await self._pay(s, s.attempt, s.invoice, s.payment_hash)
            if s.invoice is None and self.clock() - (s.started_at or 0) < RECONCILE_GRACE_S:
                return await self.repo.release(s, int((s.started_at or 0) + RECONCILE_GRACE_S))
        await self._attempt(s)

    async def _look(self, s: Share) -> Settled:
        now = self.clock()
        if s.payment_hash is not None:
            return await self._outcomes.settle(payment_hash=s.payment_hash, now=now)
        return await self._outcomes.settle(label=_label(s, s.attempt), sendpays_start=s.sendpays_start or 0, now=now)

    async def _expired(self, invoice: str) -> bool:
        return (await self.node.decode(invoice)).expires_at <= self.clock() + RETRY_FOR_S

    async def _attempt(self, s: Share) -> None:
        attempt = s.attempt + 1
        if attempt > MAX_ATTEMPTS:
            await self._give_up(s, s.error or "no attempt succeeded")
            return
        now = int(self.clock())
        if s.kind == "node":
            start = await self.node.sendpays_position()
            if not await self.repo.begin_attempt(s, attempt, None, None, start, now):
                return
            await self._keysend(s, attempt)
            return
        try:
            if s.kind == "offer":
                invoice, payment_hash = await self.node.fetch_invoice(s.destination, s.amount_msat)
            else:
                if self.address_invoices is None:
                    raise PaymentFailed("this process cannot pay Lightning Addresses")
                invoice, payment_hash = await self.address_invoices(
                    s.destination, s.amount_msat, f"share of a tip to {s.address}")
        except PaymentFailed as exc:          # no invoice: nothing can be out
            await self._retry(s, attempt, f"could not get an invoice: {exc.message}")
            return
        if not await self.repo.begin_attempt(s, attempt, invoice, payment_hash, None, now):
            return
        await self._pay(s, attempt, invoice, payment_hash)

    async def _keysend(self, s: Share, attempt: int) -> None:
        try:
            p = await self.node.keysend(s.destination, s.amount_msat, label=_label(s, attempt),
                                        max_fee_msat=s.max_fee_msat, retry_for_s=RETRY_FOR_S,
                                        subject=f"creator:{s.address}")
        except PaymentUnknown:
            return await self.repo.release(s, int(self.clock()) + LOOK_AGAIN_S)
        except PaymentFailed as exc:
            return await self._after_refusal(s, attempt, exc)
        await self._paid(s, p)

    async def _pay(self, s: Share, attempt: int, invoice: str, payment_hash: str | None) -> None:
        try:
            p = await self.node.pay(invoice, max_fee_msat=s.max_fee_msat, label=_label(s, attempt),
                                    retry_for_s=RETRY_FOR_S, subject=f"creator:{s.address}")
        except PaymentUnknown:
            return await self.repo.release(s, int(self.clock()) + LOOK_AGAIN_S)
        except PaymentFailed as exc:
            return await self._after_refusal(s, attempt, exc)
        await self._paid(s, p)

    async def _after_refusal(self, s: Share, attempt: int, exc: PaymentFailed) -> None:
        """The node refused the attempt; its record decides (a refusal can come after a
        part of it went out, or for a hash it already paid)."""
        fresh = (await self.repo.of_tip(s.tip_id))[s.idx]
        settled = await self._look(fresh)
        if settled.outcome is Outcome.SUCCEEDED:
            return await self._paid(fresh, settled.payment)
        if settled.outcome is Outcome.IN_FLIGHT:
            return await self.repo.release(fresh, int(self.clock()) + LOOK_AGAIN_S)
        await self._retry(fresh, attempt, exc.message)

    async def _refused(self, s: Share, reason: str) -> None:
        await self._retry(s, s.attempt, reason)

    async def _retry(self, s: Share, attempt: int, reason: str) -> None:
        if attempt >= MAX_ATTEMPTS:
            return await self._give_up(s, reason)
        delay = retry_delay(attempt)
        log.info("tip %s share %d to %s: attempt %d failed (%s); next in %d s", s.tip_id, s.idx,
                 s.destination[:24], attempt, reason, delay)
        now = int(self.clock())
        await self.repo.retry_later(s, now + delay, reason, now)

    async def _give_up(self, s: Share, reason: str) -> None:
        log.warning("tip %s share %d (%d msat to %s) failed after %d attempts: %s", s.tip_id, s.idx,
                    s.amount_msat, s.destination[:24], s.attempt, reason)
        await self.repo.finish(s, ShareStatus.FAILED, int(self.clock()), error=reason)

    async def _paid(self, s: Share, p: Payment | None) -> None:
        fee = p.fee_msat if p is not None else None
        if await self.repo.finish(s, ShareStatus.PAID, int(self.clock()), fee_msat=fee,
                                  preimage=p.preimage if p is not None else None):
            log.info("tip %s share %d paid: %d msat to %s (fee %s msat)", s.tip_id, s.idx, s.amount_msat,
                     s.destination[:24], fee)


def _label(s: Share, attempt: int) -> str:
    return f"micropay-tipshare-{s.tip_id}-{s.idx}-{attempt}"
