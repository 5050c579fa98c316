"""Tips split among collaborators: the exact split with carried remainders (on SQLite and
PostgreSQL), and the forwarder "crashing" at every step boundary while a new one resumes:
no share is paid twice, none is dropped.

Boundaries: before the attempt is written; after it and before the node has the
payment; after the node paid and before the result is written; a refusal; two
forwarders at once; the same settlement handled twice. Paid amounts are read on the
payee's side (the sandbox node's keysends received, the address owner's invoices)."""
from __future__ import annotations

import pytest

from micropay.creators.config import AddressConfig, CreatorsConfig, Split
from micropay.creators.repository import ShareStatus
from micropay.creators.service import Creators
from micropay.creators import shares as shares_mod
from micropay.creators.shares import MAX_ATTEMPTS, RECONCILE_GRACE_S, ShareForwarder
from micropay.creators.schema import CREATORS_SCHEMA
from micropay.core.errors import PaymentFailed
from micropay.games.events import EventHub
from micropay.games.schema import GAMES_SCHEMA
from micropay.lightning.sandbox import SandboxNetwork
from micropay.store import CORE_SCHEMA, open_store_from_url

from ..conftest import PG_SKIP_REASON, FakeClock, drop_pg_schema, pg_url_with_fresh_schema

SCHEMAS = (CORE_SCHEMA, GAMES_SCHEMA, CREATORS_SCHEMA)


class Crash(BaseException):
    """A process dying at this point: nothing after it runs, no handler sees it."""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store_from_url(f"sqlite:///{tmp_path / 'store.sqlite3'}", SCHEMAS)
        await s.open()
        yield s
        await s.close()
        return
    if PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    url = pg_url_with_fresh_schema()
    s = open_store_from_url(url, SCHEMAS)
    await s.open()
    yield s
    await s.close()
    await drop_pg_schema(url)


class World:
    """A merchant node serving one address split 2:1 with carol and dave (the owner keeps 1)."""

    def __init__(self, store, clock) -> None:
        self.clock = clock
        self.net = SandboxNetwork(clock)
        self.merchant = self.net.add_node("merchant")
        self.payer = self.net.add_node("payer", 10**10)
        self.carol = self.net.add_node("carol")
        self.dave = self.net.add_node("dave")
        addr = AddressConfig("alice", "Tips for Alice", splits=(Split(self.carol.id, 2, "carol"),
                                                                 Split(self.dave.id, 1, "dave")), keep_share=1)
        self.cfg = CreatorsConfig((addr,), "https://pay.example")
        self.store = store
        self.service = Creators(self.cfg, store, self.merchant, EventHub(), clock=clock)
        self._seen = 0

    def forwarder(self, node=None) -> ShareForwarder:
        return ShareForwarder(self.store, node or self.merchant, clock=self.clock)

    async def tip(self, amount: int) -> str:
        ans = await self.service.callback("alice", "https://pay.example", "1.2.3.4", {"amount": str(amount)})
        await self.payer.pay(ans["pr"])
        it = self.merchant.settlements(self._seen)
        s = await anext(it)
        self._seen = s.pay_index
        assert await self.service.on_settlement(s)
        return (await self.service.tips.by_hash(s.payment_hash)).id

    def received(self, node) -> list[int]:
        return [amount for amount, _ in node.keysends_received]


@pytest.fixture
async def world(store):
    return World(store, FakeClock())


async def test_exact_split_carries_remainders_across_tips(world):
    """carol 2/4, dave 1/4 of 10,001 msat, twice: 5000 + 5001 and 2500 + 2500 (carried
    remainders), never more than received in all."""
    t1 = await world.tip(10_001)
    t2 = await world.tip(10_001)
    f = world.forwarder()
    assert await f.forward_due() == 4
    assert sorted(world.received(world.carol)) == [5000, 5001]
    assert world.received(world.dave) == [2500, 2500]
    for tid in (t1, t2):
        tip = await world.service.get(tid)
        assert all(s["status"] == "paid" for s in tip["shares"])
    rows = await world.store.query("SELECT destination, carry FROM micropay_tip_carry ORDER BY share")
    assert sorted(r[1] for r in rows) == [0, 2]       # dave carries 2/4 msat, carol 0
    assert await f.forward_due() == 0                 # nothing left to do


