"""Statements over the creators tables (creators/schema.py): tips, their shares, the
carried remainders and the zap receipt outbox. A tip becomes paid in one transaction
with its event, its webhook deliveries, every collaborator's share and its zap
receipt: all of them or none, once."""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any, Sequence

from ..games.repository import LOCK, NewEvent
from ..store.base import Step, Store
from .config import AddressConfig


class TipStatus(enum.StrEnum):
    PENDING = "pending"
    PAID = "paid"
    EXPIRED = "expired"


class ShareStatus(enum.StrEnum):
    PENDING = "pending"      # not tried yet, or the last attempt surely left nothing out
    SENDING = "sending"      # an attempt may be out; the node's records settle it
    PAID = "paid"
    FAILED = "failed"        # given up (the reason in `error`)
    SKIPPED = "skipped"      # rounded to 0 msat


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


_T_COLS = ("id, address, amount_msat, comment, zap_request, client, status, bolt11, payment_hash, created_at, "
           "expires_at, paid_at, received_msat, preimage")


@dataclass(frozen=True, slots=True)
class Tip:
    id: str
    address: str
    amount_msat: int
    comment: str
    zap_request: str | None
    client: str
    status: TipStatus
    bolt11: str
    payment_hash: str
    created_at: int
    expires_at: int
    paid_at: int | None = None
    received_msat: int | None = None
    preimage: str | None = None

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> "Tip":
        return cls(r[0], r[1], int(r[2]), r[3], r[4], r[5], TipStatus(r[6]), r[7], r[8], int(r[9]), int(r[10]),
                   _int(r[11]), _int(r[12]), r[13])


_S_COLS = ("tip_id, idx, address, destination, name, amount_msat, max_fee_msat, status, attempt, invoice, "
           "payment_hash, sendpays_start, started_at, fee_msat, preimage, error, next_at, created_at, updated_at")


@dataclass(frozen=True, slots=True)
class Share:
    tip_id: str
    idx: int
    address: str
    destination: str
    name: str
    amount_msat: int
    max_fee_msat: int
    status: ShareStatus
    attempt: int
    invoice: str | None
    payment_hash: str | None
    sendpays_start: int | None
    started_at: int | None
    fee_msat: int | None
    preimage: str | None
    error: str | None
    next_at: int
    created_at: int
    updated_at: int

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> "Share":
        return cls(r[0], int(r[1]), r[2], r[3], r[4], int(r[5]), int(r[6]), ShareStatus(r[7]), int(r[8]), r[9],
                   r[10], _int(r[11]), _int(r[12]), _int(r[13]), r[14], r[15], int(r[16]), int(r[17]), int(r[18]))

    @property
    def label(self) -> str:
        """The node's label of the current attempt (a new attempt is a new payment)."""
        return f"micropay-tipshare-{self.tip_id}-{self.idx}-{self.attempt}"

    @property
    def kind(self) -> str:
        if self.destination.startswith("lno1"):
            return "offer"
        return "address" if "@" in self.destination else "node"


@dataclass(frozen=True, slots=True)
class ZapReceipt:
    tip_id: str
    event: str          # the signed kind-9735 event, JSON
    relays: str         # JSON list of relay URLs still to reach
    status: str         # pending | published | failed
    attempts: int
    next_at: int
    last_error: str | None
    published_at: int | None = None


# -- tips ------------------------------------------------------------------------------------
TIP_ROOM = ("SELECT 1 WHERE (SELECT COUNT(*) FROM micropay_tips WHERE client = $1 AND status = 'pending' "
            "AND expires_at > $2) < CAST($3 AS BIGINT) AND (SELECT COUNT(*) FROM micropay_tips "
            "WHERE status = 'pending' AND expires_at > $2) < CAST($4 AS BIGINT)")
ADD_TIP = (f"INSERT INTO micropay_tips ({_T_COLS}) VALUES ($1,$2,$3,$4,$5,$6,'pending',$7,$8,$9,$10,NULL,NULL,NULL) "
           "RETURNING id")
TIP_BY = {f: f"SELECT {_T_COLS} FROM micropay_tips WHERE {f} = $1" for f in ("id", "payment_hash")}
MARK_TIP_PAID = ("UPDATE micropay_tips SET status = 'paid', paid_at = $2, received_msat = $3, preimage = $4 "
                 "WHERE payment_hash = $1 AND status <> 'paid' RETURNING id")
