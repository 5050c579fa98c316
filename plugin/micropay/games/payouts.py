"""Payouts to players: pay a BOLT11 invoice or a BOLT12 offer, capped per player per day
and per day overall, idempotent by key.

The payout row is reserved (status 'sending') in the same transaction that checks the
caps, under a lock row, so concurrent requests cannot overshoot a cap. Only then is
the payment sent. A failed payment stops counting against the caps. A payout left
'sending' (by a crash, or a payment still out) is settled by the resume loop from the
node's record of its payment hash, by the rule every payer shares
(lightning/outcome.py): complete -> paid; failed -> failed; pending with an HTLC ->
still sending; pending with no HTLC behind it for ORPHAN_GRACE_S -> dead, so failed
(the money never left, and lightningd never pays that hash again), which gives its
share of the caps back; no record -> paid now, on the same invoice, which Lightning
makes idempotent (same payment hash).
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
from dataclasses import replace
from typing import Any, Callable, NoReturn

from ..core.errors import (BadRequest, Conflict, MicropayError, NotFound, PaymentFailed, PaymentUnknown,
                           PayoutCapReached, PayoutsDisabled)
from ..lightning.base import Node
from ..lightning.outcome import OrphanWatch, Outcome, Settled
from ..store import Store
from ..core.tasks import every
from .config import PayoutCaps
from .events import EventHub
from .models import PAYOUT_CREATE
from .repository import CapReached, NewEvent, Payout, PayoutRepository, PayoutStatus

log = logging.getLogger("micropay.payouts")
LEASE_S = 30                     # a payout's lease: renewed while a process works on it, so a
RENEW_EVERY_S = 10               # crashed process's payouts are resumed within LEASE_S
DEFAULT_MAX_FEE_MSAT = 5_000     # the micropay-payout-max-fee-msat default


def utc_day(t: float) -> str:
    return dt.datetime.fromtimestamp(int(t), dt.timezone.utc).strftime("%Y-%m-%d")


def view(p: Payout) -> dict[str, Any]:
    return {"id": p.id, "idempotency_key": p.idempotency_key, "player_id": p.player_id,
            "destination": p.destination, "amount_msat": p.amount_msat, "fee_msat": p.fee_msat,
            "status": str(p.status), "error": p.error, "payment_hash": p.payment_hash, "preimage": p.preimage,
            "day": p.day, "created_at": p.created_at, "updated_at": p.updated_at}


class Payouts:
    def __init__(self, caps: PayoutCaps | None, store: Store, node: Node, *,
                 endpoints_for: Callable[[str], list[str]] = lambda t: [], hub: EventHub | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.caps, self.repo, self.node = caps, PayoutRepository(store), node
        self.endpoints_for, self.hub, self.clock = endpoints_for, hub, clock
        self._outcomes = OrphanWatch(node)     # payments seen pending with no HTLC, and since when

    async def get(self, payout_id: str) -> dict[str, Any]:
        p = await self.repo.by_id(payout_id)
        if p is None:
            raise NotFound("no such payout")
        return view(p)

    async def create(self, body: Any) -> tuple[dict[str, Any], bool]:
        if self.caps is None:
            raise PayoutsDisabled("payouts are disabled: set the per-player and per-day caps ([payouts] in the "
                                  "sidecar config, or the micropay-payout-*-msat plugin options)")
        fields = PAYOUT_CREATE.parse(body)
        player, key, amount = fields["player_id"], fields["idempotency_key"], fields["amount_msat"]
        dest = fields["destination"].strip()
        if dest.lower().startswith("lightning:"):
            dest = dest[10:]

        existing = await self.repo.by_key(key)
        if existing is not None:
            if (existing.player_id, existing.destination) != (player, dest) or (
                    amount is not None and amount != existing.amount_msat):
                raise Conflict("idempotency_key was already used for a different payout",
                               reason="idempotency_key_reused", payout_id=existing.id)
            return view(existing), False

        is_offer = dest.lower().startswith("lno1")
        invoice, payment_hash = (None, None) if is_offer else (dest, None)
        if is_offer:
            if not self.node.pays_offers:
                raise BadRequest("paying offers needs the cln backend")
            if amount is None:
                raise BadRequest("amount_msat is required when paying an offer")
        else:
            dec = await self.node.decode(dest)
            if dec.amount_msat is None:
                raise BadRequest("the invoice must carry an amount")
            if amount is not None and amount != dec.amount_msat:
                raise BadRequest(f"amount_msat {amount} does not match the invoice's {dec.amount_msat}")
            if dec.expires_at <= self.clock():
                raise BadRequest("the invoice has expired")
            amount, payment_hash = dec.amount_msat, dec.payment_hash

        now = int(self.clock())
        day = utc_day(now)
        pid = "pay_" + os.urandom(12).hex()
        new = Payout(pid, key, player, dest, invoice, payment_hash, amount, None, PayoutStatus.SENDING, None, day,
                     now, now, None, self.caps.max_fee_msat, now + LEASE_S)
        reserved = await self.repo.reserve(new, self.caps.per_player_day_msat, self.caps.per_day_msat)
        if reserved is not True:
            existing = await self.repo.by_key(key)
            if existing is not None:
                return view(existing), False       # the same key, created meanwhile
            player_total, day_total = await self.repo.totals(day, player)
            if reserved == CapReached.PER_PLAYER_DAY:
                raise PayoutCapReached(
                    f"player {player!r} would exceed the daily payout cap of {self.caps.per_player_day_msat} msat",
                    cap=str(reserved), cap_msat=self.caps.per_player_day_msat, used_msat=player_total)
            raise PayoutCapReached(f"the daily payout cap of {self.caps.per_day_msat} msat would be exceeded",
                                   cap=str(CapReached.PER_DAY), cap_msat=self.caps.per_day_msat, used_msat=day_total)
        log.info("payout %s reserved: %d msat to player %s", pid, amount, player)
        async with self._leased(pid):
            return await self._send(new), True

    @contextlib.asynccontextmanager
    async def _leased(self, pid: str):
        """Keep the payout's lease while we work on it; a crash lets it run out."""
        async def renew() -> None:
            while True:
                await asyncio.sleep(RENEW_EVERY_S)
                await self.repo.renew_lease(pid, int(self.clock()) + LEASE_S)
        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()

    async def _send(self, row: Payout, resume: bool = False) -> dict[str, Any]:
        """Pay the payout, or settle it from what the node recorded (lightning/outcome.py):
        complete -> paid, pending -> still sending (dead after the grace -> failed),
        failed -> failed, never from an attempt the node refused for a passing reason.
        With `resume`, an attempt the node already recorded as failed is final."""
        pid = row.id
        invoice, payment_hash = row.invoice, row.payment_hash
        if invoice is None:   # an offer: fetch the invoice once, persist it, then pay it
            try:
                invoice, payment_hash = await self.node.fetch_invoice(row.destination, row.amount_msat)
            except MicropayError as exc:
                return await self._finish(row, PayoutStatus.FAILED, error=f"could not fetch an invoice from the offer: "
                                                                 f"{exc.message}")
            await self.repo.set_invoice(pid, invoice, payment_hash, int(self.clock()))
        if payment_hash is None:
            payment_hash = (await self.node.decode(invoice)).payment_hash
        known = await self._outcomes.settle(payment_hash=payment_hash, now=self.clock())
        if known.outcome is not Outcome.NOT_SENT and (resume or known.outcome is not Outcome.FAILED
                                                      or known.orphaned):
            return await self._settled(row, known)
        try:
            p = await self.node.pay(invoice, max_fee_msat=self._fee_cap(row), label=f"micropay-payout-{pid}",
                                    subject=row.player_id)
        except PaymentUnknown:
            return await self.get(pid)           # out, outcome unknown: settled from the node's record later
        except PaymentFailed as exc:
            after = await self._outcomes.settle(payment_hash=payment_hash, now=self.clock())
            if after.outcome in (Outcome.SUCCEEDED, Outcome.IN_FLIGHT) or after.orphaned:
                return await self._settled(row, after)
            return await self._finish(row, PayoutStatus.FAILED, error=exc.message)
        return await self._paid(row, p)

    async def _settled(self, row: Payout, known: Settled) -> dict[str, Any]:
        """Record what the node's record says of the payout's payment (never NOT_SENT)."""
        if known.outcome is Outcome.SUCCEEDED:
            return await self._paid(row, known.payment)
        if known.outcome is Outcome.IN_FLIGHT:
            return await self.get(row.id)        # still out: whoever holds the lease next looks again
        if known.orphaned:
            log.warning("payout %s: %s; failed, its caps given back", row.id, known.detail)
            return await self._finish(row, PayoutStatus.FAILED, error=known.detail)
        return await self._finish(row, PayoutStatus.FAILED, error="the node recorded this payment as failed")

    def _fee_cap(self, row: Payout) -> int:
        """The fee cap the payout was created under (rows from before 0.2 have none: the
        current cap, or the option's default)."""
        if row.max_fee_msat is not None:
            return row.max_fee_msat
        return self.caps.max_fee_msat if self.caps is not None else DEFAULT_MAX_FEE_MSAT

    async def _paid(self, row: Payout, p: Any) -> dict[str, Any]:
        return await self._finish(row, PayoutStatus.PAID, fee_msat=p.fee_msat, preimage=p.preimage)

    async def _finish(self, row: Payout, status: PayoutStatus, *, fee_msat: int | None = None,
                      preimage: str | None = None, error: str | None = None) -> dict[str, Any]:
        now = int(self.clock())
        done = replace(row, status=status, fee_msat=fee_msat, preimage=preimage, error=error, updated_at=now)
        ev = NewEvent(f"payout.{status}:{row.id}", f"payout.{status}", row.id, row.player_id,
                      {"payout": view(done)}, now)
        if await self.repo.finish(row.id, status, fee_msat, preimage, error, now, ev, self.endpoints_for(ev.type)) \
                and self.hub is not None:
            self.hub.notify()
        log.info("payout %s %s%s", row.id, status, f": {error}" if error else "")
        return await self.get(row.id)

    async def resume_sending(self, ready_timeout_s: float = 120.0) -> int:
        """Act on payouts left 'sending' (by a crash, or a payment still out) whose lease
        has run out: settle them from the node's record, or pay them. Waits first until
        the node can pay, so a restart does not fail them before its peers are back."""
        rows = await self.repo.sending(int(self.clock()))
        if not rows:
            return 0
        if not await self.node.wait_until_ready(ready_timeout_s):
            log.warning("the node has no usable channel yet; resuming %d payouts anyway", len(rows))
        n = 0
        for row in rows:
            now = int(self.clock())
            if not await self.repo.claim(row.id, now + LEASE_S, now):
                continue                       # another process holds it
            n += 1
            try:
                async with self._leased(row.id):
                    done = await self._send(row, resume=True)
                log.info("payout %s resumed: %s", row.id, done["status"])
            except MicropayError as exc:
                log.warning("payout %s still unresolved: %s", row.id, exc.message)
        return n

    async def watch(self, every_s: float = 5.0) -> NoReturn:
        """Keep resuming payouts in flight until they are settled (runs for the process's life)."""
        await every(every_s, self.resume_sending, what="resuming payouts", log=log)
