"""Fleet mode's payment queue: the web tier asks (lightning/fleet.py), only a node agent
pays (plugin/agent.py), under its operator's caps, idempotent by the caller's label, and
a crash at any step boundary neither pays twice nor loses the payment. Checked at the
payee: what its sandbox node actually received."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from micropay.core.errors import PaymentFailed
from micropay.lightning.fleet import FleetBackend
from micropay.lightning.sandbox import SandboxNetwork
from micropay.plugin.agent import FEE_GRACE_S, REQUEUE_GRACE_S, AgentSettings, FleetAgent
from micropay.store import open_store_from_url
from micropay.store.fleet import FLEET_SCHEMA, FleetRepository, QueuedPayment

from ..conftest import PG_SKIP_REASON, FakeClock, drop_pg_schema, pg_url_with_fresh_schema

CAPS = AgentSettings(max_payment_msat=50_000, per_subject_day_msat=60_000, per_day_msat=200_000,
                     max_fee_msat=5000, lease_ms=10_000)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def world(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fleet.sqlite3'}"
    elif PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    else:
        url = pg_url_with_fresh_schema()
    store = open_store_from_url(url, (FLEET_SCHEMA,))
    await store.open()
    clock = FakeClock()
    net = SandboxNetwork(clock=clock)
    merchant = net.add_node("merchant", balance_msat=10_000_000)      # the node the agent runs on
    payee = net.add_node("player")
    repo = FleetRepository(store)
    backend = FleetBackend(repo, poll_s=0.01, clock=clock)
    await backend.start()
    yield repo, backend, merchant, payee, clock
    await backend.close()
    await store.close()
    if request.param == "postgres":
        await drop_pg_schema(url)


def agent_for(node, repo, clock, settings=CAPS, records=None):
    return FleetAgent(node, repo, settings, clock=clock, records=records)


@pytest.fixture(params=[False, True], ids=["caps-from-store", "caps-from-node-records"])
def node_records(request):
    """The crash tests run both ways: caps counted from the store's rows, and (as the plugin
    runs the agent) from the node's own records, which must come out right after a crash."""
    from micropay.lightning.memrecords import MemoryRecords
    return MemoryRecords() if request.param else None


async def node_spent(records, clock) -> int | None:
    from micropay.plugin.spend_ledger import SpendLedger
    return None if records is None else (await SpendLedger(records, clock).today())[0]


async def received(payee) -> int:
    return sum(s.amount_msat for s in payee._settled)


def fee_caps_asked(of) -> list[int]:
    """The fee caps the node `of` is asked to pay invoices with, in order (what the agent
    actually hands the node, whatever the row says)."""
    sent: list[int] = []
    pay = of.pay

    async def spy(bolt11, max_fee_msat=None, **kw):
        sent.append(max_fee_msat)
        return await pay(bolt11, max_fee_msat=max_fee_msat, **kw)
    of.pay = spy
    return sent


async def keysend_sent_then_agent_died(world, key: str, amount: int):
    """A tip share's keysend queued, leased and sent by the node under the agent's label,
    the agent then dying before it records the outcome: (the node's records, the payment)."""
    from micropay.lightning.memrecords import MemoryRecords
    repo, backend, merchant, payee, clock = world
    records = MemoryRecords()
    await repo.enqueue(QueuedPayment(key, "tip share", "", None, await payee.node_id(), None, amount, False, 1000),
                       int(clock() * 1000))
    p = await agent_for(merchant, repo, clock, records=records).start_payment()
    paid = await merchant.keysend(await payee.node_id(), amount, label=p.node_label, max_fee_msat=1000)
    return records, paid


async def pay_through_queue(backend, agent, bolt11, label, **kw):
    """The sidecar's pay() while the agent works the queue."""
    async def work():
        while True:
            await agent.pay_once()
            await asyncio.sleep(0.005)
    worker = asyncio.create_task(work())
    try:
        return await asyncio.wait_for(backend.pay(bolt11, label=label, **kw), 10)
    finally:
        worker.cancel()


async def test_a_refund_asked_by_the_sidecar_is_paid_by_the_agent_once(world):
    repo, backend, merchant, payee, clock = world
    agent = agent_for(merchant, repo, clock)
    inv = await payee.create_invoice(21_000, "r1", "refund", 3600)
    paid = await pay_through_queue(backend, agent, inv.bolt11, "micropay-refund-s1")
    assert paid.payment_hash == inv.payment_hash and paid.amount_msat == 21_000 and paid.preimage
    again = await pay_through_queue(backend, agent, inv.bolt11, "micropay-refund-s1")
    assert again == paid
    assert await received(payee) == 21_000, "the payee got the refund twice"
    row = await repo.payment("micropay-refund-s1")
    assert row.state == "paid" and row.kind == "refund" and row.node_id == await merchant.node_id()
    status = await backend.lookup_payment("micropay-refund-s1", 0)
    assert status.state == "complete" and status.payment.preimage == paid.preimage
    assert (await backend.payment_status(inv.payment_hash)).state == "complete"


