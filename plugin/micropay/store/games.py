"""Tables and statements for in-app purchases, events, webhooks, API keys and payouts.

State changes that other parties must hear about are written in one transaction
with their event and one webhook delivery row per endpoint (the transactional
outbox): a crash either keeps all of them or none.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .base import Step

SERIAL_PK = "SERIAL_PK"   # each adapter substitutes its auto-increment primary key

GAMES_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS micropay_purchases (
        id TEXT PRIMARY KEY,
        idempotency_key TEXT NOT NULL UNIQUE,
        sku TEXT NOT NULL,
        player_id TEXT NOT NULL,
        price_msat BIGINT NOT NULL,
        metadata TEXT NOT NULL,
        status TEXT NOT NULL,
        bolt11 TEXT NOT NULL,
        payment_hash TEXT NOT NULL UNIQUE,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        paid_at BIGINT,
        received_msat BIGINT,
        preimage TEXT,
        receipt TEXT)""",
    """CREATE INDEX IF NOT EXISTS micropay_purchases_player
        ON micropay_purchases (player_id, sku, status)""",
    """CREATE INDEX IF NOT EXISTS micropay_purchases_listing
        ON micropay_purchases (created_at, id)""",
    """CREATE INDEX IF NOT EXISTS micropay_purchases_pending
        ON micropay_purchases (expires_at) WHERE status = 'pending'""",
    f"""CREATE TABLE IF NOT EXISTS micropay_events (
        id {SERIAL_PK},
        dedupe_key TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        subject_id TEXT NOT NULL,
        player_id TEXT NOT NULL,
        data TEXT NOT NULL,
        created_at BIGINT NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS micropay_events_subject ON micropay_events (subject_id, id)""",
    """CREATE TABLE IF NOT EXISTS micropay_webhook_deliveries (
        event_id BIGINT NOT NULL,
        endpoint TEXT NOT NULL,
        subject_id TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        next_at BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        last_attempt_at BIGINT,
        last_error TEXT,
        delivered_at BIGINT,
        PRIMARY KEY (event_id, endpoint))""",
    """CREATE INDEX IF NOT EXISTS micropay_webhook_due
        ON micropay_webhook_deliveries (next_at) WHERE status = 'pending'""",
    """CREATE INDEX IF NOT EXISTS micropay_webhook_order
        ON micropay_webhook_deliveries (endpoint, subject_id, event_id)""",
    """CREATE TABLE IF NOT EXISTS micropay_api_keys (
        kid TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        key_hash TEXT NOT NULL,
        scopes TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        revoked_at BIGINT)""",
    """CREATE TABLE IF NOT EXISTS micropay_payouts (
        id TEXT PRIMARY KEY,
        idempotency_key TEXT NOT NULL UNIQUE,
        player_id TEXT NOT NULL,
        destination TEXT NOT NULL,
        invoice TEXT,
        payment_hash TEXT,
        amount_msat BIGINT NOT NULL,
        fee_msat BIGINT,
        status TEXT NOT NULL,
        error TEXT,
        day TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        preimage TEXT)""",
    """CREATE INDEX IF NOT EXISTS micropay_payouts_day ON micropay_payouts (day, player_id)""",
    # One row per name; updating it inside a transaction holds a row lock until commit,
    # which serializes check-then-insert sequences (limits, caps) across processes.
    """CREATE TABLE IF NOT EXISTS micropay_locks (
        name TEXT PRIMARY KEY,
        n BIGINT NOT NULL)""",
]

_P_COLS = ("id, idempotency_key, sku, player_id, price_msat, metadata, status, bolt11, payment_hash, "
           "created_at, expires_at, paid_at, received_msat, preimage, receipt")
_E_COLS = "id, dedupe_key, type, subject_id, player_id, data, created_at"
_D_COLS = ("d.event_id, d.endpoint, d.subject_id, d.status, d.attempts, d.next_at, d.created_at, "
           "d.last_attempt_at, d.last_error, d.delivered_at, e.type, e.data, e.created_at")
_PO_COLS = ("id, idempotency_key, player_id, destination, invoice, payment_hash, amount_msat, fee_msat, "
            "status, error, day, created_at, updated_at, preimage")

