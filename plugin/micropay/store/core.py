"""The core component's tables: the gate's challenges, credits and payment receipts,
settlement cursors, incoming stream payments, the plugin's issued invoices, and Payment
sessions. Their statements live with their repositories (l402.py, cursors.py,
stream_usage.py, issued.py, sessions.py); this is their history, one step per change (see schema.py)."""
from __future__ import annotations

from .schema import Migration, Schema

_RELEASE_0_1_0 = (
    """CREATE TABLE IF NOT EXISTS micropay_challenges (
        payment_hash TEXT PRIMARY KEY,
        token_id TEXT NOT NULL,
        route_key TEXT NOT NULL,
        client_key TEXT NOT NULL,
        price_msat BIGINT NOT NULL,
        bolt11 TEXT NOT NULL,
        macaroon TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        credits BIGINT,
        paid_at BIGINT,
        received_msat BIGINT)""",
    """CREATE INDEX IF NOT EXISTS micropay_challenges_pending
        ON micropay_challenges (client_key, route_key, expires_at)""",
    """CREATE INDEX IF NOT EXISTS micropay_challenges_unpaid
        ON micropay_challenges (expires_at) WHERE paid_at IS NULL""",
    """CREATE TABLE IF NOT EXISTS micropay_credits (
        token_id TEXT PRIMARY KEY,
        remaining BIGINT NOT NULL CHECK (remaining >= 0))""",
    """CREATE TABLE IF NOT EXISTS micropay_cursors (
        name TEXT PRIMARY KEY,
        value BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS micropay_stream_payments (
        payment_hash TEXT PRIMARY KEY,
        stream_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        amount_msat BIGINT NOT NULL,
        received_at BIGINT NOT NULL,
        app_name TEXT NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS micropay_stream_payments_stream
        ON micropay_stream_payments (stream_id)""",
    """CREATE TABLE IF NOT EXISTS micropay_stream_usage (
        stream_id TEXT PRIMARY KEY,
        used_msat BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS micropay_receipts (
        payment_hash TEXT PRIMARY KEY,
        receipt TEXT NOT NULL,
        created_at BIGINT NOT NULL)""",
)


CORE_SCHEMA = Schema("core", (
    Migration(1, "the core tables of release 0.1.0", _RELEASE_0_1_0),
    Migration(2, "the plugin's issued invoices mirrored from the node's datastore, to list them by label", (
        """CREATE TABLE IF NOT EXISTS micropay_issued_invoices (
            label TEXT PRIMARY KEY,
            record TEXT NOT NULL,
            created_at BIGINT NOT NULL)""",
    )),
    Migration(3, "Payment sessions (draft-lightning-session): balances and consumed challenges", (
        """CREATE TABLE IF NOT EXISTS micropay_sessions (
            session_id TEXT PRIMARY KEY,
            route_key TEXT NOT NULL,
            unit_msat BIGINT NOT NULL,
            deposit_msat BIGINT NOT NULL,
            spent_msat BIGINT NOT NULL,
            return_invoice TEXT NOT NULL,
            status TEXT NOT NULL,
            opened_at BIGINT NOT NULL,
            active_at BIGINT NOT NULL,
            closed_at BIGINT,
            refund_msat BIGINT,
            refund_status TEXT,
            lease_until_ms BIGINT NOT NULL,
            CHECK (spent_msat >= 0 AND spent_msat <= deposit_msat))""",
        """CREATE INDEX IF NOT EXISTS micropay_sessions_status
            ON micropay_sessions (status, active_at)""",
        """CREATE TABLE IF NOT EXISTS micropay_session_actions (
            challenge_id TEXT NOT NULL,
            action TEXT NOT NULL,
            session_id TEXT NOT NULL,
            response TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (challenge_id, action))""",
    )),
    Migration(4, "Payment sessions: a return invoice names one session; a refund is found by its own attempt", (
        # the return invoice's payment hash: unique, so that one session's refund can
        # never be reported as another's (NULL in sessions opened before this step)
        "ALTER TABLE micropay_sessions ADD COLUMN return_hash TEXT",
        """CREATE UNIQUE INDEX IF NOT EXISTS micropay_sessions_return_hash
            ON micropay_sessions (return_hash)""",
        # where the node's payment records stood before the refund attempt (its label is
        # looked up from there on)
        "ALTER TABLE micropay_sessions ADD COLUMN refund_from BIGINT",
    )),
    Migration(5, "Payment sessions: each session's idle timeout and when it falls due, for the idle closer", (
        # the idle timeout the session was opened with, and active_at + it: the idle
        # closer takes open sessions in the order they fall due (NULL in sessions opened
        # before this step, until the closer fills them in from the configuration)
        "ALTER TABLE micropay_sessions ADD COLUMN idle_timeout_s BIGINT",
        "ALTER TABLE micropay_sessions ADD COLUMN idle_due_at BIGINT",
        """CREATE INDEX IF NOT EXISTS micropay_sessions_due
            ON micropay_sessions (status, idle_due_at)""",
    )),
    Migration(6, "challenges: drop the per-client index no 402 reads any more", (
        # A 402 counted the client's unpaid challenges through this index; since the
        # counts are one GROUP BY a second (seller/challenger.py, PendingCounts), which
        # reads the unpaid index, it was only written: 8-15 us of every record's insert
        # on SQLite (docs/performance.md).
        "DROP INDEX IF EXISTS micropay_challenges_pending",
    )),
    Migration(7, "credit ledger: one B-tree keyed by token id on SQLite (WITHOUT ROWID)", (), sqlite_only=(
        # Every paid L402 token and Payment charge adds a row here, kept for good (a spent
        # token must stay spent). As a rowid table each insert wrote two B-trees (the rows
        # and the token id's index) and a token took 158 bytes of the file; keyed by the
        # token id alone it writes one, in 81 bytes, and an insert costs up to 3 us less
        # (bench/bench_ledger.py, docs/performance.md). The copy, the drop and the rename
        # run in the migration's one transaction.
        """CREATE TABLE micropay_credits_by_token (
            token_id TEXT PRIMARY KEY,
            remaining BIGINT NOT NULL CHECK (remaining >= 0)) WITHOUT ROWID""",
        "INSERT INTO micropay_credits_by_token (token_id, remaining) SELECT token_id, remaining FROM micropay_credits "
        "ORDER BY token_id",
        "DROP TABLE micropay_credits",
        "ALTER TABLE micropay_credits_by_token RENAME TO micropay_credits",
    )),
))
