"""The gate's repository: issued challenges (token + invoice), prepaid credits, and the
receipts of settled payments."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from .base import Step, Store, point


class ChallengeStatus(enum.StrEnum):
    PENDING = "pending"
    PAID = "paid"


@dataclass(frozen=True, slots=True)
class ChallengeRecord:
    """An issued token and its invoice, pending until paid or expired."""

    payment_hash: str
    token_id: str
    route_key: str
    client_key: str
    price_msat: int
    bolt11: str
    macaroon: str
    created_at: int
    expires_at: int
    credits: int | None = None
    paid_at: int | None = None
    received_msat: int | None = None

    @property
    def status(self) -> ChallengeStatus:
        return ChallengeStatus.PAID if self.paid_at is not None else ChallengeStatus.PENDING


_COLS = ("payment_hash, token_id, route_key, client_key, price_msat, bolt11, macaroon, "
         "created_at, expires_at, credits, paid_at, received_msat")
ADD = point(f"INSERT INTO micropay_challenges ({_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,NULL,NULL) "
            "ON CONFLICT (payment_hash) DO NOTHING")
GET = point(f"SELECT {_COLS} FROM micropay_challenges WHERE payment_hash = $1")
# This client's unpaid, unexpired challenges (a 402 reads PENDING_NEAR_BOUND instead, once
# a second; this one is for tools and tests).
COUNT_PENDING_OF = ("SELECT COUNT(*) FROM micropay_challenges WHERE client_key = $1 AND paid_at IS NULL "
                    "AND expires_at > $2")
COUNT_PENDING = "SELECT COUNT(*) FROM micropay_challenges WHERE paid_at IS NULL AND expires_at > $1"
PENDING_BY_CLIENT = ("SELECT client_key, COUNT(*) FROM micropay_challenges WHERE paid_at IS NULL "
                     "AND expires_at > $1 GROUP BY client_key")
# The same, in one statement: the store-wide count (the row with a NULL client), then only
# the clients holding at least $2 (the rest are many, and each one far from its bound).
PENDING_NEAR_BOUND = ("SELECT NULL, COUNT(*) FROM micropay_challenges WHERE paid_at IS NULL AND expires_at > $1 "
                      "UNION ALL "
                      "SELECT client_key, COUNT(*) FROM micropay_challenges WHERE paid_at IS NULL "
                      "AND expires_at > $1 GROUP BY client_key HAVING COUNT(*) >= $2")
MARK_PAID = point("UPDATE micropay_challenges SET paid_at = $2, received_msat = $3 "
                  "WHERE payment_hash = $1 AND paid_at IS NULL RETURNING payment_hash")
PURGE = "DELETE FROM micropay_challenges WHERE paid_at IS NULL AND expires_at < $1 RETURNING payment_hash"
# First use inserts (initial - 1); later uses decrement while > 0. No row back: exhausted.
DEBIT = point("INSERT INTO micropay_credits (token_id, remaining) VALUES ($1, $2 - 1) "
              "ON CONFLICT (token_id) DO UPDATE SET remaining = micropay_credits.remaining - 1 "
              "WHERE micropay_credits.remaining > 0 RETURNING remaining")
CONSUME_WHOLE = point("INSERT INTO micropay_credits (token_id, remaining) VALUES ($1, 0) "
                      "ON CONFLICT (token_id) DO NOTHING RETURNING remaining")
REFUND = point("UPDATE micropay_credits SET remaining = remaining + 1 WHERE token_id = $1")
UNCONSUME_WHOLE = point("DELETE FROM micropay_credits WHERE token_id = $1 AND remaining = 0")
REMAINING = point("SELECT remaining FROM micropay_credits WHERE token_id = $1")
ADD_RECEIPT = point("INSERT INTO micropay_receipts (payment_hash, receipt, created_at) VALUES ($1, $2, $3) "
                    "ON CONFLICT (payment_hash) DO NOTHING")


class L402Repository:
    def __init__(self, store: Store) -> None:
        self.store = store

    # -- challenges -------------------------------------------------------------
    async def add_challenge(self, ch: ChallengeRecord) -> None:
        await self.store.execute(ADD, (ch.payment_hash, ch.token_id, ch.route_key, ch.client_key, ch.price_msat,
                                       ch.bolt11, ch.macaroon, ch.created_at, ch.expires_at, ch.credits))

    async def get_challenge(self, payment_hash: str) -> ChallengeRecord | None:
        row = await self.store.fetchrow(GET, (payment_hash,))
        return ChallengeRecord(*row) if row else None

    async def count_pending_of(self, client_key: str, now: int) -> int:
        """How many unpaid, unexpired challenges this client holds."""
        row = await self.store.fetchrow(COUNT_PENDING_OF, (client_key, now))
        return int(row[0]) if row else 0

    async def count_pending(self, now: int) -> int:
        """Unpaid, unexpired challenges of all clients (reads every one of them: callers
        cache it, see challenger.PendingCounts)."""
        row = await self.store.fetchrow(COUNT_PENDING, (now,))
        return int(row[0]) if row else 0

    async def pending_by_client(self, now: int) -> dict[str, int]:
        """Unpaid, unexpired challenges per client that holds any (for tools and tests: a
        402 reads pending_near_bound instead, see challenger.PendingCounts)."""
        return {client: int(n) for client, n in await self.store.query(PENDING_BY_CLIENT, (now,))}

    async def pending_near_bound(self, now: int, at_least: int) -> tuple[int, dict[str, int]]:
        """Unpaid, unexpired challenges: how many in all, and per client for the clients
        that hold at least `at_least` of them (every client that holds any, for 1). One
        statement; the store counts every such challenge, but only the clients near their
        bound come back (callers cache it, see challenger.PendingCounts)."""
        total, of = 0, {}
        for client, n in await self.store.query(PENDING_NEAR_BOUND, (now, max(1, at_least))):
            if client is None:
                total = int(n)
            else:
                of[client] = int(n)
        return total, of

    async def add_challenges(self, records: list[ChallengeRecord]) -> None:
        """Several at once, in one transaction (one statement run for each)."""
        await self.store.transaction([Step(ADD, [(ch.payment_hash, ch.token_id, ch.route_key, ch.client_key,
                                                  ch.price_msat, ch.bolt11, ch.macaroon, ch.created_at,
                                                  ch.expires_at, ch.credits) for ch in records], many=True)])

    async def mark_paid(self, payment_hash: str, received_msat: int, paid_at: int) -> bool:
        """True the first time; False if already paid or unknown."""
        return await self.store.fetchrow(MARK_PAID, (payment_hash, paid_at, received_msat)) is not None

    async def purge_expired(self, before: int) -> int:
        """Delete unpaid challenges that expired before `before`. Returns how many."""
        return len(await self.store.query(PURGE, (before,)))

    # -- credits ----------------------------------------------------------------
    async def debit_credit(self, token_id: str, initial: int) -> int | None:
        """Spend one credit. Returns credits left, or None if none were left."""
        row = await self.store.fetchrow(DEBIT, (token_id, initial))
        return int(row[0]) if row else None

    async def consume_whole(self, token_id: str) -> bool:
        """Spend a token's purchase at once, if nothing of it was spent yet: True exactly
        once per token, across every process sharing the store (a Payment credential and
        the L402 token of the same invoice share this ledger)."""
        if len(token_id) != 64 or token_id.strip("0123456789abcdef"):
            return False
        return await self.store.fetchrow(CONSUME_WHOLE, (token_id,)) is not None

    async def give_back_whole(self, token_id: str) -> None:
        """Undo consume_whole for a request that could not be served: the purchase is
        unspent again (its Payment credential, or its L402 token, may be presented)."""
        await self.store.execute(UNCONSUME_WHOLE, (token_id,))

    async def refund_credit(self, token_id: str) -> None:
        """Give back one credit debited for a request that could not be served."""
        await self.store.execute(REFUND, (token_id,))

    async def credits_remaining(self, token_id: str) -> int | None:
        row = await self.store.fetchrow(REMAINING, (token_id,))
        return int(row[0]) if row else None

    # -- receipts of settled payments ---------------------------------------------
    async def add_receipt(self, payment_hash: str, receipt: str, created_at: int) -> None:
        await self.store.execute(ADD_RECEIPT, (payment_hash, receipt, created_at))
