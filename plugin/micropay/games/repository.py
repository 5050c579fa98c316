"""The purchases API's repositories: purchases, events and the webhook outbox, API keys
and payouts, each as named methods over the store returning frozen dataclasses.

State changes that other parties must hear about are written in one transaction with
their event and one webhook delivery row per endpoint (the transactional outbox): a
crash either keeps all of them or none. Limits that span rows (a player's purchases of
an item, the daily payout caps) are checked and acted on in one transaction under a
lock row, so concurrent requests, in one process or several, cannot overshoot them.
"""
from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from ..store.base import Step, Store


class PurchaseStatus(enum.StrEnum):
    PENDING = "pending"
    PAID = "paid"
    EXPIRED = "expired"


class PayoutStatus(enum.StrEnum):
    SENDING = "sending"
    PAID = "paid"
    FAILED = "failed"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


# -- purchases ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Purchase:
    id: str
    idempotency_key: str
    sku: str
    player_id: str
    price_msat: int
    metadata: str            # canonical JSON text
    status: PurchaseStatus
    bolt11: str
    payment_hash: str
    created_at: int
    expires_at: int
    paid_at: int | None = None
    received_msat: int | None = None
    preimage: str | None = None
    receipt: str | None = None

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> "Purchase":
        return cls(r[0], r[1], r[2], r[3], int(r[4]), r[5], PurchaseStatus(r[6]), r[7], r[8], int(r[9]),
                   int(r[10]), _int(r[11]), _int(r[12]), r[13], r[14])


_P_COLS = ("id, idempotency_key, sku, player_id, price_msat, metadata, status, bolt11, payment_hash, "
           "created_at, expires_at, paid_at, received_msat, preimage, receipt")
LOCK = ("INSERT INTO micropay_locks (name, n) VALUES ($1, 1) ON CONFLICT (name) "
        "DO UPDATE SET n = micropay_locks.n + 1 RETURNING n")
PURCHASE_SLOTS = ("SELECT 1 WHERE (SELECT COUNT(*) FROM micropay_purchases WHERE player_id = $1 "
                  "AND sku = $2 AND (status = 'paid' OR (status = 'pending' AND expires_at > $3))) "
                  "< CAST($4 AS BIGINT)")
ADD_PURCHASE = (f"INSERT INTO micropay_purchases ({_P_COLS}) VALUES "
                "($1,$2,$3,$4,$5,$6,'pending',$7,$8,$9,$10,NULL,NULL,NULL,NULL) "
                "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id")
PURCHASE_BY = {field: f"SELECT {_P_COLS} FROM micropay_purchases WHERE {field} = $1"
               for field in ("id", "idempotency_key", "payment_hash")}
LIST_PURCHASES = (f"SELECT {_P_COLS} FROM micropay_purchases WHERE ($1 = '' OR player_id = $1) "
                  "AND ($2 = '' OR sku = $2) AND ($3 = '' OR status = $3) "
                  "AND (created_at > $4 OR (created_at = $4 AND id > $5)) ORDER BY created_at, id LIMIT $6")
# A settled invoice is paid even if the sweeper already called it expired.
MARK_PURCHASE_PAID = ("UPDATE micropay_purchases SET status = 'paid', paid_at = $2, received_msat = $3, "
                      "preimage = $4, receipt = $5 WHERE payment_hash = $1 AND status <> 'paid' RETURNING id")
EXPIRABLE = ("SELECT id FROM micropay_purchases WHERE status = 'pending' AND expires_at <= $1 "
             "ORDER BY expires_at LIMIT $2")
MARK_PURCHASE_EXPIRED = ("UPDATE micropay_purchases SET status = 'expired' WHERE id = $1 "
                         "AND status = 'pending' AND expires_at <= $2 RETURNING id")


# -- events and the webhook outbox ----------------------------------------------------
@dataclass(frozen=True, slots=True)
class EventRecord:
    id: int
    dedupe_key: str
    type: str
    subject_id: str
    player_id: str
    data: str          # JSON text
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "created_at": self.created_at,
                "data": json.loads(self.data)}


ADD_EVENT = ("INSERT INTO micropay_events (dedupe_key, type, subject_id, player_id, data, created_at) "
             "VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (dedupe_key) DO NOTHING RETURNING id")