async def test_an_amountless_return_invoice_is_paid_the_amount_asked(world):
    repo, backend, merchant, payee, clock = world
    agent = agent_for(merchant, repo, clock)
    inv = await payee.create_invoice(None, "r2", "return", 3600)
    paid = await pay_through_queue(backend, agent, inv.bolt11, "micropay-refund-s2", amount_msat=7000)
    assert paid.amount_msat == 7000 and await received(payee) == 7000


@pytest.mark.parametrize("amount, fee, subject, why", [
    (40_000, 1000, "alice", "per payout subject and UTC day"),     # alice already has 30,000 out today
])
async def test_each_cap_refuses_and_nothing_leaves(world, amount, fee, subject, why):
    repo, backend, merchant, payee, clock = world
    agent = agent_for(merchant, repo, clock)
    first = await payee.create_invoice(30_000, "first", "payout", 3600)
    await repo.enqueue(QueuedPayment("micropay-payout-1", "payout", "alice", first.bolt11, None, first.payment_hash,
                                     30_000, False, 1000), int(clock() * 1000))
    assert await agent.pay_once() and (await repo.payment("micropay-payout-1")).state == "paid"
    inv = await payee.create_invoice(amount, "second", "payout", 3600)
    await repo.enqueue(QueuedPayment("micropay-payout-2", "payout", subject, inv.bolt11, None, inv.payment_hash,
                                     amount, False, fee), int(clock() * 1000))
    await agent.pay_once()
    row = await repo.payment("micropay-payout-2")
    assert row.state == "failed" and why in row.error, row.error
    assert await received(payee) == 30_000


@pytest.mark.parametrize("amount, fee", [(50_001, 1000), (90_000, 1000)])
async def test_a_payment_over_a_nodes_cap_per_payment_waits_for_a_node_whose_cap_is_higher(world, amount, fee):
    """Caps are each node's own: a node never leases what is over its cap per payment
    (just over it or far over it alike), so nothing leaves it; the payment stays queued,
    and a node whose operator allows more pays it."""
    repo, backend, merchant, payee, clock = world
    inv = await payee.create_invoice(amount, "big", "payout", 3600)
    await repo.enqueue(QueuedPayment("micropay-payout-big", "payout", "", inv.bolt11, None, inv.payment_hash,
                                     amount, False, fee), int(clock() * 1000))
    assert not await agent_for(merchant, repo, clock).pay_once()
    assert (await repo.payment("micropay-payout-big")).state == "queued" and await received(payee) == 0
    bigger = merchant.net.add_node("bigger", balance_msat=10_000_000)
    generous = AgentSettings(max_payment_msat=100_000, per_subject_day_msat=200_000, per_day_msat=500_000,
                             max_fee_msat=10_000, lease_ms=10_000)
    assert await agent_for(bigger, repo, clock, generous).pay_once()
    row = await repo.payment("micropay-payout-big")
    assert row.state == "paid" and row.node_id == await bigger.node_id() and await received(payee) == amount


async def test_a_fee_allowance_over_a_nodes_fee_cap_is_paid_within_the_nodes_cap(world, node_records):
    """A session refund's fee allowance is a share of the refund (1% by default): a large
    refund's is over the node's default fee cap of 5,000 msat. The node pays it, trying
    within its own cap, and counts that, not the allowance, against its day."""
    repo, backend, merchant, payee, clock = world
    inv = await payee.create_invoice(40_000, "big-fee", "refund", 3600)
    await repo.enqueue(QueuedPayment("micropay-refund-big-fee", "refund", "", inv.bolt11, None, inv.payment_hash,
                                     40_000, False, 500_000), int(clock() * 1000))
    sent = fee_caps_asked(of=merchant)
    day = AgentSettings(max_payment_msat=50_000, per_subject_day_msat=60_000, per_day_msat=45_000,
                        max_fee_msat=5000, lease_ms=10_000)       # room for 40,000 + 5,000, not + 500,000
    agent = agent_for(merchant, repo, clock, day, records=node_records)
    assert await agent.start_payment() is None, "taken before a node whose fee cap covers it had its chance"
    clock.advance(FEE_GRACE_S + 1)
    p = await agent.start_payment()
    assert p is not None and p.state == "sending"
    assert await node_spent(node_records, clock) in (None, 45_000), "not amount + the node's fee cap reserved"
    # an operator raising the fee cap now does not raise what this payment may spend,
    # which its reservation was made on
    agent.settings = dataclasses.replace(day, max_fee_msat=500_000)
    await agent.send(p)
    row = await repo.payment("micropay-refund-big-fee")
    assert row.state == "paid" and await received(payee) == 40_000
    assert sent == [5000] and row.fee_msat <= 5000
    assert await node_spent(node_records, clock) in (None, 40_000 + row.fee_msat)