GSQL = {
    "lock": "INSERT INTO micropay_locks (name, n) VALUES ($1, 1) ON CONFLICT (name) "
            "DO UPDATE SET n = micropay_locks.n + 1 RETURNING n",
    # -- purchases
    "purchase_slots": "SELECT 1 WHERE (SELECT COUNT(*) FROM micropay_purchases WHERE player_id = $1 "
                      "AND sku = $2 AND (status = 'paid' OR (status = 'pending' AND expires_at > $3))) "
                      "< CAST($4 AS BIGINT)",
    "add_purchase": f"INSERT INTO micropay_purchases ({_P_COLS}) VALUES "
                    "($1,$2,$3,$4,$5,$6,'pending',$7,$8,$9,$10,NULL,NULL,NULL,NULL) "
                    "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
    "purchase_by_id": f"SELECT {_P_COLS} FROM micropay_purchases WHERE id = $1",
    "purchase_by_key": f"SELECT {_P_COLS} FROM micropay_purchases WHERE idempotency_key = $1",
    "purchase_by_hash": f"SELECT {_P_COLS} FROM micropay_purchases WHERE payment_hash = $1",
    "list_purchases": f"SELECT {_P_COLS} FROM micropay_purchases WHERE ($1 = '' OR player_id = $1) "
                      "AND ($2 = '' OR sku = $2) AND ($3 = '' OR status = $3) "
                      "AND (created_at > $4 OR (created_at = $4 AND id > $5)) "
                      "ORDER BY created_at, id LIMIT $6",
    # A settled invoice is paid even if the sweeper already called it expired.
    "mark_purchase_paid": "UPDATE micropay_purchases SET status = 'paid', paid_at = $2, received_msat = $3, "
                          "preimage = $4, receipt = $5 WHERE payment_hash = $1 AND status <> 'paid' "
                          "RETURNING id",
    "expirable": "SELECT id FROM micropay_purchases WHERE status = 'pending' AND expires_at <= $1 "
                 "ORDER BY expires_at LIMIT $2",
    "mark_purchase_expired": "UPDATE micropay_purchases SET status = 'expired' WHERE id = $1 "
                             "AND status = 'pending' AND expires_at <= $2 RETURNING id",
    # -- events and the webhook outbox
    "add_event": "INSERT INTO micropay_events (dedupe_key, type, subject_id, player_id, data, created_at) "
                 "VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
    "add_delivery": "INSERT INTO micropay_webhook_deliveries (event_id, endpoint, subject_id, status, "
                    "attempts, next_at, created_at) SELECT id, CAST($2 AS TEXT), subject_id, 'pending', 0, "
                    "CAST($3 AS BIGINT), CAST($3 AS BIGINT) FROM micropay_events WHERE dedupe_key = $1 "
                    "ON CONFLICT (event_id, endpoint) DO NOTHING",
    "events_after": f"SELECT {_E_COLS} FROM micropay_events WHERE id > $1 AND ($2 = '' OR subject_id = $2) "
                    "ORDER BY id LIMIT $3",
    "last_event_id": "SELECT COALESCE(MAX(id), 0) FROM micropay_events",
    # Due, and no earlier delivery for the same endpoint and subject still pending:
    # deliveries for one purchase go out in order.
    "due_deliveries": f"SELECT {_D_COLS} FROM micropay_webhook_deliveries d JOIN micropay_events e "
                      "ON e.id = d.event_id WHERE d.status = 'pending' AND d.next_at <= $1 AND NOT EXISTS "
                      "(SELECT 1 FROM micropay_webhook_deliveries p WHERE p.endpoint = d.endpoint "
                      "AND p.subject_id = d.subject_id AND p.event_id < d.event_id AND p.status = 'pending') "
                      "ORDER BY d.event_id LIMIT $2",
    # Compare-and-set on next_at: of several deliverers (processes sharing the store), one
    # wins the row; a crash mid-send makes it due again when the lease runs out.
    "claim_delivery": "UPDATE micropay_webhook_deliveries SET next_at = $4 WHERE event_id = $1 "
                      "AND endpoint = $2 AND status = 'pending' AND next_at = $3 RETURNING event_id",
    "next_due": "SELECT MIN(d.next_at) FROM micropay_webhook_deliveries d WHERE d.status = 'pending' "
                "AND NOT EXISTS (SELECT 1 FROM micropay_webhook_deliveries p WHERE p.endpoint = d.endpoint "
                "AND p.subject_id = d.subject_id AND p.event_id < d.event_id AND p.status = 'pending')",
    "delivery_done": "UPDATE micropay_webhook_deliveries SET status = 'delivered', attempts = attempts + 1, "
                     "last_attempt_at = $3, delivered_at = $3, last_error = NULL "
                     "WHERE event_id = $1 AND endpoint = $2 AND status = 'pending'",
    "delivery_retry": "UPDATE micropay_webhook_deliveries SET attempts = attempts + 1, last_attempt_at = $3, "
                      "next_at = $4, last_error = $5, status = $6 "
                      "WHERE event_id = $1 AND endpoint = $2 AND status = 'pending'",
    "list_deliveries": f"SELECT {_D_COLS} FROM micropay_webhook_deliveries d JOIN micropay_events e "
                       "ON e.id = d.event_id WHERE ($1 = '' OR d.status = $1) AND ($2 = '' OR d.endpoint = $2) "
                       "AND ($3 = '' OR d.subject_id = $3) ORDER BY d.event_id DESC LIMIT $4",
    "get_deliveries": f"SELECT {_D_COLS} FROM micropay_webhook_deliveries d JOIN micropay_events e "
                      "ON e.id = d.event_id WHERE d.event_id = $1 ORDER BY d.endpoint",
    "redeliver": "UPDATE micropay_webhook_deliveries SET status = 'pending', next_at = $3 "
                 "WHERE event_id = $1 AND ($2 = '' OR endpoint = $2) RETURNING endpoint",
    # -- API keys
    "add_api_key": "INSERT INTO micropay_api_keys (kid, name, key_hash, scopes, created_at, revoked_at) "
                   "VALUES ($1,$2,$3,$4,$5,NULL)",
    "get_api_key": "SELECT kid, name, key_hash, scopes, created_at, revoked_at FROM micropay_api_keys "
                   "WHERE kid = $1",
    "list_api_keys": "SELECT kid, name, key_hash, scopes, created_at, revoked_at FROM micropay_api_keys "
                     "ORDER BY created_at, kid",
    "revoke_api_key": "UPDATE micropay_api_keys SET revoked_at = $2 WHERE kid = $1 AND revoked_at IS NULL "
                      "RETURNING kid",
    # -- payouts (caps count everything not failed)
    "payout_player_room": "SELECT 1 WHERE (SELECT COALESCE(SUM(amount_msat), 0) FROM micropay_payouts "
                          "WHERE day = $1 AND player_id = $2 AND status <> 'failed') + CAST($3 AS BIGINT) "
                          "<= CAST($4 AS BIGINT)",
    "payout_day_room": "SELECT 1 WHERE (SELECT COALESCE(SUM(amount_msat), 0) FROM micropay_payouts "
                       "WHERE day = $1 AND status <> 'failed') + CAST($2 AS BIGINT) <= CAST($3 AS BIGINT)",
    "payout_totals": "SELECT (SELECT COALESCE(SUM(amount_msat), 0) FROM micropay_payouts WHERE day = $1 "
                     "AND player_id = $2 AND status <> 'failed'), (SELECT COALESCE(SUM(amount_msat), 0) "
                     "FROM micropay_payouts WHERE day = $1 AND status <> 'failed')",
    "add_payout": f"INSERT INTO micropay_payouts ({_PO_COLS}) VALUES "
                  "($1,$2,$3,$4,$5,$6,$7,NULL,'sending',NULL,$8,$9,$9,NULL) "
                  "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
    "payout_by_id": f"SELECT {_PO_COLS} FROM micropay_payouts WHERE id = $1",
    "payout_by_key": f"SELECT {_PO_COLS} FROM micropay_payouts WHERE idempotency_key = $1",
    "payouts_sending": f"SELECT {_PO_COLS} FROM micropay_payouts WHERE status = 'sending' ORDER BY created_at",
    "set_payout_invoice": "UPDATE micropay_payouts SET invoice = $2, payment_hash = $3, updated_at = $4 "
                          "WHERE id = $1 AND status = 'sending'",
    "finish_payout": "UPDATE micropay_payouts SET status = $2, fee_msat = $3, preimage = $4, error = $5, "
                     "updated_at = $6 WHERE id = $1 AND status = 'sending' RETURNING id",
}


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


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to write together with the state change that caused it."""

    dedupe_key: str
    type: str
    subject_id: str
    player_id: str
    data: dict[str, Any]
    created_at: int

    def steps(self, endpoints: list[str]) -> list[Step]:
        out = [Step(GSQL["add_event"], (self.dedupe_key, self.type, self.subject_id, self.player_id,
                                        json.dumps(self.data, sort_keys=True, separators=(",", ":")),
                                        self.created_at))]
        out += [Step(GSQL["add_delivery"], (self.dedupe_key, ep, self.created_at)) for ep in endpoints]
        return out


DELIVERY_FIELDS = ("event_id", "endpoint", "subject_id", "status", "attempts", "next_at", "created_at",
                   "last_attempt_at", "last_error", "delivered_at", "type", "data", "event_created_at")
PURCHASE_FIELDS = ("id", "idempotency_key", "sku", "player_id", "price_msat", "metadata", "status", "bolt11",
                   "payment_hash", "created_at", "expires_at", "paid_at", "received_msat", "preimage",
                   "receipt")
PAYOUT_FIELDS = ("id", "idempotency_key", "player_id", "destination", "invoice", "payment_hash",
                 "amount_msat", "fee_msat", "status", "error", "day", "created_at", "updated_at", "preimage")


def row_dict(fields: tuple[str, ...], row: tuple[Any, ...] | None) -> dict[str, Any] | None:
    return dict(zip(fields, row)) if row is not None else None