ADD_DELIVERY = ("INSERT INTO micropay_webhook_deliveries (event_id, endpoint, subject_id, status, "
                "attempts, next_at, created_at) SELECT id, CAST($2 AS TEXT), subject_id, 'pending', 0, "
                "CAST($3 AS BIGINT), CAST($3 AS BIGINT) FROM micropay_events WHERE dedupe_key = $1 "
                "ON CONFLICT (event_id, endpoint) DO NOTHING")


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to write together with the state change that caused it, and one webhook
    delivery per endpoint that wants its type."""

    dedupe_key: str
    type: str
    subject_id: str
    player_id: str
    data: dict[str, Any]
    created_at: int

    def steps(self, endpoints: Sequence[str]) -> list[Step]:
        out = [Step(ADD_EVENT, (self.dedupe_key, self.type, self.subject_id, self.player_id,
                                json.dumps(self.data, sort_keys=True, separators=(",", ":")), self.created_at))]
        out += [Step(ADD_DELIVERY, (self.dedupe_key, ep, self.created_at)) for ep in endpoints]
        return out


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event's webhook to one endpoint, with the event it carries."""

    event_id: int
    endpoint: str
    subject_id: str
    status: DeliveryStatus
    attempts: int
    next_at: int
    created_at: int
    last_attempt_at: int | None
    last_error: str | None
    delivered_at: int | None
    type: str
    data: str
    event_created_at: int

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> "Delivery":
        return cls(int(r[0]), r[1], r[2], DeliveryStatus(r[3]), int(r[4]), int(r[5]), int(r[6]), _int(r[7]),
                   r[8], _int(r[9]), r[10], r[11], int(r[12]))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_E_COLS = "id, dedupe_key, type, subject_id, player_id, data, created_at"
_D_COLS = ("d.event_id, d.endpoint, d.subject_id, d.status, d.attempts, d.next_at, d.created_at, "
           "d.last_attempt_at, d.last_error, d.delivered_at, e.type, e.data, e.created_at")
EVENTS_AFTER = (f"SELECT {_E_COLS} FROM micropay_events WHERE id > $1 AND ($2 = '' OR subject_id = $2) "
                "ORDER BY id LIMIT $3")
LAST_EVENT_ID = "SELECT COALESCE(MAX(id), 0) FROM micropay_events"
# Due, and no earlier delivery for the same endpoint and subject still pending:
# deliveries for one purchase go out in order.
DUE_DELIVERIES = (f"SELECT {_D_COLS} FROM micropay_webhook_deliveries d JOIN micropay_events e "
                  "ON e.id = d.event_id WHERE d.status = 'pending' AND d.next_at <= $1 AND NOT EXISTS "
                  "(SELECT 1 FROM micropay_webhook_deliveries p WHERE p.endpoint = d.endpoint "
                  "AND p.subject_id = d.subject_id AND p.event_id < d.event_id AND p.status = 'pending') "
                  "ORDER BY d.event_id LIMIT $2")
# Compare-and-set on next_at: of several deliverers (processes sharing the store), one
# wins the row; a crash mid-send makes it due again when the lease runs out.
CLAIM_DELIVERY = ("UPDATE micropay_webhook_deliveries SET next_at = $4 WHERE event_id = $1 "
                  "AND endpoint = $2 AND status = 'pending' AND next_at = $3 RETURNING event_id")
NEXT_DUE = ("SELECT MIN(d.next_at) FROM micropay_webhook_deliveries d WHERE d.status = 'pending' "
            "AND NOT EXISTS (SELECT 1 FROM micropay_webhook_deliveries p WHERE p.endpoint = d.endpoint "
            "AND p.subject_id = d.subject_id AND p.event_id < d.event_id AND p.status = 'pending')")
DELIVERY_DONE = ("UPDATE micropay_webhook_deliveries SET status = 'delivered', attempts = attempts + 1, "
                 "last_attempt_at = $3, delivered_at = $3, last_error = NULL "
                 "WHERE event_id = $1 AND endpoint = $2 AND status = 'pending'")
DELIVERY_RETRY = ("UPDATE micropay_webhook_deliveries SET attempts = attempts + 1, last_attempt_at = $3, "
                  "next_at = $4, last_error = $5, status = $6 "
                  "WHERE event_id = $1 AND endpoint = $2 AND status = 'pending'")
LIST_DELIVERIES = (f"SELECT {_D_COLS} FROM micropay_webhook_deliveries d JOIN micropay_events e "
                   "ON e.id = d.event_id WHERE ($1 = '' OR d.status = $1) AND ($2 = '' OR d.endpoint = $2) "
                   "AND ($3 = '' OR d.subject_id = $3) ORDER BY d.event_id DESC LIMIT $4")
