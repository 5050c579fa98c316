"""The idle closer takes open sessions in the order they fall due: each session's idle
deadline (active_at + its route's idle timeout) is stored with it, so many sessions with
a long timeout never delay the close, and the refund, of one with a short timeout."""
import asyncio
import hashlib
import os

import pytest

from micropay.lightning.sandbox import SandboxNetwork
from micropay.payment.scheme import SessionAction
from micropay.payment.sessions import SessionLedger
from micropay.store.sessions import RefundStatus, SessionRepository, SessionStatus

from ..conftest import FakeClock

UNIT = 1000
LONG, SHORT = "GET /long", "GET /short"


@pytest.fixture
async def world(store):
    clock = FakeClock()
    net = SandboxNetwork(clock)
    merchant, payer = net.add_node("merchant", 10**10), net.add_node("payer", 10**10)
    ledger = SessionLedger(SessionRepository(store), merchant, clock=clock, lease_s=0.2,
                           idle_timeouts={LONG: 86_400, SHORT: 60})
    return ledger, payer, clock


async def open_session(ledger, payer, route, units=3):
    preimage = os.urandom(32)
    sid = hashlib.sha256(preimage).hexdigest()
    ret = (await payer.create_invoice(None, f"ret-{sid[:12]}", "refund", 86400)).bolt11
    deposit = (await ledger.node.create_invoice(units * UNIT, f"dep-{sid[:12]}", "deposit", 600)).bolt11
    act = SessionAction("open", f"ch-{sid[:12]}", sid, route, UNIT, units * UNIT, os.urandom(32).hex(), ret,
                        deposit)
    await ledger.open(act, int(ledger.clock()))
    return sid


async def test_a_due_short_timeout_session_is_closed_in_the_first_pass_behind_150_long_ones(world):
    ledger, payer, clock = world
    longs = [await open_session(ledger, payer, LONG) for _ in range(150)]
    clock.advance(10)
    short = await open_session(ledger, payer, SHORT)
    clock.advance(61)                       # the short one is due; the long ones (older) are not
    before = payer.balance_msat
    assert await ledger.close_idle() == 1
    rec = await ledger.repo.get(short)
    assert rec.status == SessionStatus.CLOSED and rec.refund_status == RefundStatus.SUCCEEDED
    assert payer.balance_msat - before == 3 * UNIT
    assert [(await ledger.repo.get(s)).status for s in longs] == [SessionStatus.OPEN] * 150


async def test_the_closer_takes_sessions_earliest_due_first(world):
    ledger, payer, clock = world
    first_long = await open_session(ledger, payer, LONG)
    clock.advance(86_000)
    shorts = [await open_session(ledger, payer, SHORT) for _ in range(3)]
    clock.advance(401)                      # all four are due: the long one by 1 s, the shorts by 341 s
    assert await ledger.close_idle(limit=3) == 3
    assert [(await ledger.repo.get(s)).status for s in shorts] == [SessionStatus.CLOSED] * 3
    assert (await ledger.repo.get(first_long)).status == SessionStatus.OPEN
    assert await ledger.close_idle(limit=3) == 1
    assert (await ledger.repo.get(first_long)).status == SessionStatus.CLOSED


async def test_spending_moves_the_deadline(world):
    ledger, payer, clock = world
    sid = await open_session(ledger, payer, SHORT)
    clock.advance(50)
    assert await ledger.spend(sid, UNIT)
    clock.advance(50)                        # 100 s after the open, 50 s after the last unit
    assert await ledger.close_idle() == 0
    assert (await ledger.repo.get(sid)).idle_due_at == int(clock()) + 10
    clock.advance(11)
    await asyncio.sleep(ledger.lease_s + 0.05)   # the unit's lease (monotonic time) runs out
    await ledger.flush_leases()
    assert await ledger.close_idle() == 1


async def test_sessions_without_a_stored_deadline_get_their_routes_timeout(world, store):
    """Sessions opened before the deadline was stored (or by an older replica) are given
    their route's configured timeout, and are closed when it has passed, not before."""
    ledger, payer, clock = world
    sid = await open_session(ledger, payer, SHORT)
    other = await open_session(ledger, payer, "GET /gone")     # a route no longer configured
    await store.execute("UPDATE micropay_sessions SET idle_timeout_s = NULL, idle_due_at = NULL")
    clock.advance(30)
    assert await ledger.close_idle() == 0
    assert (await ledger.repo.get(sid)).idle_due_at == (await ledger.repo.get(sid)).active_at + 60
    clock.advance(31)
    assert await ledger.close_idle() == 2                  # /gone: the shortest configured timeout
    assert {(await ledger.repo.get(s)).status for s in (sid, other)} == {SessionStatus.CLOSED}


async def test_a_deadline_left_behind_by_activity_it_did_not_see_is_not_obeyed(world, store):
    """A replica that does not know idle_due_at moves active_at only: the closer checks
    the activity itself, and moves the deadline instead of closing a session in use."""
    ledger, payer, clock = world
    sid = await open_session(ledger, payer, SHORT)
    clock.advance(59)
    await store.execute("UPDATE micropay_sessions SET active_at = $1 WHERE session_id = $2", (int(clock()), sid))
    clock.advance(30)
    assert await ledger.close_idle() == 0
    assert (await ledger.repo.get(sid)).status == SessionStatus.OPEN
    assert (await ledger.repo.get(sid)).idle_due_at == int(clock()) - 30 + 60