async def test_a_node_whose_fee_cap_covers_the_allowance_takes_the_payment_first(world):
    """In a fleet with nodes of different fee caps, a refund whose allowance is over one
    node's cap goes to a node whose cap covers it (the refund's one attempt gets the
    room to route), not to the first node that looks."""
    repo, backend, merchant, payee, clock = world
    inv = await payee.create_invoice(30_000, "room", "refund", 3600)
    await repo.enqueue(QueuedPayment("micropay-refund-room", "refund", "", inv.bolt11, None, inv.payment_hash,
                                     30_000, False, 20_000), int(clock() * 1000))
    assert not await agent_for(merchant, repo, clock).pay_once()          # fee cap 5,000
    assert (await repo.payment("micropay-refund-room")).state == "queued"
    roomy = merchant.net.add_node("roomy", balance_msat=10_000_000)
    sent = fee_caps_asked(of=roomy)
    assert await agent_for(roomy, repo, clock, dataclasses.replace(CAPS, max_fee_msat=50_000)).pay_once()
    row = await repo.payment("micropay-refund-room")
    assert row.state == "paid" and row.node_id == await roomy.node_id() and await received(payee) == 30_000
    assert sent == [20_000]


@pytest.mark.parametrize("amount, fee", [(10_000, -1_000_000), (0, 1000), (-5000, 1000)])
async def test_a_row_with_a_negative_fee_allowance_or_no_amount_is_refused(world, node_records, amount, fee):
    """A store writer's row with a negative fee allowance (or amount) would pass every cap
    check and reserve a negative amount, lifting the day's cap: it is refused, and the
    node's day stays as it was."""
    repo, backend, merchant, payee, clock = world
    inv = await payee.create_invoice(None, "neg", "refund", 3600)
    await repo.enqueue(QueuedPayment("micropay-refund-neg", "refund", "", inv.bolt11, None, inv.payment_hash,
                                     amount, True, fee), int(clock() * 1000))
    assert await agent_for(merchant, repo, clock, records=node_records).pay_once()
    row = await repo.payment("micropay-refund-neg")
    assert row.state == "failed" and "not positive" in row.error and await received(payee) == 0
    assert await node_spent(node_records, clock) in (None, 0)


async def test_a_node_without_a_cap_per_subject_leaves_payouts_to_others_and_still_pays_refunds(world):
    """micropay-fleet-pay-subject-day-msat = 0 (its default): the node pays no payout or tip
    share, as 0 for the other caps means nothing, but it neither fails them (another node
    may have a cap per subject) nor stops paying refunds, which have no subject."""
    repo, backend, merchant, payee, clock = world
    payout = await payee.create_invoice(10_000, "po", "payout", 3600)
    await repo.enqueue(QueuedPayment("micropay-payout-po", "payout", "player-1", payout.bolt11, None,
                                     payout.payment_hash, 10_000, False, 1000), int(clock() * 1000))
    refund = await payee.create_invoice(7000, "rf", "refund", 3600)
    await repo.enqueue(QueuedPayment("micropay-refund-rf", "refund", "", refund.bolt11, None,
                                     refund.payment_hash, 7000, False, 1000), int(clock() * 1000) + 1)
    no_subjects = AgentSettings(max_payment_msat=50_000, per_subject_day_msat=0, per_day_msat=200_000,
                                max_fee_msat=5000, lease_ms=10_000)
    agent = agent_for(merchant, repo, clock, no_subjects)
    assert await agent.pay_once()
    assert not await agent.pay_once()
    assert (await repo.payment("micropay-payout-po")).state == "queued"
    assert (await repo.payment("micropay-refund-rf")).state == "paid" and await received(payee) == 7000
    other = merchant.net.add_node("other", balance_msat=10_000_000)
    assert await agent_for(other, repo, clock).pay_once()
    assert (await repo.payment("micropay-payout-po")).state == "paid" and await received(payee) == 17_000