EVENT_DELIVERIES = (f"SELECT {_D_COLS} FROM micropay_webhook_deliveries d JOIN micropay_events e "
                    "ON e.id = d.event_id WHERE d.event_id = $1 ORDER BY d.endpoint")
REDELIVER = ("UPDATE micropay_webhook_deliveries SET status = 'pending', next_at = $3 "
             "WHERE event_id = $1 AND ($2 = '' OR endpoint = $2) RETURNING endpoint")


# -- API keys ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StoredApiKey:
    kid: str
    name: str
    key_hash: str            # SHA-256 of the secret, hex
    scopes: frozenset[str]
    created_at: int
    revoked_at: int | None

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> "StoredApiKey":
        return cls(r[0], r[1], r[2], frozenset(r[3].split()), int(r[4]), _int(r[5]))


_K_COLS = "kid, name, key_hash, scopes, created_at, revoked_at"
ADD_API_KEY = f"INSERT INTO micropay_api_keys ({_K_COLS}) VALUES ($1,$2,$3,$4,$5,NULL)"
GET_API_KEY = f"SELECT {_K_COLS} FROM micropay_api_keys WHERE kid = $1"
LIST_API_KEYS = f"SELECT {_K_COLS} FROM micropay_api_keys ORDER BY created_at, kid"
REVOKE_API_KEY = "UPDATE micropay_api_keys SET revoked_at = $2 WHERE kid = $1 AND revoked_at IS NULL RETURNING kid"


# -- payouts -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Payout:
    id: str
    idempotency_key: str
    player_id: str
    destination: str
    invoice: str | None
    payment_hash: str | None
    amount_msat: int
    fee_msat: int | None
    status: PayoutStatus
    error: str | None
    day: str
    created_at: int
    updated_at: int
    preimage: str | None
    max_fee_msat: int | None     # None: made before 0.2, when payouts had no stored fee cap
    lease_until: int | None

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> "Payout":
        return cls(r[0], r[1], r[2], r[3], r[4], r[5], int(r[6]), _int(r[7]), PayoutStatus(r[8]), r[9], r[10],
                   int(r[11]), int(r[12]), r[13], _int(r[14]), _int(r[15]))


class CapReached(enum.StrEnum):
    PER_PLAYER_DAY = "per_player_day"
    PER_DAY = "per_day"


_PO_COLS = ("id, idempotency_key, player_id, destination, invoice, payment_hash, amount_msat, fee_msat, "
            "status, error, day, created_at, updated_at, preimage, max_fee_msat, lease_until")
# Caps count every payout that is not failed.
PAYOUT_PLAYER_ROOM = ("SELECT 1 WHERE (SELECT COALESCE(SUM(amount_msat), 0) FROM micropay_payouts "
                      "WHERE day = $1 AND player_id = $2 AND status <> 'failed') + CAST($3 AS BIGINT) "
                      "<= CAST($4 AS BIGINT)")
PAYOUT_DAY_ROOM = ("SELECT 1 WHERE (SELECT COALESCE(SUM(amount_msat), 0) FROM micropay_payouts "
                   "WHERE day = $1 AND status <> 'failed') + CAST($2 AS BIGINT) <= CAST($3 AS BIGINT)")
PAYOUT_TOTALS = ("SELECT (SELECT COALESCE(SUM(amount_msat), 0) FROM micropay_payouts WHERE day = $1 "
                 "AND player_id = $2 AND status <> 'failed'), (SELECT COALESCE(SUM(amount_msat), 0) "
                 "FROM micropay_payouts WHERE day = $1 AND status <> 'failed')")
ADD_PAYOUT = (f"INSERT INTO micropay_payouts ({_PO_COLS}) VALUES "
              "($1,$2,$3,$4,$5,$6,$7,NULL,'sending',NULL,$8,$9,$9,NULL,$10,$11) "
              "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id")
PAYOUT_BY = {field: f"SELECT {_PO_COLS} FROM micropay_payouts WHERE {field} = $1"
             for field in ("id", "idempotency_key")}
PAYOUTS_SENDING = (f"SELECT {_PO_COLS} FROM micropay_payouts WHERE status = 'sending' "
                   "AND (lease_until IS NULL OR lease_until < $1) ORDER BY created_at")
# Whoever acts on a payout in flight holds its lease: of several processes sharing the
# store, one at a time; a crash frees it when the lease runs out.
CLAIM_PAYOUT = ("UPDATE micropay_payouts SET lease_until = $2 WHERE id = $1 AND status = 'sending' "
                "AND (lease_until IS NULL OR lease_until < $3) RETURNING id")
