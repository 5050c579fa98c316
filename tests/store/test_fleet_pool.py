"""Fleet mode's invoice pools in the shared store (store/fleet.py): a claim binds one
pooled invoice to one label, never one invoice to two claims (also from two processes on
one PostgreSQL pool), and only nodes with a fresh heartbeat are claimed from."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from micropay.store import open_store_from_url
from micropay.store.fleet import FLEET_SCHEMA, NodeBeat, FleetRepository, PooledInvoice

from ..conftest import PG_SKIP_REASON, drop_pg_schema, pg_url_with_fresh_schema
from .lockholder import another_writer_holds_the_lock

NOW_MS = 1_800_000_000_000
NOW = NOW_MS // 1000
ROOMY = 10**15                # inbound and outbound liquidity no test here runs out of


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


def pooled(i: int, node: str = "node-a", amount: int = 1000, desc: str = "joke", expires_at: int = NOW + 3600):
    return PooledInvoice(hashlib.sha256(f"{node}-{i}".encode()).hexdigest(), node, f"micropay-fleet-{node}-{i}", amount, desc,
                         f"lnbcrt-{node}-{i}", expires_at, None)


async def fill(repo, n: int, **kw) -> list[PooledInvoice]:
    out = [pooled(i, **kw) for i in range(n)]
    for inv in out:
        await repo.add(inv, NOW_MS)
    return out


async def claim(repo, label, amount=1000, desc="joke", fresh_since=NOW_MS - 10_000):
    return await repo.claim(label, amount, desc, now_ms=NOW_MS, payable_after=NOW + 60, fresh_since_ms=fresh_since)


async def test_a_claim_takes_one_invoice_and_a_retry_gets_the_same(repo):
    await repo.heartbeat(NodeBeat("node-a", "regtest", NOW_MS, ROOMY, ROOMY))
    await fill(repo, 3)
    first = await claim(repo, "micropay-c1")
    again = await claim(repo, "micropay-c1")
    other = await claim(repo, "micropay-c2")
    assert first is not None and first == again and first.claim_label == "micropay-c1"
    assert other is not None and other.payment_hash != first.payment_hash


async def test_an_empty_pool_or_another_price_claims_nothing(repo):
    await repo.heartbeat(NodeBeat("node-a", "regtest", NOW_MS, ROOMY, ROOMY))
    await fill(repo, 1)
    assert await claim(repo, "micropay-x", amount=2000) is None
    assert await claim(repo, "micropay-x", desc="other") is None
    assert await claim(repo, "micropay-y") is not None
    assert await claim(repo, "micropay-z") is None


async def test_an_invoice_too_close_to_expiry_is_not_handed_out(repo):
    await repo.heartbeat(NodeBeat("node-a", "regtest", NOW_MS, ROOMY, ROOMY))
    await repo.add(pooled(1, expires_at=NOW + 30), NOW_MS)          # payable_after is NOW + 60
    assert await claim(repo, "micropay-late") is None


async def test_nodes_with_a_stale_heartbeat_get_no_claims(repo):
    await repo.heartbeat(NodeBeat("node-a", "regtest", NOW_MS - 60_000, ROOMY, ROOMY))     # stale
    await repo.heartbeat(NodeBeat("node-b", "regtest", NOW_MS, ROOMY, ROOMY))
    await fill(repo, 5, node="node-a")
    await fill(repo, 2, node="node-b")
    got = [await claim(repo, f"micropay-s{i}") for i in range(4)]
    assert [g.node_id for g in got[:2]] == ["node-b", "node-b"]
    assert got[2:] == [None, None], "the stale node's invoices were handed out"
    assert [n.node_id for n in await repo.live_nodes(NOW_MS - 10_000)] == ["node-b"]
    await repo.heartbeat(NodeBeat("node-a", "regtest", NOW_MS, ROOMY, ROOMY))              # it is back
    assert (await claim(repo, "micropay-s9")).node_id == "node-a"


async def test_a_node_that_cannot_receive_the_amount_gets_no_claim_for_it(repo):
    """The heartbeat reports inbound liquidity; a pooled invoice of a node that could not
    be paid it (its channels' receivable sum is below the amount) is not handed out."""
    await repo.heartbeat(NodeBeat("node-a", "regtest", NOW_MS, 999, ROOMY))       # 1 msat short
    await repo.heartbeat(NodeBeat("node-b", "regtest", NOW_MS, 1000, ROOMY))
    await fill(repo, 3, node="node-a")
    await fill(repo, 1, node="node-b")
    assert (await claim(repo, "micropay-l1")).node_id == "node-b"
    assert await claim(repo, "micropay-l2") is None, "node-a cannot receive 1000 msat yet got the claim"
    await repo.heartbeat(NodeBeat("node-a", "regtest", NOW_MS, 5000, ROOMY))       # paid into, say
    assert (await claim(repo, "micropay-l3")).node_id == "node-a"


async def test_a_sidecar_wanting_a_shallower_pool_does_not_shrink_a_fresh_deeper_one(repo):
    from micropay.store.fleet import Want
    await repo.want(Want(1000, "joke", 300, 3600), NOW_MS)
    await repo.want(Want(1000, "joke", 5, 3600), NOW_MS + 60_000)         # another sidecar, a minute later
    assert [w.depth for w in await repo.wants(NOW_MS)] == [300]
    await repo.want(Want(1000, "joke", 5, 3600), NOW_MS + 2_000_000)      # the deep one stopped asking
    assert [w.depth for w in await repo.wants(NOW_MS)] == [5]


async def test_drop_loses_to_a_claim(repo):
    await repo.heartbeat(NodeBeat("node-a", "regtest", NOW_MS, ROOMY, ROOMY))
    inv, = await fill(repo, 1, expires_at=NOW + 100)
    assert await repo.stale("node-a", NOW + 120, 10) == [(inv.payment_hash, inv.node_label)]
    assert (await claim(repo, "micropay-first")).payment_hash == inv.payment_hash
    assert await repo.drop(inv.payment_hash) is False, "a claimed invoice left the pool"
    assert (await repo.by_claim("micropay-first")).payment_hash == inv.payment_hash


async def test_concurrent_claims_in_one_process_never_share_an_invoice(repo):
    await repo.heartbeat(NodeBeat("node-a", "regtest", NOW_MS, ROOMY, ROOMY))
    pool = await fill(repo, 200)
    got = await asyncio.gather(*(claim(repo, f"micropay-k{i}") for i in range(240)))
    hashes = [g.payment_hash for g in got if g is not None]
    assert len(hashes) == 200 and len(set(hashes)) == 200
    assert set(hashes) == {p.payment_hash for p in pool}


CLAIMER = textwrap.dedent("""
    import asyncio, json, os, sys
    from micropay.core.errors import NoInvoiceInTime
    from micropay.lightning.fleet import FleetBackend
    from micropay.store import open_store_from_url
    from micropay.store.fleet import FLEET_SCHEMA, FleetRepository
    async def main(url, who, now_ms, mode):
        store = open_store_from_url(url, (FLEET_SCHEMA,))
        await store.open()
        repo = FleetRepository(store)
        # "reserve": the sidecar's own path for the gate's 402s (lightning/fleet.py): many
        # invoices bound per statement, handed out one per 402 from this process's memory
        backend = FleetBackend(repo, pool_depth=0, ask_timeout_s=0.01, reserve=32, clock=lambda: now_ms / 1000)
        got, misses, i = [], 0, 0
        async def worker(w):
            nonlocal misses, i
            while misses < 20:
                i += 1
                if mode == "claim":
                    inv = await repo.claim(f"micropay-{who}-{w}-{i}", 1000, "joke", now_ms=now_ms,
                                           payable_after=now_ms // 1000 + 60, fresh_since_ms=now_ms - 10_000)
                else:
                    try:
                        inv = await backend.create_invoice(1000, "micropay-" + os.urandom(32).hex(), "joke", 600)
                    except NoInvoiceInTime:
                        inv = None
                if inv is None:
                    misses += 1
                    await asyncio.sleep(0.01)
                else:
                    got.append(inv.payment_hash)
        await asyncio.gather(*(worker(w) for w in range(8)))
        await backend.close()           # gives back what its reserve still holds
        print("INLINE", getattr(store, "inline_batches", 0), file=sys.stderr)   # SQLite: on the loop's thread
        await store.close()
        print(json.dumps(got))
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
""")


@pytest.mark.parametrize("kind", [pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
@pytest.mark.parametrize("mode", ["claim", "reserve"])
async def test_two_processes_claim_10000_invoices_from_one_pool_none_twice_none_lost(tmp_path, mode, kind):
    """On SQLite the two processes share one file: each runs its claims on its loop's
    thread while its worker is idle, and gives way to its worker whenever the other
    process holds the write lock (store/sqlite.py), so this crosses that path too."""
    if kind == "postgres" and PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    url = pg_url_with_fresh_schema() if kind == "postgres" else f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    store = open_store_from_url(url, (FLEET_SCHEMA,))
    await store.open()
    try:
        repo = FleetRepository(store)
        await repo.heartbeat(NodeBeat("node-a", "regtest", NOW_MS, ROOMY, ROOMY))
        await repo.heartbeat(NodeBeat("node-b", "regtest", NOW_MS, ROOMY, ROOMY))
        rows = [pooled(i, node="node-a" if i % 2 else "node-b") for i in range(10_000)]
        values = ",".join(f"('{r.payment_hash}','{r.node_id}','{r.node_label}',{r.amount_msat},'{r.description}',"
                          f"'{r.bolt11}',{r.expires_at},{NOW_MS})" for r in rows)
        await store.execute("INSERT INTO micropay_fleet_invoices (payment_hash, node_id, node_label, amount_msat, "
                            f"description, bolt11, expires_at, created_ms) VALUES {values}")
        script = tmp_path / "claimer.py"
        script.write_text(CLAIMER)
        procs = [subprocess.Popen([sys.executable, str(script), url, who, str(NOW_MS), mode], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=dict(os.environ))
                 for who in ("p1", "p2")]
        outs, inline = [], 0
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
            outs.append(json.loads(out))
            inline += int(err.split("INLINE ", 1)[1].split()[0])
        if kind == "sqlite":
            assert inline > 0, "no statement ran on a loop's thread: the test did not cross that path"
        first, second = set(outs[0]), set(outs[1])
        assert len(first) == len(outs[0]) and len(second) == len(outs[1]), "one process got an invoice twice"
        assert not first & second, f"{len(first & second)} invoices handed to both processes"
        assert first | second == {r.payment_hash for r in rows}, "invoices lost"
        assert first and second, "one process claimed nothing: the test did not run concurrently"
        left = await store.fetchrow("SELECT COUNT(*) FROM micropay_fleet_invoices WHERE claim_label IS NULL")
        assert left[0] == 0
    finally:
        await store.close()
        if kind == "postgres":
            await drop_pg_schema(url)


async def test_a_reserve_claim_runs_on_the_loop_thread_on_sqlite_and_a_larger_one_on_the_worker(tmp_path):
    from micropay.store.fleet import POINT_CLAIM_MAX
    store = open_store_from_url(f"sqlite:///{tmp_path / 'fleet.sqlite3'}", (FLEET_SCHEMA,))
    await store.open()
    try:
        repo = FleetRepository(store)
        await repo.heartbeat(NodeBeat("node-a", "regtest", NOW_MS, ROOMY, ROOMY))
        pool = await fill(repo, 2 * POINT_CLAIM_MAX + 10)
        kw = dict(now_ms=NOW_MS, payable_after=NOW + 60, fresh_since_ms=NOW_MS - 10_000, node="node-a")
        inline = store.inline_batches
        small = await repo.claim_many("micropay-rA-", 1000, "joke", n=POINT_CLAIM_MAX, **kw)
        assert store.inline_batches == inline + 1, "a claim of POINT_CLAIM_MAX rows should run on the loop thread"
        large = await repo.claim_many("micropay-rB-", 1000, "joke", n=POINT_CLAIM_MAX + 1, **kw)
        assert store.inline_batches == inline + 1, "a larger claim should run on the worker"
        assert len(small) == POINT_CLAIM_MAX and len(large) == POINT_CLAIM_MAX + 1
        hashes = [p.payment_hash for p in small + large]
        assert len(set(hashes)) == len(hashes) and set(hashes) <= {p.payment_hash for p in pool}
        assert all(p.claim_label == "micropay-rA-" + p.payment_hash for p in small)
        assert all(p.claim_label == "micropay-rB-" + p.payment_hash for p in large)
    finally:
        await store.close()


async def test_a_reserve_claim_waits_for_another_writer_without_blocking_the_loop(tmp_path):
    path = tmp_path / "fleet.sqlite3"
    store = open_store_from_url(f"sqlite:///{path}", (FLEET_SCHEMA,))
    await store.open()
    try:
        repo = FleetRepository(store)
        await repo.heartbeat(NodeBeat("node-a", "regtest", NOW_MS, ROOMY, ROOMY))
        await fill(repo, 40)
        gave_way = store.inline_gave_way
        async with another_writer_holds_the_lock(path) as held:
            got = await asyncio.wait_for(repo.claim_many(
                "micropay-rA-", 1000, "joke", now_ms=NOW_MS, payable_after=NOW + 60,
                fresh_since_ms=NOW_MS - 10_000, node="node-a", n=32), 10)
            waited, ticks = held.waited(), held.ticks
        assert waited >= 0.35, "the claim should have waited for the other writer"
        assert ticks >= 20, f"the loop was blocked while another process held the lock ({ticks} ticks)"
        assert store.inline_gave_way == gave_way + 1
        assert len(got) == 32 and len({p.payment_hash for p in got}) == 32
        bound = await store.fetchrow("SELECT COUNT(*) FROM micropay_fleet_invoices WHERE claim_label IS NOT NULL")
        assert bound[0] == 32, "each invoice is bound once, by the claim that ran on the worker"
    finally:
        await store.close()


async def test_reserve_claims_for_many_prices_in_one_loop_turn_go_to_the_worker_together(tmp_path):
    """One ranged statement per batch on the loop's thread (store/sqlite.py): top-ups of
    several prices asked for in the same turn would block the loop for several claims'
    time, so that batch runs on the worker."""
    store = open_store_from_url(f"sqlite:///{tmp_path / 'fleet.sqlite3'}", (FLEET_SCHEMA,))
    await store.open()
    try:
        repo = FleetRepository(store)
        await repo.heartbeat(NodeBeat("node-a", "regtest", NOW_MS, ROOMY, ROOMY))
        pools = [[pooled(100 * k + i, amount=1000 * (k + 1)) for i in range(40)] for k in range(8)]
        for inv in (inv for pool in pools for inv in pool):
            await repo.add(inv, NOW_MS)
        kw = dict(now_ms=NOW_MS, payable_after=NOW + 60, fresh_since_ms=NOW_MS - 10_000, node="node-a")
        inline = store.inline_batches
        got = await asyncio.gather(*(repo.claim_many(f"micropay-r{k}-", 1000 * (k + 1), "joke", n=32, **kw)
                                     for k in range(8)))
        assert store.inline_batches == inline, "eight claims in one batch should have gone to the worker"
        for k, claimed in enumerate(got):
            assert len(claimed) == 32 and {p.payment_hash for p in claimed} <= {p.payment_hash for p in pools[k]}
            assert all(p.claim_label == f"micropay-r{k}-{p.payment_hash}" for p in claimed)
        # one claim with point lookups in the same turn still runs on the loop's thread
        one, beats = await asyncio.gather(repo.claim_many("micropay-rX-", 1000, "joke", n=4, **kw),
                                          repo.live_nodes(NOW_MS - 10_000))
        assert store.inline_batches == inline + 1 and len(one) == 4 and len(beats) == 1
    finally:
        await store.close()


async def test_retention_forgets_long_expired_claims_and_old_asks_but_nothing_live(repo):
    from micropay.store.fleet import Want
    await repo.heartbeat(NodeBeat("node-a", "regtest", NOW_MS, ROOMY, ROOMY))
    await repo.add(pooled(1, expires_at=NOW - 100_000), NOW_MS)       # claimed long ago, long expired
    await repo.add(pooled(2, expires_at=NOW - 100_000), NOW_MS)       # never claimed: the pruner's, not this
    await repo.add(pooled(3, expires_at=NOW + 3600), NOW_MS)          # claimed, live
    await repo.store.execute("UPDATE micropay_fleet_invoices SET claim_label = 'micropay-old' WHERE node_label = $1",
                             ("micropay-fleet-node-a-1",))
    await repo.store.execute("UPDATE micropay_fleet_invoices SET claim_label = 'micropay-live' WHERE node_label = $1",
                             ("micropay-fleet-node-a-3",))
    await repo.want(Want(1000, "old", 5, 3600), NOW_MS - 2_000_000)
    await repo.want(Want(1000, "fresh", 5, 3600), NOW_MS)
    # asks: answered or not, a day old is gone (agents leave asks over a minute old, so an
    # unanswered one that old is never answered); a fresh one stays, answered or not
    for label, age_s in (("micropay-ask-old-answered", 90_000), ("micropay-ask-old-open", 90_000),
                         ("micropay-ask-fresh-answered", 10), ("micropay-ask-fresh-open", 10)):
        await repo.ask(label, "node-a", 1000, "ask", 600, NOW_MS - age_s * 1000)
        if label.endswith("answered"):
            await repo.answer(label, None, NOW_MS - age_s * 1000 + 5, error="refused")
    await repo.forget(NOW - 900, NOW - 86_400, NOW - 86_400, NOW - 7 * 86_400, 100)
    left = {r[0] for r in await repo.store.query("SELECT node_label FROM micropay_fleet_invoices")}
    assert left == {"micropay-fleet-node-a-2", "micropay-fleet-node-a-3"}
    assert [w.description for w in await repo.wants(0)] == ["fresh"]
    asks = {r[0] for r in await repo.store.query("SELECT claim_label FROM micropay_fleet_asks")}
    assert asks == {"micropay-ask-fresh-answered", "micropay-ask-fresh-open"}