async def test_the_daily_cap_holds_across_payments_and_frees_a_day_later(world):
    repo, backend, merchant, payee, clock = world
    agent = agent_for(merchant, repo, clock)
    states = []
    for i in range(6):                                  # 6 x 40,000 (+1,000 fee allowance) against 200,000
        inv = await payee.create_invoice(40_000, f"d{i}", "payout", 3600 * 48)
        await repo.enqueue(QueuedPayment(f"micropay-payout-d{i}", "payout", f"p{i}", inv.bolt11, None,
                                         inv.payment_hash, 40_000, False, 1000), int(clock() * 1000))
        await agent.pay_once()
        states.append((await repo.payment(f"micropay-payout-d{i}")).state)
    # what the day's cap leaves no room for stays queued (another node may pay it), not failed
    assert states == ["paid"] * 4 + ["queued"] * 2 and await received(payee) == 160_000
    clock.advance(86_401)
    inv = await payee.create_invoice(40_000, "next-day", "payout", 3600)
    await repo.enqueue(QueuedPayment("micropay-payout-next", "payout", "p9", inv.bolt11, None, inv.payment_hash,
                                     40_000, False, 1000), int(clock() * 1000))
    for _ in range(3):
        await agent.pay_once()
    assert [(await repo.payment(k)).state for k in ("micropay-payout-d4", "micropay-payout-d5",
                                                    "micropay-payout-next")] == ["paid"] * 3
    assert await received(payee) == 280_000


async def test_a_crash_after_the_lease_gives_the_payment_to_the_next_agent_after_the_lease(world, node_records):
    repo, backend, merchant, payee, clock = world
    inv = await payee.create_invoice(9000, "c1", "refund", 3600)
    await repo.enqueue(QueuedPayment("micropay-refund-c1", "refund", "", inv.bolt11, None, inv.payment_hash, 9000,
                                     False, 1000), int(clock() * 1000))
    crashed = agent_for(merchant, repo, clock, records=node_records)
    assert await repo.lease(await crashed.node_id(), int(clock() * 1000), CAPS.lease_ms,
                            10**12) is not None   # then dies
    restarted = agent_for(merchant, repo, clock, records=node_records)
    assert not await restarted.pay_once(), "a live lease was taken over"
    clock.advance(CAPS.lease_ms / 1000 + 1)
    assert await restarted.pay_once()
    row = await repo.payment("micropay-refund-c1")
    assert row.state == "paid" and await received(payee) == 9000
    assert await node_spent(node_records, clock) in (None, 9000 + (row.fee_msat or 0))


async def test_a_crash_after_recording_sending_before_paying_is_requeued_after_the_grace(world, node_records):
    repo, backend, merchant, payee, clock = world
    inv = await payee.create_invoice(9000, "c2", "refund", 3600)
    await repo.enqueue(QueuedPayment("micropay-refund-c2", "refund", "", inv.bolt11, None, inv.payment_hash, 9000,
                                     False, 1000), int(clock() * 1000))
    crashed = agent_for(merchant, repo, clock, records=node_records)
    assert (await crashed.start_payment()).state == "sending"                  # then dies before paying
    assert await node_spent(node_records, clock) in (None, 10_000)             # amount + fee allowance reserved
    restarted = agent_for(merchant, repo, clock, records=node_records)
    await restarted.pay_once()
    assert (await repo.payment("micropay-refund-c2")).state == "sending", "requeued before the grace"
    clock.advance(REQUEUE_GRACE_S + 1)
    await restarted.pay_once()                        # back to the queue, then paid under a new label
    await restarted.pay_once()
    row = await repo.payment("micropay-refund-c2")
    assert row.state == "paid" and await received(payee) == 9000
    assert await node_spent(node_records, clock) in (None, 9000 + (row.fee_msat or 0)), "counted twice"


async def test_a_payment_requeued_from_one_node_is_paid_once_by_another(world):
    """The first node recorded it as sending and died before paying; after the grace it
    goes back to the queue and the second node pays it, once. The first node's own
    records keep its reservation for the day: whether it was sent is the store's word,
    not the node's, and a store writer must not be able to make a node's caps forget a
    payment (the safe side: that day's cap counts it on both nodes)."""
    from micropay.lightning.memrecords import MemoryRecords
    repo, backend, merchant, payee, clock = world
    other = merchant.net.add_node("other", balance_msat=10_000_000)
    first_records, other_records = MemoryRecords(), MemoryRecords()
    inv = await payee.create_invoice(9000, "c4", "refund", 3600)
    await repo.enqueue(QueuedPayment("micropay-refund-c4", "refund", "bob", inv.bolt11, None, inv.payment_hash, 9000,
                                     False, 1000), int(clock() * 1000))
    first = agent_for(merchant, repo, clock, records=first_records)
    assert (await first.start_payment()).state == "sending"                     # then dies before paying
    clock.advance(REQUEUE_GRACE_S + 1)
    first = agent_for(merchant, repo, clock, records=first_records)             # restarted
    assert await first.reconcile() == 1 and (await repo.payment("micropay-refund-c4")).state == "queued"
    assert await node_spent(first_records, clock) == 10_000
    assert await agent_for(other, repo, clock, records=other_records).pay_once()
    row = await repo.payment("micropay-refund-c4")
    assert row.state == "paid" and row.node_id == await other.node_id() and await received(payee) == 9000
    assert await node_spent(other_records, clock) == 9000 + (row.fee_msat or 0)


