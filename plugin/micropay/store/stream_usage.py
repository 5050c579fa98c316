"""Incoming payment streams: each streamed payment this node received (by stream id),
and what requests have spent of them."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .base import Store


@dataclass(frozen=True, slots=True)
class StreamSession:
    """One incoming stream as its payments add up."""

    stream_id: str
    payments: int
    received_msat: int
    first_at: int
    last_at: int
    last_seq: int
    app_name: str
    distinct_seqs: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ADD_PAYMENT = ("INSERT INTO micropay_stream_payments (payment_hash, stream_id, seq, amount_msat, received_at, "
               "app_name) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (payment_hash) DO NOTHING "
               "RETURNING payment_hash")
# Spend from what a stream has paid in, never past it: one statement, safe under
# concurrency (the conflicting row is locked and the condition re-checked).
DEBIT = ("INSERT INTO micropay_stream_usage (stream_id, used_msat) "
         "SELECT $1, CAST($2 AS BIGINT) WHERE (SELECT COALESCE(SUM(amount_msat), 0) "
         "FROM micropay_stream_payments WHERE stream_id = $1) >= CAST($2 AS BIGINT) "
         "ON CONFLICT (stream_id) DO UPDATE SET used_msat = micropay_stream_usage.used_msat + "
         "CAST($2 AS BIGINT) WHERE (SELECT COALESCE(SUM(amount_msat), 0) FROM micropay_stream_payments "
         "WHERE stream_id = $1) >= micropay_stream_usage.used_msat + CAST($2 AS BIGINT) "
         "RETURNING used_msat")
BALANCE = ("SELECT (SELECT COALESCE(SUM(amount_msat), 0) FROM micropay_stream_payments WHERE stream_id = $1), "
           "(SELECT COALESCE(MAX(used_msat), 0) FROM micropay_stream_usage WHERE stream_id = $1)")
SESSIONS = ("SELECT stream_id, COUNT(*), SUM(amount_msat), MIN(received_at), MAX(received_at), MAX(seq), "
            "MAX(app_name), COUNT(DISTINCT seq) FROM micropay_stream_payments "
            "WHERE ($1 = '' OR stream_id = $1) GROUP BY stream_id ORDER BY MIN(received_at)")


class StreamUsageRepository:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def add_payment(self, payment_hash: str, stream_id: str, seq: int, amount_msat: int,
                          received_at: int, app_name: str) -> bool:
        """Record an incoming streamed payment once (True the first time)."""
        return await self.store.fetchrow(ADD_PAYMENT, (
            payment_hash, stream_id, seq, amount_msat, received_at, app_name)) is not None

    async def sessions(self, stream_id: str | None = None) -> list[StreamSession]:
        rows = await self.store.query(SESSIONS, (stream_id or "",))
        return [StreamSession(r[0], int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]), r[6], int(r[7]))
                for r in rows]

    async def debit(self, stream_id: str, amount_msat: int) -> int | None:
        """Spend `amount_msat` of what stream `stream_id` has paid in. Returns the balance
        left, or None (nothing spent) if the stream has not paid enough."""
        row = await self.store.fetchrow(DEBIT, (stream_id, amount_msat))
        if row is None:
            return None
        received, used = await self.balance(stream_id)
        return received - used

    async def balance(self, stream_id: str) -> tuple[int, int]:
        """(received, used) millisatoshis of an incoming stream."""
        row = await self.store.fetchrow(BALANCE, (stream_id,))
        return (int(row[0]), int(row[1])) if row else (0, 0)