async def test_the_same_settlement_twice_makes_shares_once(world):
    ans = await world.service.callback("alice", "https://pay.example", "c", {"amount": "8000"})
    await world.payer.pay(ans["pr"])
    s = await anext(world.merchant.settlements(0))
    assert await world.service.on_settlement(s)
    assert not await world.service.on_settlement(s)
    assert await world.store.query("SELECT COUNT(*) FROM micropay_tip_shares") == [(2,)]
    assert await world.store.query("SELECT COUNT(*) FROM micropay_events WHERE type = 'tip.received'") == [(1,)]
    await world.forwarder().forward_due()
    assert world.received(world.carol) == [4000] and world.received(world.dave) == [2000]


class CrashingNode:
    """The merchant node, dying at a chosen point of the forwarder's work."""

    def __init__(self, node, where: str) -> None:
        self.node, self.where = node, where

    def __getattr__(self, name):
        return getattr(self.node, name)

    async def sendpays_position(self):
        if self.where == "before_attempt":
            raise Crash()
        return await self.node.sendpays_position()

    async def keysend(self, *args, **kwargs):
        if self.where == "before_node":
            raise Crash()
        p = await self.node.keysend(*args, **kwargs)
        if self.where == "after_node":
            raise Crash()
        return p


@pytest.mark.parametrize("where", ["before_attempt", "before_node", "after_node"])
async def test_a_crash_at_each_boundary_pays_each_share_once(world, where):
    await world.tip(12_000)
    with pytest.raises(Crash):
        await world.forwarder(CrashingNode(world.merchant, where)).forward_due()
    # the lease of the dead process runs out; a new process resumes
    world.clock.advance(shares_mod.LEASE_S + 1)
    f = world.forwarder()
    await f.forward_due()
    await f.forward_due()
    assert world.received(world.carol) == [6000] and world.received(world.dave) == [3000]
    rows = await world.store.query("SELECT status, attempt FROM micropay_tip_shares ORDER BY idx")
    assert [r[0] for r in rows] == ["paid", "paid"]
    # an attempt that never reached the node is retried under a new label (a new payment);
    # one the node made is settled from its record, never made again
    assert int(rows[0][1]) == (2 if where == "before_node" else 1)
    # once paid, nothing more: another pass and another process pay nothing
    world.clock.advance(3600)
    await world.forwarder().forward_due()
    assert world.received(world.carol) == [6000] and world.received(world.dave) == [3000]


async def test_a_crash_while_writing_the_result(world, monkeypatch):
    await world.tip(4_000)
    f = world.forwarder()

    async def dies(*a, **k):
        raise Crash()
    monkeypatch.setattr(f.repo, "finish", dies)
    with pytest.raises(Crash):
        await f.forward_due()
    world.clock.advance(shares_mod.LEASE_S + 1)
    await world.forwarder().forward_due()
    assert world.received(world.carol) + world.received(world.dave) == [2000, 1000]
    assert [r[0] for r in await world.store.query("SELECT status FROM micropay_tip_shares ORDER BY idx")] == \
        ["paid", "paid"]


class RefusingNode(CrashingNode):
    """Refuses the next `refusals` keysends to `only` (any destination if None)."""

    def __init__(self, node, refusals: int, only: str | None = None) -> None:
        super().__init__(node, "")
        self.refusals, self.only = refusals, only

    async def keysend(self, *args, **kwargs):
        if self.refusals > 0 and self.only in (None, args[0]):
            self.refusals -= 1
            raise PaymentFailed("no route")
        return await self.node.keysend(*args, **kwargs)


async def test_refusals_back_off_then_pay_or_fail_with_the_reason(world):
    await world.tip(4_000)
    node = RefusingNode(world.merchant, refusals=2, only=world.carol.id)     # carol's first two attempts
    f = world.forwarder(node)
    await f.forward_due()       # carol refused, dave paid
    assert world.received(world.dave) == [1000] and world.received(world.carol) == []
    await f.forward_due()       # not due yet: backing off
    assert world.received(world.carol) == []
    world.clock.advance(shares_mod.retry_delay(1) + 1)
    await f.forward_due()
    assert world.received(world.carol) == []            # the second refusal
    world.clock.advance(shares_mod.retry_delay(2) + 1)
    await f.forward_due()
    assert world.received(world.carol) == [2000]
    [carol] = [s for s in (await world.service.get((await world.store.query(
        "SELECT id FROM micropay_tips"))[0][0]))["shares"] if s["name"] == "carol"]
    assert carol["status"] == "paid" and carol["attempts"] == 3

    await world.tip(4_000)
    node.refusals, node.only = 10 ** 6, None
    for k in range(1, MAX_ATTEMPTS + 1):
        await f.forward_due()
        world.clock.advance(shares_mod.retry_delay(k) + 1)
    rows = await world.store.query("SELECT status, attempt, error FROM micropay_tip_shares WHERE status = 'failed'")
    assert len(rows) == 2 and all(r[1] == MAX_ATTEMPTS and "no route" in r[2] for r in rows)
    assert world.received(world.carol) == [2000]


