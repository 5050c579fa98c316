"""The creators component's tables: tips received at Lightning Addresses, the shares
forwarded to collaborators, the carried remainders of the exact split, and the zap
receipts waiting to be published. Their statements live in creators/repository.py.
The events and webhook outbox are the games component's (one hub for purchases and
tips), so a store with these tables also has GAMES_SCHEMA."""
from __future__ import annotations

from ..store.schema import Migration, Schema

_FIRST = (
    """CREATE TABLE IF NOT EXISTS micropay_tips (
        id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        amount_msat BIGINT NOT NULL,
        comment TEXT NOT NULL,
        zap_request TEXT,
        client TEXT NOT NULL,
        status TEXT NOT NULL,
        bolt11 TEXT NOT NULL,
        payment_hash TEXT NOT NULL UNIQUE,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        paid_at BIGINT,
        received_msat BIGINT,
        preimage TEXT)""",
    """CREATE INDEX IF NOT EXISTS micropay_tips_listing ON micropay_tips (address, created_at, id)""",
    """CREATE INDEX IF NOT EXISTS micropay_tips_pending_client
        ON micropay_tips (client, expires_at) WHERE status = 'pending'""",
    """CREATE INDEX IF NOT EXISTS micropay_tips_pending ON micropay_tips (expires_at) WHERE status = 'pending'""",
    # One row per collaborator of a paid tip. status: pending (not yet tried), sending (an
    # attempt may be out: `label` / `payment_hash` find it in the node's records), paid,
    # failed (given up; the reason in error). `attempt` numbers the labels, so a retry
    # after an attempt that never left is a new payment, never the same one twice.
    """CREATE TABLE IF NOT EXISTS micropay_tip_shares (
        tip_id TEXT NOT NULL,
        idx BIGINT NOT NULL,
        address TEXT NOT NULL,
        destination TEXT NOT NULL,
        name TEXT NOT NULL,
        amount_msat BIGINT NOT NULL,
        max_fee_msat BIGINT NOT NULL,
        status TEXT NOT NULL,
        attempt BIGINT NOT NULL,
        invoice TEXT,
        payment_hash TEXT,
        sendpays_start BIGINT,
        started_at BIGINT,
        fee_msat BIGINT,
        preimage TEXT,
        error TEXT,
        next_at BIGINT NOT NULL,
        lease_until BIGINT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        PRIMARY KEY (tip_id, idx))""",
    """CREATE INDEX IF NOT EXISTS micropay_tip_shares_due
        ON micropay_tip_shares (next_at) WHERE status IN ('pending', 'sending')""",
    # The exact split's remainder per (address, collaborator, share, total), in
    # 1/total msat, carried from one tip to the next (the streams' rule). `prev` is the
    # value before the last update: the share's row is computed from it in the same
    # transaction, after the update has locked the row.
    """CREATE TABLE IF NOT EXISTS micropay_tip_carry (
        address TEXT NOT NULL,
        destination TEXT NOT NULL,
        share BIGINT NOT NULL,
        total BIGINT NOT NULL,
        carry BIGINT NOT NULL,
        prev BIGINT NOT NULL,
        PRIMARY KEY (address, destination, share, total))""",
    """CREATE TABLE IF NOT EXISTS micropay_zap_receipts (
        tip_id TEXT PRIMARY KEY,
        event TEXT NOT NULL,
        relays TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        next_at BIGINT NOT NULL,
        lease_until BIGINT,
        last_error TEXT,
        created_at BIGINT NOT NULL,
        published_at BIGINT)""",
    """CREATE INDEX IF NOT EXISTS micropay_zap_receipts_due
        ON micropay_zap_receipts (next_at) WHERE status = 'pending'""",
)

CREATORS_SCHEMA = Schema("creators", (
    Migration(1, "tips, their shares and carried remainders, zap receipts", _FIRST),
))