async def test_a_settled_payment_the_store_puts_back_in_the_queue_is_not_paid_again(world):
    """A store writer rewrites a paid keysend's row back to queued: the node's own records
    know that key settled, so its agent refuses it instead of paying it a second time."""
    from micropay.lightning.memrecords import MemoryRecords
    repo, backend, merchant, payee, clock = world
    records = MemoryRecords()
    agent = agent_for(merchant, repo, clock, records=records)
    await repo.enqueue(QueuedPayment("micropay-tipshare-k1", "tip share", "", None, await payee.node_id(), None,
                                     5000, False, 1000), int(clock() * 1000))
    assert await agent.pay_once()
    assert (await repo.payment("micropay-tipshare-k1")).state == "paid" and payee.keysends_received == [(5000, {})]
    for _ in range(2):                      # today, and again after midnight (yesterday's record)
        await repo.store.execute("UPDATE micropay_fleet_payments SET state = 'queued', node_id = NULL, "
                                 "node_label = NULL, sendpays_start = NULL, sent_ms = NULL, lease_until_ms = 0, "
                                 "preimage = NULL, fee_msat = NULL, done_ms = NULL WHERE key = $1",
                                 ("micropay-tipshare-k1",))
        assert await agent.pay_once()       # refused: the agent looks at the queue again at once
        row = await repo.payment("micropay-tipshare-k1")
        assert row.state == "failed" and "settled already" in row.error, row
        assert payee.keysends_received == [(5000, {})], "paid twice"
        clock.advance(86_400)


async def test_a_crash_after_paying_before_recording_is_settled_from_the_nodes_record(world, node_records):
    repo, backend, merchant, payee, clock = world
    inv = await payee.create_invoice(9000, "c3", "refund", 3600)
    await repo.enqueue(QueuedPayment("micropay-refund-c3", "refund", "", inv.bolt11, None, inv.payment_hash, 9000,
                                     False, 1000), int(clock() * 1000))
    crashed = agent_for(merchant, repo, clock, records=node_records)
    p = await crashed.start_payment()
    paid = await merchant.pay(p.bolt11, max_fee_msat=1000, label=p.node_label)     # then dies before recording
    restarted = agent_for(merchant, repo, clock, records=node_records)
    for _ in range(3):
        await restarted.pay_once()
    row = await repo.payment("micropay-refund-c3")
    assert row.state == "paid" and row.preimage == paid.preimage
    assert await received(payee) == 9000, "paid twice after the crash"
    assert await node_spent(node_records, clock) in (None, 9000 + (row.fee_msat or 0))


async def test_while_queued_a_payment_counts_as_in_flight_never_as_dead(world):
    repo, backend, merchant, payee, clock = world
    inv = await payee.create_invoice(9000, "q", "refund", 3600)
    await repo.enqueue(QueuedPayment("micropay-refund-q", "refund", "", inv.bolt11, None, inv.payment_hash, 9000,
                                     False, 1000), int(clock() * 1000))
    assert await backend.htlc_in_flight(inv.payment_hash)
    assert (await backend.lookup_payment("micropay-refund-q", 0)).state == "pending"


async def test_a_label_reused_for_another_payment_is_refused(world):
    repo, backend, merchant, payee, clock = world
    a = await payee.create_invoice(1000, "a", "x", 3600)
    b = await payee.create_invoice(2000, "b", "x", 3600)
    await repo.enqueue(QueuedPayment("micropay-refund-l", "refund", "", a.bolt11, None, a.payment_hash, 1000, False,
                                     1000), int(clock() * 1000))
    with pytest.raises(PaymentFailed, match="another queued payment"):
        await backend.pay(b.bolt11, label="micropay-refund-l")


async def test_a_payment_goes_to_a_node_with_the_outbound_liquidity_to_carry_it(world):
    """Two agents: the one whose node's balance cannot carry amount + fee allowance never
    leases it; the other pays it. With nobody able to carry it, it stays queued."""
    repo, backend, merchant, payee, clock = world
    poor = merchant.net.add_node("poor", balance_msat=9000)             # 9000 < 9000 + 1000
    inv = await payee.create_invoice(9000, "o1", "refund", 3600)
    await repo.enqueue(QueuedPayment("micropay-refund-o1", "refund", "", inv.bolt11, None, inv.payment_hash, 9000,
                                     False, 1000), int(clock() * 1000))
    assert not await agent_for(poor, repo, clock).pay_once(), "a node without the liquidity took the payment"
    assert (await repo.payment("micropay-refund-o1")).state == "queued"
    assert await agent_for(merchant, repo, clock).pay_once()
    row = await repo.payment("micropay-refund-o1")
    assert row.state == "paid" and row.node_id == await merchant.node_id() and poor.balance_msat == 9000
    big = await payee.create_invoice(20_000_000, "o2", "refund", 3600)          # more than anyone holds
    await repo.enqueue(QueuedPayment("micropay-refund-o2", "refund", "", big.bolt11, None, big.payment_hash,
                                     20_000_000, False, 1000), int(clock() * 1000))
    assert not await agent_for(merchant, repo, clock).pay_once()
    assert (await repo.payment("micropay-refund-o2")).state == "queued"
    assert await received(payee) == 9000