RENEW_PAYOUT_LEASE = "UPDATE micropay_payouts SET lease_until = $2 WHERE id = $1 AND status = 'sending'"
SET_PAYOUT_INVOICE = ("UPDATE micropay_payouts SET invoice = $2, payment_hash = $3, updated_at = $4 "
                      "WHERE id = $1 AND status = 'sending'")
FINISH_PAYOUT = ("UPDATE micropay_payouts SET status = $2, fee_msat = $3, preimage = $4, error = $5, "
                 "updated_at = $6 WHERE id = $1 AND status = 'sending' RETURNING id")


# -- the repositories ------------------------------------------------------------------
class PurchaseRepository:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def _one(self, field: str, value: str) -> Purchase | None:
        row = await self.store.fetchrow(PURCHASE_BY[field], (value,))
        return Purchase.from_row(row) if row else None

    async def by_id(self, purchase_id: str) -> Purchase | None:
        return await self._one("id", purchase_id)

    async def by_key(self, idempotency_key: str) -> Purchase | None:
        return await self._one("idempotency_key", idempotency_key)

    async def by_hash(self, payment_hash: str) -> Purchase | None:
        return await self._one("payment_hash", payment_hash)

    async def add(self, p: Purchase, now: int, max_per_player: int) -> bool:
        """Insert `p` if its player holds fewer than `max_per_player` paid or live
        purchases of its sku and its idempotency key is new. True if inserted."""
        tx = await self.store.transaction([
            Step(LOCK, (f"purchase:{p.player_id}:{p.sku}",)),
            Step(PURCHASE_SLOTS, (p.player_id, p.sku, now, max_per_player), required=True),
            Step(ADD_PURCHASE, (p.id, p.idempotency_key, p.sku, p.player_id, p.price_msat, p.metadata, p.bolt11,
                                p.payment_hash, p.created_at, p.expires_at)),
        ])
        return tx.ok and bool(tx.rows[2])

    async def page(self, player_id: str, sku: str, status: str, after_created_at: int, after_id: str,
                   limit: int) -> list[Purchase]:
        rows = await self.store.query(LIST_PURCHASES, (player_id, sku, status, after_created_at, after_id, limit))
        return [Purchase.from_row(r) for r in rows]

    async def mark_paid(self, payment_hash: str, paid_at: int, received_msat: int, preimage: str, receipt: str,
                        event: NewEvent, endpoints: Sequence[str]) -> bool:
        """Paid, with its event and webhooks, once. False if it already was."""
        tx = await self.store.transaction(
            [Step(MARK_PURCHASE_PAID, (payment_hash, paid_at, received_msat, preimage, receipt), required=True)]
            + event.steps(endpoints))
        return tx.ok

    async def expirable(self, now: int, limit: int) -> list[str]:
        return [r[0] for r in await self.store.query(EXPIRABLE, (now, limit))]

    async def mark_expired(self, purchase_id: str, now: int, event: NewEvent, endpoints: Sequence[str]) -> bool:
        tx = await self.store.transaction([Step(MARK_PURCHASE_EXPIRED, (purchase_id, now), required=True)]
                                          + event.steps(endpoints))
        return tx.ok


class EventRepository:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def after(self, after_id: int, subject_id: str = "", limit: int = 100) -> list[EventRecord]:
        rows = await self.store.query(EVENTS_AFTER, (after_id, subject_id, limit))
        return [EventRecord(int(r[0]), r[1], r[2], r[3], r[4], r[5], int(r[6])) for r in rows]

    async def last_id(self) -> int:
        return int((await self.store.query(LAST_EVENT_ID))[0][0])


class OutboxRepository:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def due(self, now: int, limit: int) -> list[Delivery]:
        return [Delivery.from_row(r) for r in await self.store.query(DUE_DELIVERIES, (now, limit))]

    async def claim(self, d: Delivery, lease_until: int) -> bool:
        """Take a due delivery for this process until `lease_until` (False: another took it)."""
        return bool(await self.store.query(CLAIM_DELIVERY, (d.event_id, d.endpoint, d.next_at, lease_until)))

    async def delivered(self, d: Delivery, at: int) -> None:
        await self.store.execute(DELIVERY_DONE, (d.event_id, d.endpoint, at))

    async def attempt_failed(self, d: Delivery, at: int, next_at: int, error: str, give_up: bool) -> None:
        status = DeliveryStatus.FAILED if give_up else DeliveryStatus.PENDING
        await self.store.execute(DELIVERY_RETRY, (d.event_id, d.endpoint, at, next_at, error, str(status)))

    async def next_due_at(self) -> int | None:
        row = await self.store.fetchrow(NEXT_DUE)
        return None if row is None or row[0] is None else int(row[0])

    async def listing(self, status: str = "", endpoint: str = "", subject: str = "",
                      limit: int = 50) -> list[Delivery]:
        rows = await self.store.query(LIST_DELIVERIES, (status, endpoint, subject, limit))
        return [Delivery.from_row(r) for r in rows]

    async def of_event(self, event_id: int) -> list[Delivery]:
        return [Delivery.from_row(r) for r in await self.store.query(EVENT_DELIVERIES, (event_id,))]

    async def redeliver(self, event_id: int, endpoint: str = "", now: int = 0) -> list[str]:
        return [r[0] for r in await self.store.query(REDELIVER, (event_id, endpoint, now))]


