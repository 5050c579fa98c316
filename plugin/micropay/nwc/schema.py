"""The NWC service's tables (the plugin's store): connections, the payments each made
(its spending ledger, reserved before paying), the invoices each made, and the request
ids already handled (replays are ignored). One step per change (see store/schema.py)."""
from __future__ import annotations

from ..store.schema import Migration, Schema

NWC_SCHEMA = Schema("nwc", (
    Migration(1, "NWC connections, their payments and invoices, handled requests", (
        """CREATE TABLE IF NOT EXISTS micropay_nwc_connections (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            service_pubkey TEXT NOT NULL UNIQUE,
            client_pubkey TEXT NOT NULL UNIQUE,
            methods TEXT NOT NULL,
            budget_msat BIGINT NOT NULL,
            budget_period TEXT NOT NULL,
            max_fee_msat BIGINT NOT NULL,
            expires_at BIGINT,
            created_at BIGINT NOT NULL,
            revoked_at BIGINT,
            spend_seq BIGINT NOT NULL DEFAULT 0)""",
        """CREATE TABLE IF NOT EXISTS micropay_nwc_payments (
            request_id TEXT PRIMARY KEY,
            connection_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            destination TEXT NOT NULL,
            payment_hash TEXT,
            label TEXT NOT NULL UNIQUE,
            sendpays_start BIGINT NOT NULL,
            amount_msat BIGINT NOT NULL,
            fee_reserve_msat BIGINT NOT NULL,
            fee_msat BIGINT,
            status TEXT NOT NULL,
            preimage TEXT,
            error TEXT,
            description TEXT NOT NULL,
            period_start BIGINT NOT NULL,
            encryption TEXT NOT NULL,
            answered BIGINT NOT NULL DEFAULT 0,
            lease_until BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL)""",
        """CREATE INDEX IF NOT EXISTS micropay_nwc_payments_budget
            ON micropay_nwc_payments (connection_id, period_start, status)""",
        """CREATE INDEX IF NOT EXISTS micropay_nwc_payments_open
            ON micropay_nwc_payments (status, lease_until)""",
        # one live payment per invoice: two requests for the same invoice, at once or one
        # after the other, never both reach the node (a failed one does not count)
        """CREATE UNIQUE INDEX IF NOT EXISTS micropay_nwc_payments_hash
            ON micropay_nwc_payments (payment_hash) WHERE status <> 'failed'""",
        """CREATE INDEX IF NOT EXISTS micropay_nwc_payments_unanswered
            ON micropay_nwc_payments (lease_until) WHERE answered = 0""",
        """CREATE TABLE IF NOT EXISTS micropay_nwc_invoices (
            payment_hash TEXT PRIMARY KEY,
            connection_id TEXT NOT NULL,
            label TEXT NOT NULL UNIQUE,
            bolt11 TEXT NOT NULL,
            amount_msat BIGINT NOT NULL,
            description TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL,
            settled_at BIGINT,
            received_msat BIGINT,
            preimage TEXT)""",
        """CREATE INDEX IF NOT EXISTS micropay_nwc_invoices_conn
            ON micropay_nwc_invoices (connection_id, created_at)""",
        """CREATE TABLE IF NOT EXISTS micropay_nwc_seen (
            request_id TEXT PRIMARY KEY,
            connection_id TEXT NOT NULL,
            seen_at BIGINT NOT NULL)""",
        """CREATE INDEX IF NOT EXISTS micropay_nwc_seen_age ON micropay_nwc_seen (seen_at)""",
    )),
))