async def test_a_game_payout_through_the_queue_carries_its_player_so_the_agents_cap_per_player_holds(world,
                                                                                                      tmp_path):
    """The games service pays through the fleet port; its payouts name the player, so the
    agent's own cap per player and day (the operator's, in the plugin) holds even when
    the sidecar's game caps would allow more."""
    from micropay.games.config import PayoutCaps
    from micropay.games.payouts import Payouts
    from micropay.games.schema import GAMES_SCHEMA
    from micropay.store.core import CORE_SCHEMA
    repo, backend, merchant, payee, clock = world
    games_store = open_store_from_url(f"sqlite:///{tmp_path / 'games.sqlite3'}", (CORE_SCHEMA, GAMES_SCHEMA))
    await games_store.open()
    try:
        payouts = Payouts(PayoutCaps(10**9, 10**9, 1000), games_store, backend, clock=clock)
        agent = agent_for(merchant, repo, clock)
        worker = asyncio.create_task(_work(agent))
        try:
            results = []
            for i in range(3):                  # 3 x 25,000 (+1,000 fee allowance) against alice's 60,000
                inv = await payee.create_invoice(25_000, f"g{i}", "reward", 3600)
                view, _ = await asyncio.wait_for(payouts.create(
                    {"player_id": "alice", "destination": inv.bolt11, "idempotency_key": f"alice-{i}"}), 10)
                results.append(view["status"])
        finally:
            worker.cancel()
        assert results == ["paid", "paid", "failed"], results
        rows = [await repo.payment(k) for k in [r[0] for r in await repo.store.query(
            "SELECT key FROM micropay_fleet_payments ORDER BY created_ms, key")]]
        assert {r.subject for r in rows} == {"alice"} and {r.kind for r in rows} == {"payout"}
        failed = [r for r in rows if r.state == "failed"]
        assert len(failed) == 1 and "per payout subject and UTC day" in failed[0].error, failed
        assert await received(payee) == 50_000
    finally:
        await games_store.close()


async def _work(agent):
    while True:
        await agent.pay_once()
        await asyncio.sleep(0.005)


async def test_the_invoice_decides_the_amount_a_row_that_lies_about_it_is_refused(world):
    """A web tier that queues a large invoice beside a small amount gets nothing paid: the
    agent checks the caps on the invoice's own amount and hash."""
    repo, backend, merchant, payee, clock = world
    agent = agent_for(merchant, repo, clock)
    big = await payee.create_invoice(45_000, "big", "payout", 3600)
    await repo.enqueue(QueuedPayment("micropay-payout-lie", "payout", "mallory", big.bolt11, None, big.payment_hash,
                                     1, False, 1000), int(clock() * 1000))
    other = await payee.create_invoice(1000, "other", "payout", 3600)
    await repo.enqueue(QueuedPayment("micropay-payout-hash", "payout", "", big.bolt11, None, other.payment_hash,
                                     45_000, False, 1000), int(clock() * 1000))
    amountless = await payee.create_invoice(None, "any", "payout", 3600)
    await repo.enqueue(QueuedPayment("micropay-payout-any", "payout", "", amountless.bolt11, None,
                                     amountless.payment_hash, 1000, False, 1000), int(clock() * 1000))
    for _ in range(3):
        await agent.pay_once()
    rows = {k: await repo.payment(k) for k in ("micropay-payout-lie", "micropay-payout-hash", "micropay-payout-any")}
    assert rows["micropay-payout-lie"].state == "failed" and "asks 45000 msat" in rows["micropay-payout-lie"].error
    assert rows["micropay-payout-hash"].state == "failed" and "hash" in rows["micropay-payout-hash"].error
    assert rows["micropay-payout-any"].state == "failed" and "names no amount" in rows["micropay-payout-any"].error
    assert await received(payee) == 0


