"""The Store port and the SQL both adapters share.

SQL is written once with PostgreSQL's `$n` placeholders; the SQLite adapter maps
them to SQLite's `?n`. Both engines run the same UPSERT ... RETURNING statements,
so every state change is one atomic, idempotent statement.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Sequence


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
    def status(self) -> str:
        return "paid" if self.paid_at is not None else "pending"


SCHEMA = [
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
]

_CH_COLS = ("payment_hash, token_id, route_key, client_key, price_msat, bolt11, macaroon, "
            "created_at, expires_at, credits, paid_at, received_msat")

SQL = {
    "add_challenge": f"INSERT INTO micropay_challenges ({_CH_COLS}) "
                     "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,NULL,NULL) "
                     "ON CONFLICT (payment_hash) DO NOTHING",
    "get_challenge": f"SELECT {_CH_COLS} FROM micropay_challenges WHERE payment_hash = $1",
    "pending_challenge": f"SELECT {_CH_COLS} FROM micropay_challenges "
                         "WHERE client_key = $1 AND route_key = $2 AND price_msat = $3 "
                         "AND paid_at IS NULL AND expires_at > $4 "
                         # a token already spending credits is paid, even if the settlement
                         # has not been recorded yet
                         "AND NOT EXISTS (SELECT 1 FROM micropay_credits c "
                         "WHERE c.token_id = micropay_challenges.token_id) "
                         "ORDER BY expires_at DESC LIMIT 1",
    "count_pending": "SELECT COUNT(*) FROM micropay_challenges "
                     "WHERE paid_at IS NULL AND expires_at > $1",
    "count_pending_client": "SELECT COUNT(*) FROM micropay_challenges "
                            "WHERE paid_at IS NULL AND expires_at > $1 AND client_key = $2",
    "mark_paid": "UPDATE micropay_challenges SET paid_at = $2, received_msat = $3 "
                 "WHERE payment_hash = $1 AND paid_at IS NULL RETURNING payment_hash",
    "purge_expired": "DELETE FROM micropay_challenges WHERE paid_at IS NULL AND expires_at < $1 "
                     "RETURNING payment_hash",
    # First use inserts (initial - 1); later uses decrement while > 0. No row back: exhausted.
    "debit_credit": "INSERT INTO micropay_credits (token_id, remaining) VALUES ($1, $2 - 1) "
                    "ON CONFLICT (token_id) DO UPDATE SET remaining = micropay_credits.remaining - 1 "
                    "WHERE micropay_credits.remaining > 0 RETURNING remaining",
    "refund_credit": "UPDATE micropay_credits SET remaining = remaining + 1 WHERE token_id = $1",
    "credits_remaining": "SELECT remaining FROM micropay_credits WHERE token_id = $1",
    "get_cursor": "SELECT value FROM micropay_cursors WHERE name = $1",
    "advance_cursor": "INSERT INTO micropay_cursors (name, value) VALUES ($1, $2) "
                      "ON CONFLICT (name) DO UPDATE SET value = excluded.value "
                      "WHERE micropay_cursors.value < excluded.value",
    "add_receipt": "INSERT INTO micropay_receipts (payment_hash, receipt, created_at) "
                   "VALUES ($1, $2, $3) ON CONFLICT (payment_hash) DO NOTHING",
    "get_receipt": "SELECT receipt FROM micropay_receipts WHERE payment_hash = $1",
    "add_stream_payment": "INSERT INTO micropay_stream_payments "
                          "(payment_hash, stream_id, seq, amount_msat, received_at, app_name) "
                          "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (payment_hash) DO NOTHING "
                          "RETURNING payment_hash",
    # Spend from what a stream has paid in, never past it: one statement, safe under
    # concurrency (the conflicting row is locked and the condition re-checked).
    "debit_stream": "INSERT INTO micropay_stream_usage (stream_id, used_msat) "
                    "SELECT $1, CAST($2 AS BIGINT) WHERE (SELECT COALESCE(SUM(amount_msat), 0) "
                    "FROM micropay_stream_payments WHERE stream_id = $1) >= CAST($2 AS BIGINT) "
                    "ON CONFLICT (stream_id) DO UPDATE SET used_msat = micropay_stream_usage.used_msat + "
                    "CAST($2 AS BIGINT) WHERE (SELECT COALESCE(SUM(amount_msat), 0) FROM micropay_stream_payments "
                    "WHERE stream_id = $1) >= micropay_stream_usage.used_msat + CAST($2 AS BIGINT) "
                    "RETURNING used_msat",
    "stream_balance": "SELECT (SELECT COALESCE(SUM(amount_msat), 0) FROM micropay_stream_payments "
                      "WHERE stream_id = $1), (SELECT COALESCE(MAX(used_msat), 0) FROM micropay_stream_usage "
                      "WHERE stream_id = $1)",
    "stream_sessions": "SELECT stream_id, COUNT(*), SUM(amount_msat), MIN(received_at), MAX(received_at), "
                       "MAX(seq), MAX(app_name), COUNT(DISTINCT seq) FROM micropay_stream_payments "
                       "WHERE ($1 = '' OR stream_id = $1) GROUP BY stream_id ORDER BY MIN(received_at)",
}


@dataclass(frozen=True, slots=True)
class Step:
    sql: str
    args: Sequence[Any]
    required: bool = False     # no row back -> roll the whole transaction back


@dataclass(frozen=True, slots=True)
class TxResult:
    rows: list[list[tuple[Any, ...]]]
    failed_step: int | None = None   # index of the required step that returned nothing

    @property
    def ok(self) -> bool:
        return self.failed_step is None


class RollBack(Exception):
    def __init__(self, index: int) -> None:
        self.index = index


class Store(abc.ABC):
    """Persistence for tokens, credits, cursors and receipts. Subclasses provide open,
    close, _execute and _fetchall; every operation is one statement, atomic and safe to retry."""

    url: str

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def _execute(self, sql: str, args: Sequence[Any]) -> None: ...

    @abc.abstractmethod
    async def _fetchall(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]: ...

    async def _fetchrow(self, sql: str, args: Sequence[Any]) -> tuple[Any, ...] | None:
        rows = await self._fetchall(sql, args)
        return rows[0] if rows else None

    async def _fetch_batch(self, queries: list[tuple[str, Sequence[Any]]]) -> list[list[tuple[Any, ...]]]:
        """Several read queries; adapters may run them in one round trip."""
        return [await self._fetchall(sql, args) for sql, args in queries]

    @abc.abstractmethod
    async def _transaction(self, steps: Sequence[Step]) -> TxResult:
        """Run `steps` in one transaction. If a step marked `required` returns no row,
        roll everything back and report that step's index."""

    # -- generic access, for modules that own their SQL (games/) --------
    async def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await self._fetchall(sql, args)

    async def transaction(self, steps: Sequence[Step]) -> TxResult:
        return await self._transaction(steps)

    # -- challenges / issued tokens --------------------------------------
    async def add_challenge(self, ch: ChallengeRecord) -> None:
        await self._execute(SQL["add_challenge"], (
            ch.payment_hash, ch.token_id, ch.route_key, ch.client_key, ch.price_msat, ch.bolt11,
            ch.macaroon, ch.created_at, ch.expires_at, ch.credits))

    async def get_challenge(self, payment_hash: str) -> ChallengeRecord | None:
        row = await self._fetchrow(SQL["get_challenge"], (payment_hash,))
        return ChallengeRecord(*row) if row else None

    async def pending_challenge(self, client_key: str, route_key: str, price_msat: int,
                                valid_after: int) -> ChallengeRecord | None:
        row = await self._fetchrow(SQL["pending_challenge"],
                                   (client_key, route_key, price_msat, valid_after))
        return ChallengeRecord(*row) if row else None

    async def admission(self, client_key: str, route_key: str, price_msat: int, now: int,
                        reuse_after: int) -> tuple[ChallengeRecord | None, int, int]:
        """What the gate needs before minting: a pending challenge it can reuse for this
        client and route, and the pending counts (all clients, this client)."""
        reuse, total, mine = await self._fetch_batch([
            (SQL["pending_challenge"], (client_key, route_key, price_msat, reuse_after)),
            (SQL["count_pending"], (now,)),
            (SQL["count_pending_client"], (now, client_key)),
        ])
        return (ChallengeRecord(*reuse[0]) if reuse else None), int(total[0][0]), int(mine[0][0])

    async def count_pending(self, now: int, client_key: str | None = None) -> int:
        if client_key is None:
            row = await self._fetchrow(SQL["count_pending"], (now,))
        else:
            row = await self._fetchrow(SQL["count_pending_client"], (now, client_key))
        return int(row[0]) if row else 0

    async def mark_paid(self, payment_hash: str, received_msat: int, paid_at: int) -> bool:
        """True the first time; False if already paid or unknown."""
        return await self._fetchrow(SQL["mark_paid"], (payment_hash, paid_at, received_msat)) is not None

    async def purge_expired(self, before: int) -> int:
        """Delete unpaid challenges that expired before `before`. Returns how many."""
        return len(await self._fetchall(SQL["purge_expired"], (before,)))

    # -- credits ---------------------------------------------------------
    async def debit_credit(self, token_id: str, initial: int) -> int | None:
        """Spend one credit. Returns credits left, or None if none were left."""
        row = await self._fetchrow(SQL["debit_credit"], (token_id, initial))
        return int(row[0]) if row else None

    async def refund_credit(self, token_id: str) -> None:
        """Give back one credit debited for a request that could not be served."""
        await self._execute(SQL["refund_credit"], (token_id,))

    async def credits_remaining(self, token_id: str) -> int | None:
        row = await self._fetchrow(SQL["credits_remaining"], (token_id,))
        return int(row[0]) if row else None

    # -- cursors ---------------------------------------------------------
    async def get_cursor(self, name: str) -> int:
        row = await self._fetchrow(SQL["get_cursor"], (name,))
        return int(row[0]) if row else 0

    async def advance_cursor(self, name: str, value: int) -> None:
        """Move forward only: an out-of-order write can never rewind the cursor."""
        await self._execute(SQL["advance_cursor"], (name, value))

    # -- receipts --------------------------------------------------------
    async def add_receipt(self, payment_hash: str, receipt: str, created_at: int) -> None:
        await self._execute(SQL["add_receipt"], (payment_hash, receipt, created_at))

    # -- streams received ---------------------------------------------------
    async def add_stream_payment(self, payment_hash: str, stream_id: str, seq: int, amount_msat: int,
                                 received_at: int, app_name: str) -> bool:
        """Record an incoming streamed payment once (True the first time)."""
        return await self._fetchrow(SQL["add_stream_payment"], (
            payment_hash, stream_id, seq, amount_msat, received_at, app_name)) is not None

    async def stream_sessions(self, stream_id: str | None = None) -> list[dict[str, Any]]:
        rows = await self._fetchall(SQL["stream_sessions"], (stream_id or "",))
        return [{"stream_id": r[0], "payments": int(r[1]), "received_msat": int(r[2]),
                 "first_at": int(r[3]), "last_at": int(r[4]), "last_seq": int(r[5]), "app_name": r[6],
                 "distinct_seqs": int(r[7])}
                for r in rows]

    async def debit_stream(self, stream_id: str, amount_msat: int) -> int | None:
        """Spend `amount_msat` of what stream `stream_id` has paid in. Returns the balance
        left, or None (nothing spent) if the stream has not paid enough."""
        row = await self._fetchrow(SQL["debit_stream"], (stream_id, amount_msat))
        if row is None:
            return None
        received, used = await self.stream_balance(stream_id)
        return received - used

    async def stream_balance(self, stream_id: str) -> tuple[int, int]:
        """(received, used) millisatoshis of an incoming stream."""
        row = await self._fetchrow(SQL["stream_balance"], (stream_id,))
        return (int(row[0]), int(row[1])) if row else (0, 0)

    async def get_receipt(self, payment_hash: str) -> str | None:
        row = await self._fetchrow(SQL["get_receipt"], (payment_hash,))
        return row[0] if row else None
