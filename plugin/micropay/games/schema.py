"""The games component's tables: purchases, events and their webhook outbox, API keys,
payouts and the lock rows that serialize limits across processes. Their statements
live with games/repository.py; this is their history, one step per change (see
store/schema.py). A process that serves the purchases API opens its store with this
schema beside the core one."""
from __future__ import annotations

from ..store.schema import SERIAL_PK, Migration, Schema

_RELEASE_0_1_0 = (
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
)


GAMES_SCHEMA = Schema("games", (
    Migration(1, "the games tables of release 0.1.0", _RELEASE_0_1_0),
    Migration(2, "a payout keeps the fee cap it was created under, and a lease for whoever resumes it", (
        "ALTER TABLE micropay_payouts ADD COLUMN max_fee_msat BIGINT",
        "ALTER TABLE micropay_payouts ADD COLUMN lease_until BIGINT",
    )),
))