async def test_a_node_whose_caps_are_zero_leaves_payments_to_the_others(world):
    repo, backend, merchant, payee, clock = world
    closed = agent_for(merchant, repo, clock, AgentSettings())            # the defaults: the queue pays nothing
    inv = await payee.create_invoice(9000, "z", "refund", 3600)
    await repo.enqueue(QueuedPayment("micropay-refund-z", "refund", "", inv.bolt11, None, inv.payment_hash, 9000,
                                     False, 1000), int(clock() * 1000))
    assert not await closed.pay_once()
    assert (await repo.payment("micropay-refund-z")).state == "queued"
    assert await agent_for(merchant, repo, clock).pay_once()
    assert (await repo.payment("micropay-refund-z")).state == "paid"


async def test_with_the_nodes_own_records_the_caps_hold_whatever_the_store_says(world):
    """The spending the caps are checked against lives in the node's datastore: a web tier
    that rewrites the store's payment rows (hiding what was paid) gains nothing."""
    from micropay.lightning.memrecords import MemoryRecords
    repo, backend, merchant, payee, clock = world
    records = MemoryRecords()
    agent = FleetAgent(merchant, repo, CAPS, clock=clock, records=records)
    for i in range(2):                        # 2 x 25,000 (+1,000 fee allowance) for alice: 52,000 of 60,000
        inv = await payee.create_invoice(25_000, f"t{i}", "payout", 3600)
        await repo.enqueue(QueuedPayment(f"micropay-payout-t{i}", "payout", "alice", inv.bolt11, None,
                                         inv.payment_hash, 25_000, False, 1000), int(clock() * 1000))
        assert await agent.pay_once()
        # the store is told nothing was paid
        await repo.store.execute("UPDATE micropay_fleet_payments SET amount_msat = 0, fee_msat = 0, "
                                 "max_fee_msat = 0")
    inv = await payee.create_invoice(25_000, "t2", "payout", 3600)
    await repo.enqueue(QueuedPayment("micropay-payout-t2", "payout", "alice", inv.bolt11, None, inv.payment_hash,
                                     25_000, False, 1000), int(clock() * 1000))
    await agent.pay_once()
    row = await repo.payment("micropay-payout-t2")
    assert row.state == "failed" and "subject and UTC day" in row.error, row
    assert await received(payee) == 50_000
    doc = next(iter(records.records.values()))
    import json
    ledger = json.loads(doc[0])
    fees = [(await repo.payment(f"micropay-payout-t{i}")).fee_msat or 0 for i in range(2)]
    assert ledger["subjects"]["alice"] == ledger["total"] == 50_000 + sum(fees)


async def test_the_ledger_releases_a_failed_payment_and_a_retry_reserves_once(world):
    from micropay.lightning.memrecords import MemoryRecords
    from micropay.plugin.spend_ledger import RESERVED, SETTLED, SpendLedger
    repo, backend, merchant, payee, clock = world
    ledger = SpendLedger(MemoryRecords(), clock)
    assert await ledger.reserve("k1", "bob", 11_000, "l1", 1) == RESERVED
    assert await ledger.reserve("k1", "bob", 11_000, "l1b", 1) == RESERVED  # a retry after a crash: counted once
    assert await ledger.today("bob") == (11_000, 11_000)
    await ledger.settle("k1", 0, "l1b")                      # it failed: released
    await ledger.settle("k1", 0, "l1b")
    assert await ledger.today("bob") == (0, 0)
    assert await ledger.reserve("k1", "bob", 11_000, "l1c", 1) == SETTLED, "a settled key was reserved again"
    assert await ledger.reserve("k2", "bob", 11_000, "l2", 1) == RESERVED
    clock.advance(86_400)                                    # paid after midnight: yesterday's record is trimmed
    await ledger.settle("k2", 10_007, "l2")
    assert await ledger.today("bob") == (0, 0)
    assert await ledger.reserve("k2", "bob", 11_000, "l2b", 1) == SETTLED, "settled yesterday, reserved again today"
    clock.advance(-86_400)
    assert await ledger.today("bob") == (10_007, 10_007)


async def test_the_ledger_keeps_what_was_paid_whatever_outcome_the_store_points_at(world):
    """Outcomes reach the ledger through the store's row (its node label): a settled
    entry is final, and an outcome under a label this node never sent the key under
    changes nothing. A store writer cannot make the day forget a payment."""
    from micropay.lightning.memrecords import MemoryRecords
    from micropay.plugin.spend_ledger import SpendLedger
    repo, backend, merchant, payee, clock = world
    ledger = SpendLedger(MemoryRecords(), clock)
    assert await ledger.reserve("k3", "carol", 21_000, "mine", 1) == "reserved"
    await ledger.settle("k3", 0, "someone-elses-failed-attempt")      # a forged label: ignored
    assert await ledger.today("carol") == (21_000, 21_000)
    await ledger.settle("k3", 20_010, "mine")                          # paid
    await ledger.settle("k3", 0, "mine")                               # then "failed", per a rewritten row
    assert await ledger.today("carol") == (20_010, 20_010)


