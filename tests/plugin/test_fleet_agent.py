"""The fleet node agent (plugin/agent.py) on a sandbox node: it keeps each wanted pool
at its depth with real invoices of its node, tops it up as claims take them, and takes
unclaimed invoices about to expire out of the pool and off the node."""
from __future__ import annotations

import pytest

from micropay.lightning.bolt11codec import decode_invoice
from micropay.lightning.sandbox import SandboxNetwork
from micropay.plugin.agent import AgentSettings, FleetAgent
from micropay.store import open_store_from_url
from micropay.store.fleet import FLEET_SCHEMA, FleetRepository, Want

from ..conftest import PG_SKIP_REASON, FakeClock, drop_pg_schema, pg_url_with_fresh_schema


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def repo(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fleet.sqlite3'}"
    elif PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    else:
        url = pg_url_with_fresh_schema()
    store = open_store_from_url(url, (FLEET_SCHEMA,))
    await store.open()
    yield FleetRepository(store)
    await store.close()
    if request.param == "postgres":
        await drop_pg_schema(url)


def setup(clock, repo, per_round=200):
    net = SandboxNetwork(clock=clock)
    node = net.add_node("merchant")
    return node, FleetAgent(node, repo, AgentSettings(min_left_s=120, per_round=per_round), clock=clock)


async def claim(repo, clock, label, amount=5000, desc="a joke"):
    now_ms = int(clock() * 1000)
    return await repo.claim(label, amount, desc, now_ms=now_ms, payable_after=int(clock()) + 60,
                            fresh_since_ms=now_ms - 30_000)


async def test_the_agent_fills_a_wanted_pool_with_its_nodes_invoices_and_tops_it_up(repo):
    clock = FakeClock()
    node, agent = setup(clock, repo)
    await repo.want(Want(5000, "a joke", depth=10, expiry_s=600), int(clock() * 1000))
    assert await agent.round() == (10, 0)
    assert await agent.round() == (0, 0), "a full pool was filled again"
    got = [await claim(repo, clock, f"micropay-c{i}") for i in range(4)]
    for inv in got:
        decoded = decode_invoice(inv.bolt11)
        assert decoded.amount_msat == 5000 and decoded.description == "a joke"
        assert decoded.payment_hash == inv.payment_hash and await node.has_invoice(inv.payment_hash)
        assert inv.node_id == await node.node_id()
    assert await agent.round() == (4, 0), "the pool was not topped up to its depth"


async def test_per_round_bounds_what_the_node_is_asked_for(repo):
    clock = FakeClock()
    node, agent = setup(clock, repo, per_round=7)
    await repo.want(Want(5000, "a joke", depth=20, expiry_s=600), int(clock() * 1000))
    assert [(await agent.round())[0] for _ in range(4)] == [7, 7, 6, 0]


async def test_old_unclaimed_invoices_leave_the_pool_then_the_node(repo):
    clock = FakeClock()
    node, agent = setup(clock, repo)
    await repo.want(Want(5000, "a joke", depth=3, expiry_s=600), int(clock() * 1000))
    await agent.round()
    kept = await claim(repo, clock, "micropay-kept")
    pooled = await repo.stale(await node.node_id(), int(clock()) + 10_000, 10)
    assert len(pooled) == 2
    clock.advance(600 - 120 + 1)                     # within min_left_s of expiry
    added, pruned = await agent.round()
    assert pruned == 2 and added == 3
    for payment_hash, _ in pooled:
        assert not await node.has_invoice(payment_hash), "a pruned invoice is still on the node"
    assert await node.has_invoice(kept.payment_hash), "a claimed invoice was deleted from the node"
    assert (await repo.by_claim("micropay-kept")).payment_hash == kept.payment_hash


async def test_a_pool_nobody_asks_for_any_more_is_not_refilled(repo):
    clock = FakeClock()
    node, agent = setup(clock, repo)
    await repo.want(Want(5000, "a joke", depth=2, expiry_s=3600), int(clock() * 1000))
    await agent.round()
    await claim(repo, clock, "micropay-a")
    clock.advance(agent.settings.want_ttl_s + 1)
    assert (await agent.round())[0] == 0


async def test_a_stale_agent_is_skipped_until_it_beats_again(repo):
    clock = FakeClock()
    node, agent = setup(clock, repo)
    await repo.want(Want(5000, "a joke", depth=2, expiry_s=3600), int(clock() * 1000))
    await agent.round()
    clock.advance(31)                                # no heartbeat for longer than the claim's freshness
    assert await claim(repo, clock, "micropay-stale") is None
    await agent.beat()
    assert await claim(repo, clock, "micropay-fresh") is not None


@pytest.mark.parametrize("refused_first", [True, False])
async def test_a_pool_is_made_within_its_concurrency_and_a_refusal_stops_only_that_pool(repo, refused_first):
    """The node is asked for at most REFILL_CONCURRENCY invoices of the pools at a time
    (its payments come first); a pool whose invoices the node refuses stops for this
    round, and the other pools are still made."""
    from micropay.plugin.agent import REFILL_CONCURRENCY

    from ..conftest import SlowInvoices
    clock = FakeClock()
    node, agent = setup(clock, repo)
    slow = SlowInvoices(node, 0.01, refuse="not on this node")
    wants = [Want(5000, "not on this node", depth=30, expiry_s=600), Want(7000, "a joke", depth=30, expiry_s=600)]
    for want in wants if refused_first else wants[::-1]:
        await repo.want(want, int(clock() * 1000))
    assert await agent.refill_once() == 30
    assert slow.peak == REFILL_CONCURRENCY, slow.peak
    assert slow.refused <= REFILL_CONCURRENCY, f"{slow.refused} invoices asked of a node that refuses them"
    assert await repo.ready_count(await node.node_id(), 7000, "a joke", int(clock()) + 120) == 30
    assert await repo.ready_count(await node.node_id(), 5000, "not on this node", int(clock()) + 120) == 0


async def test_an_ask_the_node_call_fails_for_is_answered_with_the_error_and_a_store_failure_is_itself(repo):
    """Any error of the node call is that ask's answer (the other asks of the batch are
    still made); a failure of the store stops the batch and is raised as itself, so the
    agent's loop logs what went wrong (not an ExceptionGroup)."""
    from micropay.core.errors import StoreUnavailable
    clock = FakeClock()
    node, agent = setup(clock, repo)
    await agent.beat()
    me = await node.node_id()
    real = node.create_invoice

    async def flaky(amount, label, description, expiry_s, **kw):
        if description == "socket gone":
            raise ConnectionResetError("lightningd went away")
        return await real(amount, label, description, expiry_s, **kw)
    node.create_invoice = flaky
    now_ms = int(clock() * 1000)
    await repo.ask("micropay-a1", me, 1000, "socket gone", 600, now_ms)
    await repo.ask("micropay-a2", me, 2000, "fine", 600, now_ms)
    assert await agent.answer_asks() == 1
    assert "lightningd went away" in await repo.ask_error("micropay-a1")
    assert (await repo.by_claim("micropay-a2")).amount_msat == 2000
    await repo.ask("micropay-a3", me, 3000, "fine", 600, now_ms)

    async def store_down(*a, **kw):
        raise StoreUnavailable("the store is unavailable")
    repo.answer = store_down
    with pytest.raises(StoreUnavailable):
        await agent.answer_asks()