EXPIRABLE_TIPS = "SELECT id FROM micropay_tips WHERE status = 'pending' AND expires_at <= $1 LIMIT $2"
EXPIRE_TIPS = ("UPDATE micropay_tips SET status = 'expired' WHERE status = 'pending' AND expires_at <= $1 "
               "AND id IN (SELECT id FROM micropay_tips WHERE status = 'pending' AND expires_at <= $1 LIMIT $2)")
# Unpaid tips are kept a while after they expired (a late payment is still recorded), then
# deleted: what anonymous callers can make the store hold is bounded by time.
PURGE_TIPS = ("DELETE FROM micropay_tips WHERE id IN (SELECT id FROM micropay_tips WHERE status = 'expired' "
              "AND expires_at <= $1 LIMIT $2)")
LIST_TIPS = (f"SELECT {_T_COLS} FROM micropay_tips WHERE ($1 = '' OR address = $1) AND ($2 = '' OR status = $2) "
             "AND (created_at < $3 OR (created_at = $3 AND id < $4)) ORDER BY created_at DESC, id DESC LIMIT $5")

# -- shares ----------------------------------------------------------------------------------
CARRY_ROW = ("INSERT INTO micropay_tip_carry (address, destination, share, total, carry, prev) "
             "VALUES ($1, $2, CAST($3 AS BIGINT), CAST($4 AS BIGINT), 0, 0) ON CONFLICT DO NOTHING")
# Both right-hand sides read the old `carry` (SQL evaluates them before assigning). A
# share below the minimum ($6) is not paid: all of it stays in the carry, for the next tip.
CARRY_STEP = ("UPDATE micropay_tip_carry SET prev = carry, "
              "carry = CASE WHEN (CAST($5 AS BIGINT) * share + carry) / total >= CAST($6 AS BIGINT) "
              "THEN (CAST($5 AS BIGINT) * share + carry) % total ELSE CAST($5 AS BIGINT) * share + carry END "
              "WHERE address = $1 AND destination = $2 AND share = CAST($3 AS BIGINT) AND total = CAST($4 AS BIGINT) "
              "RETURNING carry")
_SHARE_AMOUNT = "(CAST($4 AS BIGINT) * share + prev) / total"
ADD_SHARE = (f"INSERT INTO micropay_tip_shares ({_S_COLS}, lease_until) "
             "SELECT $1, CAST($2 AS BIGINT), address, destination, $3, "
             f"CASE WHEN {_SHARE_AMOUNT} >= CAST($11 AS BIGINT) THEN {_SHARE_AMOUNT} ELSE 0 END, CAST($5 AS BIGINT), "
             f"CASE WHEN {_SHARE_AMOUNT} >= CAST($11 AS BIGINT) THEN 'pending' ELSE 'skipped' END, "
             "0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, CAST($6 AS BIGINT), CAST($6 AS BIGINT), "
             "CAST($6 AS BIGINT), NULL FROM micropay_tip_carry WHERE address = $7 AND destination = $8 "
             "AND share = CAST($9 AS BIGINT) AND total = CAST($10 AS BIGINT) "
             "ON CONFLICT (tip_id, idx) DO NOTHING")
SHARES_OF = f"SELECT {_S_COLS} FROM micropay_tip_shares WHERE tip_id = $1 ORDER BY idx"
DUE_SHARES = (f"SELECT {_S_COLS} FROM micropay_tip_shares WHERE status IN ('pending', 'sending') "
              "AND next_at <= $1 AND (lease_until IS NULL OR lease_until < $1) ORDER BY next_at LIMIT $2")
NEXT_SHARE_AT = "SELECT MIN(next_at) FROM micropay_tip_shares WHERE status IN ('pending', 'sending')"
# The claim returns the row as it is now: whoever works on a share works from what the
# store holds under its lease, never from an older read. Every later write names the
# attempt it expects, so a process working from a stale row changes nothing.
CLAIM_SHARE = ("UPDATE micropay_tip_shares SET lease_until = $3 WHERE tip_id = $1 AND idx = $2 "
               "AND status IN ('pending', 'sending') AND next_at <= $4 "
               f"AND (lease_until IS NULL OR lease_until < $4) RETURNING {_S_COLS}")
RENEW_SHARE = ("UPDATE micropay_tip_shares SET lease_until = $3 WHERE tip_id = $1 AND idx = $2 "
               "AND status IN ('pending', 'sending')")
BEGIN_ATTEMPT = ("UPDATE micropay_tip_shares SET status = 'sending', attempt = $3, invoice = $4, payment_hash = $5, "
                 "sendpays_start = $6, started_at = $7, updated_at = $7 WHERE tip_id = $1 AND idx = $2 "
                 "AND status IN ('pending', 'sending') AND attempt = $8 RETURNING tip_id")
