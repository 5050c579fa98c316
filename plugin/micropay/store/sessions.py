"""Payment sessions (draft-lightning-session): each session's deposit, what has been
spent of it, its return invoice and its close; and the responses of consumed session
challenges (the draft's idempotency by challenge id, per action).

Every change is one atomic statement or one transaction, so replicas sharing the store
agree: a deposit invoice opens or tops up exactly once (its token row in
micropay_credits, the same single-use ledger L402 and charge credentials use); spending
is `spent + x <= deposit` checked and applied in one UPDATE; a close moves the status
open -> closing -> refunding (the refund fixed) -> closed (its outcome recorded).
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

from .base import Step, Store, point
from .l402 import CONSUME_WHOLE


class SessionStatus(enum.StrEnum):
    OPEN = "open"
    CLOSING = "closing"        # no more spending; reserved units are coming back
    REFUNDING = "refunding"    # refund_msat fixed; the single refund attempt is under way
    CLOSED = "closed"


class RefundStatus(enum.StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class SessionRecord:
    session_id: str
    route_key: str
    unit_msat: int
    deposit_msat: int
    spent_msat: int
    return_invoice: str
    status: SessionStatus
    opened_at: int
    active_at: int
    closed_at: int | None
    refund_msat: int | None
    refund_status: RefundStatus | None
    lease_until_ms: int = 0
    return_hash: str | None = None     # the return invoice's payment hash (unique across sessions)
    refund_from: int | None = None     # the node's payment records before the refund attempt
    idle_timeout_s: int | None = None  # the route's idle timeout when the session opened
    idle_due_at: int | None = None     # active_at + idle_timeout_s: when the idle closer may close it

    @property
    def balance_msat(self) -> int:
        return self.deposit_msat - self.spent_msat


_COLS = ("session_id, route_key, unit_msat, deposit_msat, spent_msat, return_invoice, status, opened_at, "
         "active_at, closed_at, refund_msat, refund_status, lease_until_ms, return_hash, refund_from, "
         "idle_timeout_s, idle_due_at")
# No conflict target: a session id or a return invoice already taken both make it a no-op.
INSERT = (f"INSERT INTO micropay_sessions ({_COLS}) "
          "VALUES ($1,$2,$3,$4,0,$5,'open',$6,$6,NULL,NULL,NULL,0,$7,NULL,$8,$9) "
          "ON CONFLICT DO NOTHING RETURNING session_id")
RETURN_TAKEN = "SELECT session_id FROM micropay_sessions WHERE return_hash = $1"
# Starts the refund: from here on its amount is fixed (RELEASE no longer adds to it).
START_REFUND = ("UPDATE micropay_sessions SET refund_from = $2 WHERE session_id = $1 AND refund_from IS NULL "
                "AND status = 'refunding' RETURNING refund_from, refund_msat")
GET = f"SELECT {_COLS} FROM micropay_sessions WHERE session_id = $1"
# Every statement that moves active_at moves idle_due_at with it.
TOP_UP = ("UPDATE micropay_sessions SET deposit_msat = deposit_msat + $2, active_at = $3, "
          "idle_due_at = $3 + idle_timeout_s "
          "WHERE session_id = $1 AND status = 'open' RETURNING deposit_msat - spent_msat")
# $4: until when (ms) the reserving replica may serve the units it takes beyond the first
# (0 when it takes one): a close waits that long for unserved units to come back.
RESERVE = ("UPDATE micropay_sessions SET spent_msat = spent_msat + $2, active_at = $3, "
           "idle_due_at = $3 + idle_timeout_s, "
           "lease_until_ms = CASE WHEN $4 > lease_until_ms THEN $4 ELSE lease_until_ms END WHERE session_id = $1 AND status = 'open' AND spent_msat + $2 <= deposit_msat "
           "RETURNING deposit_msat - spent_msat")
# Units another replica gives back after the refund was fixed, but before its attempt
# started, still go to the client: into the refund.
RELEASE = ("UPDATE micropay_sessions SET spent_msat = spent_msat - $2, refund_msat = CASE WHEN status = 'refunding' "
           "THEN refund_msat + $2 ELSE refund_msat END WHERE session_id = $1 AND (status IN ('open', 'closing') "
           "OR (status = 'refunding' AND refund_from IS NULL)) AND spent_msat >= $2 RETURNING session_id")
# What a session's requests run, each on its own row by session id (point statements).
GET, TOP_UP, RESERVE, RELEASE = (point(sql) for sql in (GET, TOP_UP, RESERVE, RELEASE))
BEGIN_CLOSE = ("UPDATE micropay_sessions SET status = 'closing', closed_at = $2 "
               "WHERE session_id = $1 AND status = 'open' RETURNING session_id")
FIX_REFUND = ("UPDATE micropay_sessions SET status = 'refunding', refund_msat = deposit_msat - spent_msat "
              "WHERE session_id = $1 AND status = 'closing' RETURNING refund_msat")
FINISH = ("UPDATE micropay_sessions SET status = 'closed', refund_status = $2 "
          "WHERE session_id = $1 AND status = 'refunding' RETURNING session_id")
# The open sessions in the order they fall due (index micropay_sessions_due), whatever
# each one's idle timeout: a thousand sessions with a day's timeout never hold up one
# with a minute's.
IDLE = ("SELECT session_id FROM micropay_sessions WHERE status = 'open' AND idle_due_at < $1 "
        "ORDER BY idle_due_at LIMIT $2")
# Sessions opened before idle_due_at existed (or by a replica that does not know it):
# their route's timeout from the configuration ($2), for one route ($1) or any.
SET_TIMEOUT_ROUTE = ("UPDATE micropay_sessions SET idle_timeout_s = COALESCE(idle_timeout_s, $2), "
                     "idle_due_at = active_at + COALESCE(idle_timeout_s, $2) "
                     "WHERE status = 'open' AND idle_due_at IS NULL AND route_key = $1 RETURNING session_id")
SET_TIMEOUT_ANY = ("UPDATE micropay_sessions SET idle_timeout_s = COALESCE(idle_timeout_s, $1), "
                   "idle_due_at = active_at + COALESCE(idle_timeout_s, $1) "
                   "WHERE status = 'open' AND idle_due_at IS NULL RETURNING session_id")
# A due time that fell behind active_at (moved by a replica that does not know it).
REFRESH_DUE = ("UPDATE micropay_sessions SET idle_due_at = active_at + idle_timeout_s "
               "WHERE session_id = $1 AND idle_timeout_s IS NOT NULL RETURNING idle_due_at")
UNFINISHED = ("SELECT session_id FROM micropay_sessions WHERE status IN ('closing', 'refunding') "
              "AND closed_at < $1 ORDER BY closed_at LIMIT $2")
ADD_ACTION = ("INSERT INTO micropay_session_actions (challenge_id, session_id, action, response, created_at) "
              "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (challenge_id, action) DO NOTHING")
GET_ACTION = ("SELECT response FROM micropay_session_actions WHERE challenge_id = $1 AND action = $2 "
              "AND session_id = $3")
PURGE_ACTIONS = "DELETE FROM micropay_session_actions WHERE created_at < $1 RETURNING challenge_id"


def _record(row: tuple[Any, ...]) -> SessionRecord:
    r = list(row)
    r[6] = SessionStatus(r[6])
    r[11] = RefundStatus(r[11]) if r[11] is not None else None
    return SessionRecord(*r)


class SessionRepository:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def open(self, *, session_id: str, token_id: str, route_key: str, unit_msat: int, deposit_msat: int,
                   return_invoice: str, return_hash: str, now: int, idle_timeout_s: int | None = None) -> str:
        """Open a session on a paid deposit, consuming its invoice's token: all or nothing.
        "ok"; "used" (the deposit was already used: a replayed open); "return_taken" (the
        return invoice is named by another session; the deposit stays unused)."""
        result = await self.store.transaction([
            Step(CONSUME_WHOLE, (token_id,), required=True),
            Step(INSERT, (session_id, route_key, unit_msat, deposit_msat, return_invoice, now, return_hash,
                          idle_timeout_s, None if idle_timeout_s is None else now + idle_timeout_s),
                 required=True),
        ])
        if result.ok:
            return "ok"
        if result.failed_step == 0:
            return "used"
        taken = await self.store.fetchrow(RETURN_TAKEN, (return_hash,))
        return "return_taken" if taken is not None and taken[0] != session_id else "used"

    async def return_taken(self, return_hash: str) -> str | None:
        """The session that names this return invoice, if any."""
        row = await self.store.fetchrow(RETURN_TAKEN, (return_hash,))
        return row[0] if row else None

    async def top_up(self, *, session_id: str, token_id: str, deposit_msat: int, now: int, challenge_id: str,
                     response: dict[str, Any]) -> str:
        """Add a paid deposit to an open session: "ok", "used" (the deposit was already
        used) or "not_open" (no such open session; the deposit stays unused)."""
        result = await self.store.transaction([
            Step(CONSUME_WHOLE, (token_id,), required=True),
            Step(TOP_UP, (session_id, deposit_msat, now), required=True),
            Step(ADD_ACTION, (challenge_id, session_id, "topUp", json.dumps(response), now)),
        ])
        return "ok" if result.ok else ("used" if result.failed_step == 0 else "not_open")

    async def get(self, session_id: str) -> SessionRecord | None:
        row = await self.store.fetchrow(GET, (session_id,))
        return _record(row) if row else None

    async def reserve(self, session_id: str, amount_msat: int, now: int, lease_until_ms: int = 0) -> int | None:
        """Move `amount_msat` from the session's balance to spent, if the session is open
        and the balance covers it. Returns the balance left, or None."""
        row = await self.store.fetchrow(RESERVE, (session_id, amount_msat, now, lease_until_ms))
        return int(row[0]) if row else None

    async def release(self, session_id: str, amount_msat: int) -> bool:
        """Give back reserved units that were not served (until the refund attempt
        starts). False: too late, the refund's amount is final."""
        return await self.store.fetchrow(RELEASE, (session_id, amount_msat)) is not None

    async def begin_close(self, session_id: str, now: int) -> bool:
        return await self.store.fetchrow(BEGIN_CLOSE, (session_id, now)) is not None

    async def fix_refund(self, session_id: str) -> int | None:
        row = await self.store.fetchrow(FIX_REFUND, (session_id,))
        return int(row[0]) if row else None

    async def start_refund(self, session_id: str, position: int) -> tuple[int, int]:
        """Start the refund attempt: record where the node's payment records stand (its
        record is looked up from there) and fix its amount. Set once: a retry after a
        crash reads back what the first start set. (refund_from, refund_msat)."""
        row = await self.store.fetchrow(START_REFUND, (session_id, position))
        if row is None:
            rec = await self.get(session_id)
            assert rec is not None and rec.refund_from is not None, "start_refund outside 'refunding'"
            return rec.refund_from, rec.refund_msat or 0
        return int(row[0]), int(row[1])

    async def finish(self, session_id: str, refund_status: RefundStatus) -> bool:
        return await self.store.fetchrow(FINISH, (session_id, str(refund_status))) is not None

    async def idle(self, now: int, limit: int = 100) -> list[str]:
        """Open sessions whose idle deadline is before `now`, the earliest due first."""
        return [r[0] for r in await self.store.query(IDLE, (now, limit))]

    async def set_idle_timeout(self, timeout_s: int, route_key: str | None = None) -> int:
        """Give open sessions without an idle deadline this timeout (those of `route_key`,
        or any). Returns how many."""
        if route_key is None:
            return len(await self.store.query(SET_TIMEOUT_ANY, (timeout_s,)))
        return len(await self.store.query(SET_TIMEOUT_ROUTE, (route_key, timeout_s)))

    async def refresh_due(self, session_id: str) -> None:
        await self.store.fetchrow(REFRESH_DUE, (session_id,))

    async def unfinished(self, closed_before: int, limit: int = 100) -> list[str]:
        return [r[0] for r in await self.store.query(UNFINISHED, (closed_before, limit))]

    async def add_action(self, challenge_id: str, session_id: str, action: str, response: dict[str, Any],
                         now: int) -> None:
        await self.store.execute(ADD_ACTION, (challenge_id, session_id, action, json.dumps(response), now))

    async def action_response(self, challenge_id: str, action: str, session_id: str) -> dict[str, Any] | None:
        """What a consumed challenge's action answered for this session (a retried topUp
        gets its first answer; another session never gets it)."""
        row = await self.store.fetchrow(GET_ACTION, (challenge_id, action, session_id))
        return json.loads(row[0]) if row else None

    async def purge_actions(self, before: int) -> int:
        return len(await self.store.query(PURGE_ACTIONS, (before,)))