async def test_two_forwarders_at_once_pay_once(world):
    import asyncio
    for _ in range(5):
        await world.tip(4_000)
    a, b = world.forwarder(), world.forwarder()
    await asyncio.gather(a.forward_due(), b.forward_due(), a.forward_due(), b.forward_due())
    assert world.received(world.carol) == [2000] * 5 and world.received(world.dave) == [1000] * 5


async def test_a_share_below_the_minimum_waits_in_the_carry(world):
    """dave's quarter of a 2,000 msat tip is 500 msat, under the 1,000 msat minimum: not
    paid (no fee spent on it), all of it carried; the next tip pays him both quarters."""
    t1 = await world.tip(2_000)
    rows = await world.store.query("SELECT name, amount_msat, status FROM micropay_tip_shares WHERE tip_id = $1 "
                                   "ORDER BY idx", (t1,))
    assert [(r[0], int(r[1]), r[2]) for r in rows] == [("carol", 1000, "pending"), ("dave", 0, "skipped")]
    await world.tip(2_000)
    await world.forwarder().forward_due()
    assert world.received(world.carol) == [1000, 1000]
    assert world.received(world.dave) == [1000]                 # 500 + 500
    assert sorted(int(r[0]) for r in await world.store.query("SELECT carry FROM micropay_tip_carry")) == [0, 0]


async def test_fees_never_exceed_a_tenth_of_the_share(world):
    from micropay.creators.shares import fee_cap
    await world.tip(4_000)
    shares = await world.forwarder().repo.of_tip((await world.store.query("SELECT id FROM micropay_tips"))[0][0])
    assert [fee_cap(s) for s in shares] == [200, 100]        # 2000 and 1000 msat shares, cap 1000 msat


async def test_a_process_working_from_a_stale_read_pays_nothing_twice(world):
    """Process A read the due shares; meanwhile B sent carol's keysend, which went out but
    whose answer was lost (left sending). A, reaching carol from its old read, must not
    pay her again: it works from the row its claim returns, or not at all."""
    from micropay.core.errors import PaymentUnknown
    await world.tip(4_000)
    a = world.forwarder()
    stale = await a.repo.due(int(world.clock()), 20)

    class LostAnswer(CrashingNode):
        async def keysend(self, *args, **kwargs):
            await self.node.keysend(*args, **kwargs)
            raise PaymentUnknown("the connection to lightningd dropped")
    b = world.forwarder(LostAnswer(world.merchant, ""))
    await b.forward_due()
    assert world.received(world.carol) == [2000] and world.received(world.dave) == [1000]
    for s in stale:                        # A goes on from its old read
        fresh = await a.repo.claim(s, int(world.clock()) + 90, int(world.clock()))
        assert fresh is None or fresh.status is ShareStatus.SENDING
    world.clock.advance(shares_mod.LOOK_AGAIN_S + 1)
    await a.forward_due()
    assert world.received(world.carol) == [2000] and world.received(world.dave) == [1000]
    assert [r[0] for r in await world.store.query("SELECT status FROM micropay_tip_shares ORDER BY idx")] == \
        ["paid", "paid"]


async def test_an_address_that_never_answers_fails_after_the_attempts(world, monkeypatch):
    """Failing to get an invoice counts as an attempt: the share fails with the reason after
    MAX_ATTEMPTS, not retried for ever."""
    calls = []

    async def dead(address, amount, comment):
        calls.append(address)
        raise PaymentFailed("lightning address bob@example.com: timed out after 10 s")
    world.cfg = CreatorsConfig((AddressConfig("alice", "x", splits=(Split("bob@example.com", 1, "bob"),),
                                              keep_share=1),), "https://pay.example")
    world.service.cfg = world.cfg
    await world.tip(4_000)
    f = ShareForwarder(world.store, world.merchant, address_invoices=dead, clock=world.clock)
    for k in range(1, MAX_ATTEMPTS + 3):
        await f.forward_due()
        world.clock.advance(shares_mod.retry_delay(k) + 1)
    [(status, attempt, error)] = await world.store.query("SELECT status, attempt, error FROM micropay_tip_shares")
    assert status == "failed" and int(attempt) == MAX_ATTEMPTS and "timed out" in error
    assert len(calls) == MAX_ATTEMPTS