RETRY_SHARE = ("UPDATE micropay_tip_shares SET status = 'pending', attempt = $6, next_at = $3, error = $4, "
               "updated_at = $5, lease_until = NULL WHERE tip_id = $1 AND idx = $2 "
               "AND status IN ('pending', 'sending') AND attempt = $7")
FINISH_SHARE = ("UPDATE micropay_tip_shares SET status = $3, fee_msat = $4, preimage = $5, error = $6, "
                "updated_at = $7, lease_until = NULL, attempt = $9 WHERE tip_id = $1 AND idx = $2 "
                "AND status IN ('pending', 'sending') AND attempt = $8 RETURNING tip_id")
RELEASE_SHARE = ("UPDATE micropay_tip_shares SET lease_until = NULL, next_at = $3 WHERE tip_id = $1 AND idx = $2 "
                 "AND status IN ('pending', 'sending') AND attempt = $4")

# -- zap receipts ------------------------------------------------------------------------------
ADD_ZAP = ("INSERT INTO micropay_zap_receipts (tip_id, event, relays, status, attempts, next_at, lease_until, "
           "last_error, created_at, published_at) VALUES ($1, $2, $3, 'pending', 0, CAST($4 AS BIGINT), NULL, NULL, "
           "CAST($4 AS BIGINT), NULL) ON CONFLICT (tip_id) DO NOTHING")
_Z_COLS = "tip_id, event, relays, status, attempts, next_at, last_error, published_at"
DUE_ZAPS = (f"SELECT {_Z_COLS} FROM micropay_zap_receipts WHERE status = 'pending' AND next_at <= $1 "
            "AND (lease_until IS NULL OR lease_until < $1) ORDER BY next_at LIMIT $2")
ZAP_OF = f"SELECT {_Z_COLS} FROM micropay_zap_receipts WHERE tip_id = $1"
CLAIM_ZAP = ("UPDATE micropay_zap_receipts SET lease_until = $2 WHERE tip_id = $1 AND status = 'pending' "
             "AND (lease_until IS NULL OR lease_until < $3) RETURNING tip_id")
ZAP_TRIED = ("UPDATE micropay_zap_receipts SET status = $2, relays = $3, attempts = attempts + 1, next_at = $4, "
             "last_error = $5, lease_until = NULL, published_at = COALESCE(published_at, $6) WHERE tip_id = $1 AND status = 'pending'")


class TipRepository:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(self, t: Tip, max_per_client: int, max_pending: int) -> bool:
        """Insert `t` if its client holds fewer than `max_per_client` unpaid, unexpired tips
        and the store fewer than `max_pending`. True if inserted."""
        tx = await self.store.transaction([
            Step(LOCK, ("tips:pending",)),
            Step(TIP_ROOM, (t.client, t.created_at, max_per_client, max_pending), required=True),
            Step(ADD_TIP, (t.id, t.address, t.amount_msat, t.comment, t.zap_request, t.client, t.bolt11,
                           t.payment_hash, t.created_at, t.expires_at), required=True)])
        return tx.ok

    async def by_id(self, tip_id: str) -> Tip | None:
        row = await self.store.fetchrow(TIP_BY["id"], (tip_id,))
        return Tip.from_row(row) if row else None

    async def by_hash(self, payment_hash: str) -> Tip | None:
        row = await self.store.fetchrow(TIP_BY["payment_hash"], (payment_hash,))
        return Tip.from_row(row) if row else None

    async def mark_paid(self, tip: Tip, paid_at: int, received_msat: int, preimage: str, address: AddressConfig | None,
                        event: NewEvent, endpoints: Sequence[str], zap: tuple[str, str] | None) -> bool:
        """The tip paid, with its event and webhooks, its collaborators' shares (of what was
        received, by the exact split with carried remainders) and its zap receipt
        (event JSON, relays JSON): once. False if it already was paid."""
        now = event.created_at
        steps = [Step(MARK_TIP_PAID, (tip.payment_hash, paid_at, received_msat, preimage), required=True)]
        steps += event.steps(endpoints)
        if address is not None and address.splits:
            total = address.total_shares
            for k, s in enumerate(address.splits):
                key = (tip.address, s.destination, s.share, total)
                least = max(1, address.split_min_msat)
                steps += [Step(CARRY_ROW, key),
                          Step(CARRY_STEP, (*key, received_msat, least), required=True),
                          Step(ADD_SHARE, (tip.id, k, s.name, received_msat, address.split_max_fee_msat, now, *key,
                                           least))]
        if zap is not None:
            steps.append(Step(ADD_ZAP, (tip.id, zap[0], zap[1], now)))
        return (await self.store.transaction(steps)).ok

    async def expire_due(self, now: int, limit: int = 500) -> int:
        n = len(await self.store.query(EXPIRABLE_TIPS, (now, limit)))
        if n:
            await self.store.execute(EXPIRE_TIPS, (now, limit))
        return n

    async def purge(self, expired_before: int, limit: int = 1000) -> int:
        rows = await self.store.query("SELECT COUNT(*) FROM (SELECT id FROM micropay_tips WHERE status = 'expired' "
                                      "AND expires_at <= $1 LIMIT $2) AS t", (expired_before, limit))
        n = int(rows[0][0]) if rows else 0
        if n:
            await self.store.execute(PURGE_TIPS, (expired_before, limit))
        return n

    async def page(self, address: str, status: str, before_created_at: int, before_id: str,
                   limit: int) -> list[Tip]:
        rows = await self.store.query(LIST_TIPS, (address, status, before_created_at, before_id, limit))
        return [Tip.from_row(r) for r in rows]