class ApiKeyRepository:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(self, kid: str, name: str, key_hash: str, scopes: frozenset[str], created_at: int) -> None:
        await self.store.execute(ADD_API_KEY, (kid, name, key_hash, " ".join(sorted(scopes)), created_at))

    async def get(self, kid: str) -> StoredApiKey | None:
        row = await self.store.fetchrow(GET_API_KEY, (kid,))
        return StoredApiKey.from_row(row) if row else None

    async def all(self) -> list[StoredApiKey]:
        return [StoredApiKey.from_row(r) for r in await self.store.query(LIST_API_KEYS)]

    async def revoke(self, kid: str, now: int) -> bool:
        return bool(await self.store.query(REVOKE_API_KEY, (kid, now)))


class PayoutRepository:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def _one(self, field: str, value: str) -> Payout | None:
        row = await self.store.fetchrow(PAYOUT_BY[field], (value,))
        return Payout.from_row(row) if row else None

    async def by_id(self, payout_id: str) -> Payout | None:
        return await self._one("id", payout_id)

    async def by_key(self, idempotency_key: str) -> Payout | None:
        return await self._one("idempotency_key", idempotency_key)

    async def reserve(self, p: Payout, per_player_day_msat: int, per_day_msat: int) -> CapReached | bool:
        """Insert `p` (status sending) if both daily caps have room for it, in one
        transaction under the payouts lock. True if inserted; False if its idempotency
        key exists already; the cap that has no room otherwise."""
        tx = await self.store.transaction([
            Step(LOCK, ("payouts",)),
            Step(PAYOUT_PLAYER_ROOM, (p.day, p.player_id, p.amount_msat, per_player_day_msat), required=True),
            Step(PAYOUT_DAY_ROOM, (p.day, p.amount_msat, per_day_msat), required=True),
            Step(ADD_PAYOUT, (p.id, p.idempotency_key, p.player_id, p.destination, p.invoice, p.payment_hash,
                              p.amount_msat, p.day, p.created_at, p.max_fee_msat, p.lease_until)),
        ])
        if not tx.ok:
            return CapReached.PER_PLAYER_DAY if tx.failed_step == 1 else CapReached.PER_DAY
        return bool(tx.rows[3])

    async def totals(self, day: str, player_id: str) -> tuple[int, int]:
        """What counts against the caps on `day`: (this player's, everyone's)."""
        player, everyone = (await self.store.query(PAYOUT_TOTALS, (day, player_id)))[0]
        return int(player), int(everyone)

    async def sending(self, now: int) -> list[Payout]:
        """Payouts in flight whose lease has run out."""
        return [Payout.from_row(r) for r in await self.store.query(PAYOUTS_SENDING, (now,))]

    async def claim(self, payout_id: str, lease_until: int, now: int) -> bool:
        return bool(await self.store.query(CLAIM_PAYOUT, (payout_id, lease_until, now)))

    async def renew_lease(self, payout_id: str, lease_until: int) -> None:
        await self.store.execute(RENEW_PAYOUT_LEASE, (payout_id, lease_until))

    async def set_invoice(self, payout_id: str, invoice: str, payment_hash: str, now: int) -> None:
        await self.store.execute(SET_PAYOUT_INVOICE, (payout_id, invoice, payment_hash, now))

    async def finish(self, payout_id: str, status: PayoutStatus, fee_msat: int | None, preimage: str | None,
                     error: str | None, now: int, event: NewEvent, endpoints: Sequence[str]) -> bool:
        """Paid or failed, with its event and webhooks, once."""
        tx = await self.store.transaction(
            [Step(FINISH_PAYOUT, (payout_id, str(status), fee_msat, preimage, error, now), required=True)]
            + event.steps(endpoints))
        return tx.ok