async def test_a_sending_row_rewritten_to_look_unsent_is_not_sent_again(world):
    """The node paid a keysend under its label, then its agent died before recording it.
    A store writer points the row at a label the node never used and backdates it, so
    that the store says "never sent": the agent asks the node about the attempts its own
    records hold, finds the payment and records it, instead of requeueing the row (which
    would have paid it a second time)."""
    repo, backend, merchant, payee, clock = world
    records, paid = await keysend_sent_then_agent_died(world, "micropay-tipshare-k2", 7000)
    await repo.store.execute("UPDATE micropay_fleet_payments SET node_label = 'micropay-fleet-pay-forged', "
                             "sent_ms = 0 WHERE key = $1", ("micropay-tipshare-k2",))
    clock.advance(REQUEUE_GRACE_S + 1)
    restarted = agent_for(merchant, repo, clock, records=records)
    for _ in range(3):
        await restarted.pay_once()
    row = await repo.payment("micropay-tipshare-k2")
    assert row.state == "paid" and row.preimage == paid.preimage, row
    assert payee.keysends_received == [(7000, {})], "paid twice"
    assert await node_spent(records, clock) == 7000 + paid.fee_msat


async def test_a_payment_in_flight_put_back_in_the_queue_is_not_sent_again(world):
    """The node's keysend went out (the agent died before recording the outcome); a store
    writer puts the row back in the queue. The same node leases it again, asks its node
    about the attempt its own records hold, finds it paid, and records that, instead of
    sending a second keysend; its day counts the payment once."""
    repo, backend, merchant, payee, clock = world
    records, paid = await keysend_sent_then_agent_died(world, "micropay-tipshare-k3", 6000)
    await repo.store.execute("UPDATE micropay_fleet_payments SET state = 'queued', node_id = NULL, "
                             "node_label = NULL, sendpays_start = NULL, sent_ms = NULL, lease_until_ms = 0 "
                             "WHERE key = $1", ("micropay-tipshare-k3",))
    restarted = agent_for(merchant, repo, clock, records=records)
    for _ in range(3):
        await restarted.pay_once()
    row = await repo.payment("micropay-tipshare-k3")
    assert row.state == "paid" and row.preimage == paid.preimage, row
    assert payee.keysends_received == [(6000, {})], "paid twice"
    assert await node_spent(records, clock) == 6000 + paid.fee_msat


async def test_the_day_counts_what_the_node_sent_not_what_the_row_says(world):
    """Paid, but the agent died before recording it; a store writer lowers the row's
    amount before the restarted agent settles it from the node's record: the day's
    total is what the node sent."""
    repo, backend, merchant, payee, clock = world
    records, paid = await keysend_sent_then_agent_died(world, "micropay-tipshare-k4", 9000)
    await repo.store.execute("UPDATE micropay_fleet_payments SET amount_msat = 1 WHERE key = $1",
                             ("micropay-tipshare-k4",))
    restarted = agent_for(merchant, repo, clock, records=records)
    await restarted.pay_once()
    assert (await repo.payment("micropay-tipshare-k4")).state == "paid"
    assert await node_spent(records, clock) == 9000 + paid.fee_msat


async def test_a_payment_reserved_before_midnight_and_retried_after_is_counted_once(world):
    """The agent reserved and recorded a payment as sending just before midnight, then
    died before paying; after midnight (and the grace) it goes back to the queue and is
    paid: the reservation stays in the day it was made, and today's record does not
    count it a second time."""
    from micropay.lightning.memrecords import MemoryRecords
    from micropay.plugin.spend_ledger import SpendLedger
    repo, backend, merchant, payee, clock = world
    clock.advance(86_400 - clock() % 86_400 - 60)            # a minute to midnight
    records = MemoryRecords()
    inv = await payee.create_invoice(9000, "m1", "refund", 3600)
    await repo.enqueue(QueuedPayment("micropay-refund-m1", "refund", "", inv.bolt11, None, inv.payment_hash, 9000,
                                     False, 1000), int(clock() * 1000))
    assert (await agent_for(merchant, repo, clock, records=records).start_payment()).state == "sending"   # dies
    clock.advance(REQUEUE_GRACE_S + 120)
    restarted = agent_for(merchant, repo, clock, records=records)
    for _ in range(3):
        await restarted.pay_once()
    row = await repo.payment("micropay-refund-m1")
    assert row.state == "paid" and await received(payee) == 9000
    ledger = SpendLedger(records, clock)
    assert (await ledger.today())[0] == 0, "counted again after midnight"
    clock.advance(-86_400)
    assert (await ledger.today())[0] == 9000 + (row.fee_msat or 0)