class ShareRepository:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def of_tip(self, tip_id: str) -> list[Share]:
        return [Share.from_row(r) for r in await self.store.query(SHARES_OF, (tip_id,))]

    async def due(self, now: int, limit: int) -> list[Share]:
        return [Share.from_row(r) for r in await self.store.query(DUE_SHARES, (now, limit))]

    async def next_at(self) -> int | None:
        row = await self.store.fetchrow(NEXT_SHARE_AT)
        return _int(row[0]) if row else None

    async def claim(self, s: Share, lease_until: int, now: int) -> Share | None:
        """The share as the store holds it now, leased to us; None when it is not due, or
        another process holds it."""
        row = await self.store.fetchrow(CLAIM_SHARE, (s.tip_id, s.idx, lease_until, now))
        return Share.from_row(row) if row else None

    async def renew(self, s: Share, lease_until: int) -> None:
        await self.store.execute(RENEW_SHARE, (s.tip_id, s.idx, lease_until))

    async def begin_attempt(self, s: Share, attempt: int, invoice: str | None, payment_hash: str | None,
                            sendpays_start: int | None, now: int) -> Share | None:
        """Attempt `attempt` written as sending (from the attempt `s` holds); the share as it
        now is, or None when the row moved on meanwhile."""
        if not await self.store.query(BEGIN_ATTEMPT, (s.tip_id, s.idx, attempt, invoice, payment_hash,
                                                      sendpays_start, now, s.attempt)):
            return None
        return replace(s, status=ShareStatus.SENDING, attempt=attempt, invoice=invoice, payment_hash=payment_hash,
                       sendpays_start=sendpays_start, started_at=now, updated_at=now)

    async def retry_later(self, s: Share, attempt: int, next_at: int, error: str, now: int) -> None:
        """Nothing of attempt `attempt` is out: pending again, tried after next_at."""
        await self.store.execute(RETRY_SHARE, (s.tip_id, s.idx, next_at, error[:500], now, attempt, s.attempt))

    async def release(self, s: Share, next_at: int) -> None:
        await self.store.execute(RELEASE_SHARE, (s.tip_id, s.idx, next_at, s.attempt))

    async def finish(self, s: Share, status: ShareStatus, now: int, *, fee_msat: int | None = None,
                     preimage: str | None = None, error: str | None = None, attempts: int | None = None) -> bool:
        """Paid or failed, from the attempt `s` holds (`attempts`: how many were made, when
        the last one never got as far as being written)."""
        return bool(await self.store.query(FINISH_SHARE, (s.tip_id, s.idx, str(status), fee_msat, preimage,
                                                          error[:500] if error else None, now, s.attempt,
                                                          s.attempt if attempts is None else attempts)))


class ZapRepository:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def due(self, now: int, limit: int) -> list[ZapReceipt]:
        return [ZapReceipt(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), r[6], _int(r[7]))
                for r in await self.store.query(DUE_ZAPS, (now, limit))]

    async def of_tip(self, tip_id: str) -> ZapReceipt | None:
        r = await self.store.fetchrow(ZAP_OF, (tip_id,))
        return ZapReceipt(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), r[6], _int(r[7])) if r else None

    async def claim(self, tip_id: str, lease_until: int, now: int) -> bool:
        return bool(await self.store.query(CLAIM_ZAP, (tip_id, lease_until, now)))

    async def tried(self, tip_id: str, status: str, relays_left: str, next_at: int, error: str | None,
                    published_at: int | None) -> None:
        await self.store.execute(ZAP_TRIED, (tip_id, status, relays_left, next_at, error, published_at))
