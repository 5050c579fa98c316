"""A sidecar's invoices in fleet mode (lightning/fleet.py), against agents on sandbox
nodes: claimed from the pool, asked for on demand within a bounded wait, and paid
invoices coming back in order through the store's settlement feed (also to a listener
in another process, woken by PostgreSQL's NOTIFY)."""
from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import textwrap
import time

import pytest

from micropay.core.errors import NoInvoiceInTime, PaymentFailed
from micropay.lightning.bolt11codec import decode_invoice
from micropay.lightning.fleet import FleetBackend
from micropay.lightning.sandbox import SandboxNetwork
from micropay.plugin.agent import AgentSettings, FleetAgent
from micropay.store import open_store_from_url
from micropay.store.fleet import FLEET_SCHEMA, FleetRepository, FleetSettlement, NodeBeat
from micropay.store.fleet import PooledInvoice as FleetPooled

from ..conftest import PG_SKIP_REASON, drop_pg_schema, pg_url_with_fresh_schema


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def fleet(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fleet.sqlite3'}"
    elif PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    else:
        url = pg_url_with_fresh_schema()
    store = open_store_from_url(url, (FLEET_SCHEMA,))
    await store.open()
    repo = FleetRepository(store)
    net = SandboxNetwork()
    merchant = net.add_node("merchant")
    payer = net.add_node("payer", balance_msat=10_000_000)
    agent = FleetAgent(merchant, repo, AgentSettings(min_left_s=120))
    backend = FleetBackend(repo, ask_timeout_s=1.0, gap_grace_s=0.3)
    await backend.start()
    yield repo, agent, backend, payer, url
    await backend.close()
    await store.close()
    if request.param == "postgres":
        await drop_pg_schema(url)


async def test_a_price_missed_twice_is_pooled_and_then_claimed(fleet):
    """A one-off price is made on demand and pooled by nobody; its second miss makes it
    wanted, and the agents' pools serve it from then on."""
    repo, agent, backend, payer, _ = fleet
    await agent.beat()
    answering = asyncio.create_task(_answer_forever(agent))
    try:
        first = await backend.create_invoice(5000, "micropay-c1", "a joke", 600)     # a miss: asked on demand
        assert await agent.refill_once() == 0, "a price seen once was pooled"
        again = await backend.create_invoice(5000, "micropay-c0", "a joke", 600)     # the second miss
    finally:
        answering.cancel()
    assert decode_invoice(first.bolt11).amount_msat == 5000 and first.label == "micropay-c1"
    assert again.payment_hash != first.payment_hash
    assert await agent.refill_once() == backend.pool_depth, "the second miss did not make the price wanted"
    second = await backend.create_invoice(5000, "micropay-c2", "a joke", 600)
    assert (await repo.by_claim("micropay-c2")).node_label.startswith("micropay-fleet-")
    assert second.payment_hash != first.payment_hash
    assert (await backend.create_invoice(5000, "micropay-c2", "a joke", 600)) == second, "not idempotent by label"
    assert await backend.has_invoice(second.payment_hash)


async def test_an_amountless_or_unpooled_invoice_comes_on_demand_within_the_wait(fleet):
    repo, agent, backend, payer, _ = fleet
    await agent.beat()
    answering = asyncio.create_task(_answer_forever(agent))
    try:
        t0 = time.monotonic()
        inv = await backend.create_invoice(None, "micropay-any", "return invoice", 3600)
        odd = await backend.create_invoice(12_345, "micropay-odd", "a dynamic price", 600)
        elapsed = time.monotonic() - t0
    finally:
        answering.cancel()
    assert inv.amount_msat is None and decode_invoice(inv.bolt11).amount_msat is None
    assert decode_invoice(odd.bolt11).amount_msat == 12_345
    assert elapsed < 1.0, f"on-demand invoices took {elapsed:.2f} s"


async def test_without_an_answer_the_wait_is_bounded_and_says_retry(fleet):
    repo, agent, backend, payer, _ = fleet
    with pytest.raises(NoInvoiceInTime) as none_live:
        await backend.create_invoice(777, "micropay-n0", "nobody", 600)
    assert none_live.value.http_status == 503 and none_live.value.retry_after_s >= 1
    await agent.beat()                               # alive, but never answers
    t0 = time.monotonic()
    with pytest.raises(NoInvoiceInTime) as late:
        await backend.create_invoice(777, "micropay-n1", "nobody answers", 600)
    assert 0.9 <= time.monotonic() - t0 < 2.0
    assert "within" in str(late.value)


async def test_on_demand_asks_rotate_over_live_nodes_that_can_receive_the_amount(fleet):
    """Round robin over live nodes, skipping one whose reported inbound liquidity is below
    the amount; none able: 503 at once, without waiting for the ask timeout."""
    repo, agent, backend, payer, _ = fleet
    now_ms = int(time.time() * 1000)
    for node, inbound in (("02" + "a" * 64, 10_000), ("02" + "b" * 64, 10_000), ("02" + "c" * 64, 500)):
        await repo.heartbeat(NodeBeat(node, "regtest", now_ms, inbound, 0))
    asked = []
    for i in range(6):
        with pytest.raises(NoInvoiceInTime):      # nobody answers: the asks stay in the table
            backend.ask_timeout_s = 0.01
            await backend.create_invoice(1000 + i, f"micropay-rr{i}", "rotating", 600)
        asked.append((await repo.store.fetchrow("SELECT node_id FROM micropay_fleet_asks WHERE claim_label = $1",
                                                (f"micropay-rr{i}",)))[0])
    assert set(asked) == {"02" + "a" * 64, "02" + "b" * 64} and asked.count("02" + "a" * 64) == 3
    t0 = time.monotonic()
    backend.ask_timeout_s = 5
    with pytest.raises(NoInvoiceInTime, match="inbound"):
        await backend.create_invoice(20_000, "micropay-big", "too big for all", 600)
    assert time.monotonic() - t0 < 1


async def test_a_node_on_another_network_gets_no_claims_asks_or_payments(fleet, caplog):
    """A sidecar on regtest never hands out an invoice of a node whose agent reports
    another network (a client's wallet on regtest could not pay it), nor counts its
    liquidity: such a node is as good as absent, and the log says why, once."""
    import logging
    from micropay.store.fleet import Want
    repo, agent, backend, payer, _ = fleet
    mainnet = "03" + "d" * 64
    now_ms = int(time.time() * 1000)
    await repo.want(Want(4000, "nets", 4, 3600), now_ms)
    await repo.heartbeat(NodeBeat(mainnet, "bitcoin", now_ms, 10**9, 10**9))
    for i in range(4):
        await repo.add(FleetPooled(f"{i:064x}", mainnet, f"micropay-fleet-main{i}", 4000, "nets", "lnbc1...",
                                   int(time.time()) + 3600, None), now_ms)
    backend.ask_timeout_s = 0.2
    with caplog.at_level(logging.WARNING, logger="micropay.fleet"):
        for i in range(2):
            with pytest.raises(NoInvoiceInTime, match="no Lightning node"):
                await backend.create_invoice(4000, _challenge_label(), "nets", 600)
    liquidity = await backend.liquidity()
    assert (liquidity.inbound_msat, liquidity.outbound_msat) == (0, 0) and not await backend.wait_until_ready(0.1)
    said = [r.getMessage() for r in caplog.records if "reports network 'bitcoin'" in r.getMessage()]
    assert len(said) == 1 and mainnet in said[0], said
    assert f'micropay_fleet_node_live{{node="{mainnet}"}} 0' in await backend.metrics_text()
    assert await repo.ready_count(mainnet, 4000, "nets", int(time.time())) == 4, "a mainnet invoice was claimed"
    await agent.beat()                                  # a regtest node: served as before
    assert await agent.refill_once() > 0
    await asyncio.sleep(1.1)                            # the live nodes are reread at most once a second
    got = await backend.create_invoice(4000, _challenge_label(), "nets", 600)
    assert decode_invoice(got.bolt11).payee == await agent.node_id()


async def test_what_the_queue_cannot_carry_is_refused_at_once(fleet):
    repo, agent, backend, payer, _ = fleet
    with pytest.raises(PaymentFailed, match="offers"):
        await backend.fetch_invoice("lno1...", 1000)
    with pytest.raises(PaymentFailed, match="TLV"):
        await backend.keysend("02" * 33, 1000, label="micropay-payout-x", extratlvs={"7629169": "00"})
    with pytest.raises(PaymentFailed, match="label"):
        await backend.keysend("02" * 33, 1000)
    assert await repo.payment("micropay-payout-x") is None, "a refused payment was queued"


async def test_paid_invoices_reach_the_sidecar_in_order_with_its_own_labels(fleet):
    repo, agent, backend, payer, _ = fleet
    await agent.beat()
    answering = asyncio.create_task(_answer_forever(agent))
    following = asyncio.create_task(agent.follow_settlements())
    try:
        invoices = [await backend.create_invoice(1000 + i, f"micropay-p{i}", "item", 600) for i in range(3)]
        for inv in invoices:
            await payer.pay(inv.bolt11)
        seen = []
        async def read():
            async for s in backend.settlements(0):
                seen.append(s)
                if len(seen) == 3:
                    return
        await asyncio.wait_for(read(), 5)
        for _ in range(100):                          # the agent advances its cursor just after recording
            if await repo.pay_index(await agent.node_id()) == 3:
                break
            await asyncio.sleep(0.01)
    finally:
        answering.cancel()
        following.cancel()
    assert [(s.label, s.amount_msat) for s in seen] == [(f"micropay-p{i}", 1000 + i) for i in range(3)]
    assert [s.pay_index for s in seen] == sorted(s.pay_index for s in seen)
    assert await repo.pay_index(await agent.node_id()) == 3, "the agent's cursor did not follow its node"


async def test_a_gap_in_the_feed_is_waited_for_then_stepped_over(fleet):
    repo, agent, backend, payer, _ = fleet
    store = repo.store

    async def put(seq, label):
        await store.execute("INSERT INTO micropay_fleet_settlements (seq, payment_hash, node_id, claim_label, "
                            "amount_msat, preimage, paid_at) VALUES ($1, $2, 'n', $3, 1, '00', 1)",
                            (seq, f"{seq:064x}", label))
    await put(1, "micropay-a")
    await put(3, "micropay-c")
    got = []

    async def read():
        async for s in backend.settlements(0):
            got.append((s.pay_index, time.monotonic()))
            if len(got) == 3 or (got[-1][0] == 3 and len(got) == 2):
                return
    t0 = time.monotonic()
    reader = asyncio.create_task(read())
    await asyncio.sleep(0.1)
    await put(2, "micropay-b")                        # arrives late, within the grace
    await asyncio.wait_for(reader, 5)
    assert [q for q, _ in got] == [1, 2, 3], "a late settlement was stepped over"
    got.clear()
    await put(5, "micropay-e")                        # 4 never comes
    t0 = time.monotonic()
    async def read_after_gap():
        async for s in backend.settlements(3):
            return s.pay_index, time.monotonic() - t0
    seq, waited = await asyncio.wait_for(read_after_gap(), 5)
    assert seq == 5 and backend.gap_grace_s * 0.9 <= waited < 2.0


async def _answer_forever(agent):
    while True:
        await agent.answer_asks()
        await asyncio.sleep(0.01)


async def test_asks_are_answered_several_at_once_and_a_refusal_is_told(fleet):
    """16 clients asking at once: the agent makes their invoices up to ASK_CONCURRENCY at
    a time (each `invoice` here takes 0.2 s), so they are all answered in a few rounds,
    not one after another (3.2 s); an ask the node refuses is answered with the reason.
    On PostgreSQL the refusal is announced: an asker that polls only every 30 s hears it
    at once."""
    from micropay.plugin.agent import ASK_CONCURRENCY

    from ..conftest import SlowInvoices
    repo, agent, backend, payer, url = fleet
    await agent.beat()
    slow = SlowInvoices(agent.node, 0.2, refuse="refused")
    backend.ask_timeout_s = 10
    deaf = None
    if url.startswith("postgresql"):
        deaf = FleetBackend(repo, ask_timeout_s=10, poll_s=30)     # only a notification can wake it soon
        await deaf.start()
    answering = asyncio.create_task(_answer_forever(agent))
    try:
        t0 = time.monotonic()
        got = await asyncio.gather(*(backend.create_invoice(1000 + i, f"micropay-cc{i}", "at once", 600)
                                     for i in range(16)))
        elapsed = time.monotonic() - t0
        t1 = time.monotonic()
        with pytest.raises(NoInvoiceInTime, match="could not make the invoice: .*said no"):
            await (deaf or backend).create_invoice(999, "micropay-no", "refused", 600)
        refused_after = time.monotonic() - t1
    finally:
        answering.cancel()
        if deaf is not None:
            await deaf.close()
    assert sorted(decode_invoice(i.bolt11).amount_msat for i in got) == [1000 + i for i in range(16)]
    assert 1 < slow.peak <= ASK_CONCURRENCY, slow.peak
    assert elapsed < 16 * 0.2 / 2, f"16 asks took {elapsed:.2f} s: answered one at a time"
    assert refused_after < 5, f"the refusal took {refused_after:.2f} s to be heard"


LISTENER = textwrap.dedent("""
    import asyncio, json, sys, time
    from micropay.lightning.fleet import FleetBackend
    from micropay.store import open_store_from_url
    from micropay.store.fleet import FLEET_SCHEMA, FleetRepository
    async def main(url):
        store = open_store_from_url(url, (FLEET_SCHEMA,))
        await store.open()
        backend = FleetBackend(FleetRepository(store), poll_s=30.0)    # only a notification can wake it soon
        await backend.start()
        print("listening", flush=True)
        async for s in backend.settlements(0):
            print(json.dumps({"label": s.label, "at": time.time()}), flush=True)
            break
        await backend.close()
        await store.close()
    asyncio.run(main(sys.argv[1]))
""")


@pytest.mark.postgres
async def test_a_settlement_notification_wakes_a_listener_in_another_process(tmp_path):
    if PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    url = pg_url_with_fresh_schema()
    store = open_store_from_url(url, (FLEET_SCHEMA,))
    await store.open()
    script = tmp_path / "listener.py"
    script.write_text(LISTENER)
    proc = subprocess.Popen([sys.executable, str(script), url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.strip() == "listening", proc.stderr.read()
        await asyncio.sleep(0.5)                     # past the listener's first (empty) read
        repo = FleetRepository(store)
        sent = time.time()
        await repo.record_settlement(FleetSettlement(0, "ab" * 32, "node-a", "micropay-n1", 1000, "00" * 32, 1))
        await store.notify("micropay_fleet_settled")
        out = json.loads(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10))
        assert out["label"] == "micropay-n1"
        assert out["at"] - sent < 1.0, f"heard after {out['at'] - sent:.2f} s: not woken by the notification"
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        await store.close()
        await drop_pg_schema(url)


async def test_the_fleet_gauges_show_pools_heartbeats_liquidity_and_the_queue(fleet):
    """What an operator watches in /metrics: per node the heartbeat age, whether it is
    live, its liquidity and its ready pool; the queue's size and oldest age by state."""
    from micropay.store.fleet import QueuedPayment, Want
    repo, agent, backend, payer, _ = fleet
    now_ms = int(time.time() * 1000)
    await agent.beat()
    await repo.heartbeat(NodeBeat("02" + "d" * 64, "regtest", now_ms - 60_000, 7, 9))       # stale
    await repo.want(Want(4000, "gauged", 4, 3600), now_ms)
    assert await agent.refill_once() == 4
    await repo.enqueue(QueuedPayment("micropay-refund-g", "refund", "", "lnbcrt1...", None, "ab" * 32, 1000, False,
                                     10), now_ms - 30_000)
    text = await backend.metrics_text()
    me = await agent.node.node_id()
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert metrics[f'micropay_fleet_pool_ready{{node="{me}"}}'] == 4
    assert metrics[f'micropay_fleet_node_live{{node="{me}"}}'] == 1
    assert metrics[f'micropay_fleet_heartbeat_age_seconds{{node="{me}"}}'] < 5
    assert metrics['micropay_fleet_node_live{node="02' + "d" * 64 + '"}'] == 0
    assert metrics['micropay_fleet_heartbeat_age_seconds{node="02' + "d" * 64 + '"}'] >= 60
    assert metrics['micropay_fleet_outbound_msat{node="02' + "d" * 64 + '"}'] == 9
    assert metrics['micropay_fleet_queue_payments{state="queued"}'] == 1
    assert 29 <= metrics['micropay_fleet_queue_oldest_age_seconds{state="queued"}'] < 60
    assert metrics['micropay_fleet_queue_payments{state="sending"}'] == 0
    assert metrics["micropay_fleet_open_asks"] == 0
    assert metrics["micropay_fleet_oldest_ask_age_seconds"] == 0
    await repo.ask("micropay-gauge-ask", me, 4321, "asked", 600, now_ms - 2_000)   # nobody answers it
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in (await backend.metrics_text()).splitlines()
               if line and not line.startswith("#")}
    assert metrics["micropay_fleet_open_asks"] == 1
    assert 2 <= metrics["micropay_fleet_oldest_ask_age_seconds"] < 10


async def test_pooled_claims_alternate_between_live_nodes(fleet):
    """Round robin for pooled invoices too: with two nodes' pools full, consecutive 402s
    name the two nodes in turn."""
    from micropay.store.fleet import Want
    repo, agent, backend, payer, _ = fleet
    other = FleetAgent(SandboxNetwork().add_node("second"), repo, AgentSettings(min_left_s=120))
    now_ms = int(time.time() * 1000)
    await repo.want(Want(3000, "rr", 6, 3600), now_ms)
    for a in (agent, other):
        await a.beat()
        assert await a.refill_once() == 6
    got = [decode_invoice((await backend.create_invoice(3000, f"micropay-p{i}", "rr", 600)).bolt11).payee
           for i in range(8)]
    assert got[0::2] != got[1::2] and len(set(got[0::2])) == 1 and len(set(got[1::2])) == 1, got


def _challenge_label() -> str:
    """A label as the gate makes them: single use, so served from the reserve."""
    import os
    return "micropay-" + os.urandom(32).hex()


def _count_queries(repo):
    """Record every SQL text repo.store.query runs; returns (the list, the real query to put back)."""
    statements, real_query = [], repo.store.query
    async def counting(sql, args=()):
        statements.append(sql)
        return await real_query(sql, args)
    repo.store.query = counting
    return statements, real_query


async def _settle_reserve(backend) -> None:
    """Let the background top-ups started so far finish."""
    while backend._refills:
        await asyncio.gather(*list(backend._refills.values()))


async def _price_with_a_reserve(fleet, description: str, depth: int, reserve: int) -> None:
    """A pool of `depth` invoices at 2000 msat for `description`, and a first 402 on it,
    so the price gets a reserve of `reserve` (its top-up finished)."""
    from micropay.store.fleet import Want
    repo, agent, backend, _, _ = fleet
    backend.reserve = reserve
    await repo.want(Want(2000, description, depth, 3600), int(time.time() * 1000))
    await agent.beat()
    assert await agent.refill_once() == depth
    await backend.create_invoice(2000, _challenge_label(), description, 600)
    await _settle_reserve(backend)


async def test_the_gates_402s_come_from_a_reserve_claimed_many_at_a_time(fleet):
    """A 402's invoice is handed out of this process's reserve (one claim statement binds
    `reserve` invoices); each is handed out once, its settlement reaches the gate's route
    (a `micropay-` label), and a sidecar that stops gives back what it never handed out."""
    from micropay.store.fleet import Want
    repo, agent, backend, payer, _ = fleet
    backend.reserve = 8
    await repo.want(Want(2000, "r", 40, 3600), int(time.time() * 1000))
    await agent.beat()
    assert await agent.refill_once() == 40
    statements, real_query = _count_queries(repo)
    handed = []
    for _ in range(20):
        handed.append(await backend.create_invoice(2000, _challenge_label(), "r", 600))
        await _settle_reserve(backend)
    repo.store.query = real_query
    assert len({i.payment_hash for i in handed}) == 20, "an invoice was handed out twice"
    batches = [s for s in statements if "claim_label = $1 || payment_hash" in s]
    assert 2 <= len(batches) <= 5, f"{len(batches)} reserve claims for 20 402s (reserve 8)"
    reserved = await repo.store.query("SELECT payment_hash, claim_label FROM micropay_fleet_invoices "
                                      "WHERE claim_label LIKE 'micropay-r%'")
    # the first 402 found the reserve empty: it claimed one invoice under its own label
    assert (await repo.by_claim(handed[0].label)).payment_hash == handed[0].payment_hash
    assert {h for h, _ in reserved} >= {i.payment_hash for i in handed[1:]}
    # each label is the process's prefix, the claim time (ms, 12 hex digits), the hash:
    # one batch's labels share a time (they land side by side in the claim_label index)
    import re
    times = {}
    for h, label in reserved:
        m = re.fullmatch(re.escape(backend._reserve_prefix) + r"([0-9a-f]{12})-" + h, label)
        assert m, label
        times.setdefault(int(m.group(1), 16), []).append(h)
    assert 1 <= len(times) <= len(batches) and all(abs(t / 1000 - time.time()) < 60 for t in times)
    by_label = dict(reserved)
    unhanded = {h for h, _ in reserved} - {i.payment_hash for i in handed}
    assert unhanded, "nothing left in the reserve to give back"

    following = asyncio.create_task(agent.follow_settlements())
    try:
        await payer.pay(handed[3].bolt11)
        async def first():
            async for s in backend.settlements(0):
                return s
        s = await asyncio.wait_for(first(), 5)
    finally:
        following.cancel()
    assert s.payment_hash == handed[3].payment_hash and s.label == by_label[s.payment_hash]
    assert s.label.startswith("micropay-") and not s.label.startswith("micropay-purchase-")

    await backend.close()
    rows = dict(await repo.store.query("SELECT payment_hash, claim_label FROM micropay_fleet_invoices"))
    assert all(rows[h] is None for h in unhanded), "the reserve was not given back to the pool"
    assert all(rows[i.payment_hash] is not None for i in handed), "an invoice handed out went back to the pool"


async def test_a_top_up_that_comes_back_while_the_sidecar_stops_gives_its_batch_back(fleet):
    """close() waits for top-ups in flight; a batch claimed while the sidecar was stopping
    goes back to the pool before close() returns, never left bound to nobody."""
    repo, _, backend, _, _ = fleet
    await _price_with_a_reserve(fleet, "r", depth=40, reserve=8)
    queue = backend._reserved[(2000, "r")]
    await backend._release(list(queue))     # an empty reserve: close() itself has nothing to give back
    queue.clear()
    claiming, real_claim_many, real_release = asyncio.Event(), repo.claim_many, repo.release

    async def slow_claim_many(*args, **kwargs):
        claiming.set()
        await asyncio.sleep(0.2)            # the claim is in the store while close() begins
        return await real_claim_many(*args, **kwargs)

    async def slow_release(labels):
        await asyncio.sleep(0.3)
        return await real_release(labels)
    repo.claim_many, repo.release = slow_claim_many, slow_release
    assert backend._start_refill((2000, "r"), int(time.time()) + 120) is not None
    await claiming.wait()
    await backend.close()
    bound = await repo.store.query("SELECT payment_hash FROM micropay_fleet_invoices "
                                   "WHERE claim_label LIKE 'micropay-r%'")
    assert bound == [], f"{len(bound)} invoices left bound to a stopped sidecar's reserve"


async def test_a_burst_that_empties_the_reserve_waits_for_the_top_up_and_the_reserve_grows(fleet):
    """50 402s at once with a reserve of 4: those that find it empty while a top-up is
    under way wait for that statement instead of each claiming alone, and the price's
    reserve doubles up to RESERVE_GROWTH times `reserve`. Every invoice is handed out once."""
    from micropay.lightning import fleet as fleet_mod
    repo, agent, backend, payer, _ = fleet
    await _price_with_a_reserve(fleet, "burst", depth=200, reserve=4)
    statements, real_query = _count_queries(repo)
    single = []
    real_claim = repo.claim
    async def claim(*args, **kwargs):
        single.append(args)
        return await real_claim(*args, **kwargs)
    repo.claim = claim
    try:
        handed = await asyncio.gather(*(backend.create_invoice(2000, _challenge_label(), "burst", 600)
                                        for _ in range(50)))
        await _settle_reserve(backend)
    finally:
        repo.store.query, repo.claim = real_query, real_claim
    assert len({i.payment_hash for i in handed}) == 50, "an invoice was handed out twice"
    assert not single, f"{len(single)} 402s claimed alone while a top-up was under way"
    assert backend.reserve_waits > 0
    assert backend._size[(2000, "burst")] == 4 * fleet_mod.RESERVE_GROWTH, backend._size
    batches = [s for s in statements if "claim_label = $1 || payment_hash" in s]
    assert len(batches) <= 6, f"{len(batches)} top-ups for 50 402s: the reserve did not grow"


async def test_a_top_up_that_does_not_come_back_in_time_leaves_the_402_to_claim_alone(fleet):
    from micropay.lightning import fleet as fleet_mod
    repo, agent, backend, payer, _ = fleet
    await _price_with_a_reserve(fleet, "slow", depth=20, reserve=2)
    real_many, gate = repo.claim_many, asyncio.Event()
    async def stuck(*args, **kwargs):
        await gate.wait()
        return await real_many(*args, **kwargs)
    repo.claim_many = stuck
    old_wait, fleet_mod.REFILL_WAIT_S = fleet_mod.REFILL_WAIT_S, 0.1
    try:
        got = [await asyncio.wait_for(backend.create_invoice(2000, _challenge_label(), "slow", 600), 5)
               for _ in range(4)]
    finally:
        fleet_mod.REFILL_WAIT_S = old_wait
        gate.set()
        await _settle_reserve(backend)
        repo.claim_many = real_many
    assert len({i.payment_hash for i in got}) == 4
    assert backend.reserve_waits >= 1


async def _hand_out(backend, via: str, amount_msat: int, description: str):
    """An invoice for a 402, as the challenger asks for one: the no-wait path first
    (ready_invoice), create_invoice if it has none; or create_invoice alone."""
    label = _challenge_label()
    if via == "ready first":
        ready = backend.ready_invoice(amount_msat, label, description, 600)
        if ready is not None:
            return ready
    return await backend.create_invoice(amount_msat, label, description, 600)


@pytest.mark.parametrize("via", ["create_invoice", "ready first"])
async def test_a_reserved_invoice_of_a_node_gone_stale_is_never_handed_out(tmp_path, via):
    """The reserve holds invoices of two nodes in turn; once one node's heartbeat is older
    than the timeout, no 402 names it, though its invoices are still in the reserve (also
    on the challenger's no-wait path, which reads the live nodes it kept)."""
    store = open_store_from_url(f"sqlite:///{tmp_path / 'f.sqlite3'}", (FLEET_SCHEMA,))
    await store.open()
    repo = FleetRepository(store)
    now = [time.time()]
    backend = FleetBackend(repo, heartbeat_timeout_s=15, reserve=10, pool_depth=0, ask_timeout_s=0.05,
                           clock=lambda: now[0])
    nodes = [SandboxNetwork().add_node(name) for name in ("a", "b")]
    ids = [await n.node_id() for n in nodes]
    for n, node_id in zip(nodes, ids):
        await repo.heartbeat(NodeBeat(node_id, "regtest", int(now[0] * 1000), 10**12, 10**12))
        for i in range(60):
            inv = await n.create_invoice(1000, f"micropay-fleet-{node_id[:8]}-{i}", "s", 3600)
            await repo.add(FleetPooled(inv.payment_hash, node_id, inv.label, 1000, "s", inv.bolt11,
                                       inv.expires_at, None), int(now[0] * 1000))
    try:
        payees, handed = [], set()
        for _ in range(4):
            inv = await _hand_out(backend, via, 1000, "s")
            payees.append(decode_invoice(inv.bolt11).payee)
            handed.add(inv.payment_hash)
            await _settle_reserve(backend)
        assert set(payees) == set(ids), "the reserve did not serve both nodes"
        assert any(p.node_id == ids[1] for q in backend._reserved.values() for p in q)
        now[0] += 16                                   # node b stops beating; a goes on
        await repo.heartbeat(NodeBeat(ids[0], "regtest", int(now[0] * 1000), 10**12, 10**12))
        payees = []
        for _ in range(25):
            payees.append(decode_invoice((await _hand_out(backend, via, 1000, "s")).bolt11).payee)
            await _settle_reserve(backend)
        assert set(payees) == {ids[0]}, "a node with a stale heartbeat was handed out"
        if backend._releaser is not None:
            await backend._releaser
        bound = await store.query("SELECT payment_hash FROM micropay_fleet_invoices WHERE node_id = $1 "
                                  "AND claim_label LIKE 'micropay-r%'", (ids[1],))
        assert {h for (h,) in bound} <= handed, "the stale node's reserved invoices were not given back to the pool"
    finally:
        await backend.close()
        await store.close()


async def test_the_no_wait_path_hands_out_the_reserve_once_and_only_when_nothing_needs_a_wait(fleet):
    """ready_invoice answers from the reserve while the live nodes were read less than a
    second ago; every other case (no reserve for the price, a label the reserve does not
    serve, the live nodes to read again, a closed backend) is left to create_invoice.
    Mixed with create_invoice, every invoice is handed out once."""
    repo, agent, backend, _, _ = fleet
    await _price_with_a_reserve(fleet, "nw", depth=60, reserve=8)
    statements, real_query = _count_queries(repo)
    handed, ready = [], 0
    try:
        for i in range(40):
            if i % 2:
                inv = backend.ready_invoice(2000, _challenge_label(), "nw", 600)
                ready += inv is not None
                inv = inv or await backend.create_invoice(2000, _challenge_label(), "nw", 600)
            else:
                inv = await backend.create_invoice(2000, _challenge_label(), "nw", 600)
            handed.append(inv.payment_hash)
            await _settle_reserve(backend)
    finally:
        repo.store.query = real_query
    assert len(set(handed)) == 40, "an invoice was handed out twice"
    assert ready >= 15, f"the no-wait path answered {ready} of 20"
    assert backend.ready_invoice(2000, _challenge_label(), "no reserve", 600) is None
    assert backend.ready_invoice(2000, "micropay-purchase-1", "nw", 600) is None
    (mono, wall), live = backend._live
    backend._live = ((mono - 2.0, wall), live)              # read over a second ago: create_invoice reads again
    assert backend.ready_invoice(2000, _challenge_label(), "nw", 600) is None
    await backend.create_invoice(2000, _challenge_label(), "nw", 600)
    assert backend.ready_invoice(2000, _challenge_label(), "nw", 600) is not None
    await _settle_reserve(backend)
    await backend.close()
    assert backend.ready_invoice(2000, _challenge_label(), "nw", 600) is None


@pytest.mark.parametrize("via", ["create_invoice", "ready first"])
async def test_a_reserved_invoice_too_close_to_its_expiry_is_never_handed_out(fleet, via):
    """An invoice of the reserve that would not stay payable for claim_min_left_s (or the
    challenge's expiry, if shorter) is skipped and goes back to the pool, on both paths."""
    import dataclasses
    repo, agent, backend, _, _ = fleet
    await _price_with_a_reserve(fleet, "exp", depth=40, reserve=8)
    queue = backend._reserved[(2000, "exp")]
    soon = int(time.time()) + backend.claim_min_left_s // 2
    short = [dataclasses.replace(p, expires_at=soon) for p in list(queue)[:3]]
    for i, p in enumerate(short):
        queue[i] = p                  # as the reserve holds it, and as the pool does (a top-up claims by it)
        await repo.store.execute("UPDATE micropay_fleet_invoices SET expires_at = $1 WHERE payment_hash = $2",
                                 (soon, p.payment_hash))
    handed = [(await _hand_out(backend, via, 2000, "exp")).payment_hash for _ in range(6)]
    assert not set(handed) & {p.payment_hash for p in short}, "an invoice about to expire was handed out"
    if backend._releaser is not None:
        await backend._releaser
    rows = dict(await repo.store.query("SELECT payment_hash, claim_label FROM micropay_fleet_invoices"))
    assert all(rows[p.payment_hash] is None for p in short), "the skipped invoices did not go back to the pool"


async def test_a_price_no_pool_holds_gets_no_reserve(fleet):
    """A one-off price (made on demand, never pooled) is not reserved: nothing is claimed
    ahead for it, so no reserve is stranded on prices that do not come back."""
    repo, agent, backend, payer, _ = fleet
    await agent.beat()
    statements, real_query = _count_queries(repo)
    answering = asyncio.create_task(_answer_forever(agent))
    try:
        for price in (1111, 2222, 3333):
            await backend.create_invoice(price, _challenge_label(), f"one-off {price}", 600)
    finally:
        answering.cancel()
        repo.store.query = real_query
    assert not backend._reserved and not backend._refills
    assert not [q for q in statements if "claim_label = $1 || payment_hash" in q]


@pytest.mark.parametrize("stop_early", [False, True])
async def test_a_burst_of_give_backs_drops_none_and_runs_one_at_a_time(tmp_path, stop_early):
    """Give-backs used to run as one task each, at most 64 at once, and a 65th batch was
    dropped (bound to a label nobody serves until it expired). Now every invoice given
    back reaches the pool, one statement after another; those still waiting when the
    sidecar stops go back in close()."""
    store = open_store_from_url(f"sqlite:///{tmp_path / 'f.sqlite3'}", (FLEET_SCHEMA,))
    await store.open()
    backend = FleetBackend(FleetRepository(store), ask_timeout_s=0.05)
    released, running, most = [], [0], [0]

    async def slow_release(labels):
        running[0] += 1
        most[0] = max(most[0], running[0])
        await asyncio.sleep(0.01)
        released.extend(labels)
        running[0] -= 1
        return len(labels)
    backend.repo.release = slow_release
    invoices = [FleetPooled(f"{i:064x}", "02" + "ab" * 32, f"node-{i}", 1000, "s", "lnbcrt1", 2**40,
                            f"micropay-rtest-{i}") for i in range(300)]
    try:
        for i in range(0, 300, 2):                  # 150 separate give-backs, as _take_live makes them
            backend._release_soon(invoices[i:i + 2])
            if i % 20 == 0:
                await asyncio.sleep(0)
        if not stop_early:
            for _ in range(500):
                if len(released) == 300:
                    break
                await asyncio.sleep(0.01)
    finally:
        await backend.close()
        await store.close()
    assert sorted(released) == sorted(p.claim_label for p in invoices)
    assert most[0] == 1


class _GiveBacks:
    """A repository that only records the reserved invoices given back to the pool."""

    def __init__(self) -> None:
        self.labels: list[str] = []

    async def release(self, labels: list[str]) -> int:
        self.labels += labels
        return len(labels)


def _reserved(h: str, node: str, expires_at: int = 5000) -> FleetPooled:
    return FleetPooled(h, node, "node-label", 1000, "d", "lnbcrt1", expires_at, f"claim-{h}")


async def test_a_reserved_invoice_goes_out_only_if_its_node_can_receive_it_now():
    """_take_live hands out the first invoice whose node is live (heartbeat fresh), can
    receive the amount, and which stays payable long enough; every one skipped goes back
    to the pool, and nothing behind the one handed out is touched."""
    repo = _GiveBacks()
    backend = FleetBackend(repo)                                     # type: ignore[arg-type]
    now_ms = 1_000_000
    beats = {"fresh": NodeBeat("fresh", "regtest", now_ms, 10_000, 0),
             "stale": NodeBeat("stale", "regtest", now_ms - 20_000, 10_000, 0),
             "small": NodeBeat("small", "regtest", now_ms, 999, 0)}
    queue = collections.deque([_reserved("a", "stale"), _reserved("b", "small"), _reserved("c", "unknown"),
                               _reserved("d", "fresh", expires_at=100), _reserved("e", "fresh"),
                               _reserved("f", "fresh")])
    found = backend._take_live(queue, (beats, now_ms - 15_000, 1000), payable_after=200)
    assert found is not None and found.payment_hash == "e"
    assert [p.payment_hash for p in queue] == ["f"]
    for _ in range(50):
        if repo.labels:
            break
        await asyncio.sleep(0.01)
    assert repo.labels == ["claim-a", "claim-b", "claim-c", "claim-d"]
    assert backend._take_live(collections.deque(), (beats, now_ms - 15_000, 1000), 200) is None


async def test_the_reserve_reads_each_new_list_of_live_nodes_and_the_clock_at_each_402():
    """The nodes by id are rebuilt when the live list is read again (a node's inbound
    fell), and a heartbeat that was fresh goes stale with the clock alone."""
    repo, clock = _GiveBacks(), [1000.0]
    backend = FleetBackend(repo, heartbeat_timeout_s=15, clock=lambda: clock[0])   # type: ignore[arg-type]
    key = (1000, "d")
    backend._reserved[key] = collections.deque([_reserved("x1", "n1"), _reserved("x2", "n1"), _reserved("y1", "n2")])
    backend._dry_until[key] = float("inf")                           # no top-up: the repository has none
    beat_ms = 1_000_000
    first = [NodeBeat("n1", "regtest", beat_ms, 5000, 0), NodeBeat("n2", "regtest", beat_ms, 5000, 0)]
    assert backend._take_reserved(key, first, 0)[0].payment_hash == "x1"
    again = [NodeBeat("n1", "regtest", beat_ms, 500, 0), NodeBeat("n2", "regtest", beat_ms, 5000, 0)]
    assert backend._take_reserved(key, again, 0)[0].payment_hash == "y1"        # n1 can no longer receive 1000
    backend._reserved[key].appendleft(_reserved("z1", "n2"))
    clock[0] += 16                                                   # n2's heartbeat is 16 s old now
    assert backend._take_reserved(key, again, 0)[0] is None
    for _ in range(50):
        if len(repo.labels) == 2:
            break
        await asyncio.sleep(0.01)
    assert repo.labels == ["claim-x2", "claim-z1"]
