"""Payouts to players: pay a BOLT11 invoice or a BOLT12 offer, capped per player per day
and per day overall, idempotent by key.

The payout row is reserved (status 'sending') in the same transaction that checks the
caps, under a lock row, so concurrent requests cannot overshoot a cap. Only then is
the payment sent. A failed payment stops counting against the caps. A payout left
'sending' by a crash is resumed at start-up by paying the same invoice again, which
Lightning makes idempotent (same payment hash).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import time
from typing import Any, Callable

from ..errors import BadRequest, MicropayError, PaymentFailed
from ..lightning.base import Node
from ..params import MAX_MSAT
from ..store import Store
from ..store.base import Step
from ..store.games import GSQL, PAYOUT_FIELDS, NewEvent, row_dict
from .config import PayoutCaps
from .purchases import Conflict, EventHub, NotFound, check_idempotency_key, check_player_id

log = logging.getLogger("micropay.payouts")
MAX_DESTINATION = 4096


class PayoutCapReached(MicropayError):
    code = "payout_cap_reached"
    http_status = 409
    rpc_code = 1409


class PayoutsDisabled(MicropayError):
    code = "payouts_disabled"
    http_status = 403
    rpc_code = 1403


def utc_day(t: float) -> str:
    return dt.datetime.fromtimestamp(int(t), dt.timezone.utc).strftime("%Y-%m-%d")


def view(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "idempotency_key": row["idempotency_key"], "player_id": row["player_id"],
            "destination": row["destination"], "amount_msat": int(row["amount_msat"]),
            "fee_msat": None if row["fee_msat"] is None else int(row["fee_msat"]),
            "status": row["status"], "error": row["error"], "payment_hash": row["payment_hash"],
            "preimage": row["preimage"], "day": row["day"], "created_at": int(row["created_at"]),
            "updated_at": int(row["updated_at"])}


class Payouts:
    def __init__(self, caps: PayoutCaps | None, store: Store, node: Node, *,
                 endpoints_for: Callable[[str], list[str]] = lambda t: [], hub: EventHub | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.caps, self.store, self.node = caps, store, node
        self.endpoints_for, self.hub, self.clock = endpoints_for, hub, clock

    async def _one(self, key: str, value: str) -> dict[str, Any] | None:
        rows = await self.store.query(GSQL[key], (value,))
        return row_dict(PAYOUT_FIELDS, rows[0]) if rows else None

    async def get(self, payout_id: str) -> dict[str, Any]:
        row = await self._one("payout_by_id", payout_id)
        if row is None:
            raise NotFound("no such payout")
        return view(row)

    async def create(self, body: Any) -> tuple[dict[str, Any], bool]:
        if self.caps is None:
            raise PayoutsDisabled("payouts are disabled: set the per-player and per-day caps ([payouts] in the "
                                  "sidecar config, or the micropay-payout-*-msat plugin options)")
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        unknown = sorted(set(body) - {"player_id", "destination", "amount_msat", "idempotency_key"})
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}")
        player = check_player_id(body.get("player_id"))
        key = check_idempotency_key(body.get("idempotency_key"))
        dest = body.get("destination")
        if not isinstance(dest, str) or not 0 < len(dest) <= MAX_DESTINATION:
            raise BadRequest("destination must be a BOLT11 invoice or a BOLT12 offer")
        dest = dest.strip()
        if dest.lower().startswith("lightning:"):
            dest = dest[10:]
        amount = body.get("amount_msat")
        if amount is not None and (not isinstance(amount, int) or isinstance(amount, bool)
                                   or not 0 < amount <= MAX_MSAT):
            raise BadRequest("amount_msat must be a positive integer")

        existing = await self._one("payout_by_key", key)
        if existing is not None:
            if (existing["player_id"], existing["destination"]) != (player, dest) or (
                    amount is not None and amount != existing["amount_msat"]):
                raise Conflict("idempotency_key was already used for a different payout",
                               reason="idempotency_key_reused", payout_id=existing["id"])
            return view(existing), False

        is_offer = dest.lower().startswith("lno1")
        invoice, payment_hash = (None, None) if is_offer else (dest, None)
        if is_offer:
            if not hasattr(self.node, "fetch_invoice"):
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
        tx = await self.store.transaction([
            Step(GSQL["lock"], ("payouts",)),
            Step(GSQL["payout_player_room"], (day, player, amount, self.caps.per_player_day_msat), required=True),
            Step(GSQL["payout_day_room"], (day, amount, self.caps.per_day_msat), required=True),
            Step(GSQL["add_payout"], (pid, key, player, dest, invoice, payment_hash, amount, day, now)),
        ])
        if not tx.ok:
            existing = await self._one("payout_by_key", key)
            if existing is not None:
                return view(existing), False
            player_total, day_total = (await self.store.query(GSQL["payout_totals"], (day, player)))[0]
            if tx.failed_step == 1:
                raise PayoutCapReached(
                    f"player {player!r} would exceed the daily payout cap of {self.caps.per_player_day_msat} msat",
                    cap="per_player_day", cap_msat=self.caps.per_player_day_msat, used_msat=int(player_total))
            raise PayoutCapReached(f"the daily payout cap of {self.caps.per_day_msat} msat would be exceeded",
                                   cap="per_day", cap_msat=self.caps.per_day_msat, used_msat=int(day_total))
        if not tx.rows[3]:
            return view(await self._one("payout_by_key", key)), False   # type: ignore[arg-type]
        log.info("payout %s reserved: %d msat to player %s", pid, amount, player)
        return await self._send(await self._one("payout_by_id", pid)), True  # type: ignore[arg-type]

    async def _send(self, row: dict[str, Any]) -> dict[str, Any]:
        pid = row["id"]
        invoice = row["invoice"]
        if invoice is None:   # an offer: fetch the invoice once, persist it, then pay it
            try:
                invoice, payment_hash = await self.node.fetch_invoice(  # type: ignore[attr-defined]
                    row["destination"], int(row["amount_msat"]))
            except MicropayError as exc:
                return await self._finish(row, "failed", error=f"could not fetch an invoice from the offer: "
                                                                 f"{exc.message}")
            await self.store.query(GSQL["set_payout_invoice"], (pid, invoice, payment_hash, int(self.clock())))
        try:
            p = await self.node.pay(invoice, max_fee_msat=self.caps.max_fee_msat if self.caps else None,
                                    label=f"micropay-payout-{pid}")
        except PaymentFailed as exc:
            return await self._finish(row, "failed", error=exc.message)
        return await self._finish(row, "paid", fee_msat=p.fee_msat, preimage=p.preimage)

    async def _finish(self, row: dict[str, Any], status: str, *, fee_msat: int | None = None,
                      preimage: str | None = None, error: str | None = None) -> dict[str, Any]:
        now = int(self.clock())
        done = dict(row, status=status, fee_msat=fee_msat, preimage=preimage, error=error, updated_at=now)
        ev = NewEvent(f"payout.{status}:{row['id']}", f"payout.{status}", row["id"], row["player_id"],
                      {"payout": view(done)}, now)
        tx = await self.store.transaction(
            [Step(GSQL["finish_payout"], (row["id"], status, fee_msat, preimage, error, now), required=True)]
            + ev.steps(self.endpoints_for(ev.type)))
        if tx.ok and self.hub is not None:
            self.hub.notify()
        log.info("payout %s %s%s", row["id"], status, f": {error}" if error else "")
        return await self.get(row["id"])

    async def resume_sending(self) -> int:
        """At start-up: finish payouts a crash left 'sending'."""
        rows = [row_dict(PAYOUT_FIELDS, r) for r in await self.store.query(GSQL["payouts_sending"])]
        for row in rows:
            log.info("resuming payout %s left in flight", row["id"])
            try:
                await self._send(row)   # type: ignore[arg-type]
            except MicropayError as exc:
                log.warning("payout %s still unresolved: %s", row["id"], exc.message)
        return len(rows)
