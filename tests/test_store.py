"""The same suite against SQLite and PostgreSQL (see the `store` fixture)."""
import asyncio

import pytest

from micropay.store import ChallengeRecord


def record(ph="aa", client="c1", route="GET /a", price=1000, expires=2000, created=1000):
    return ChallengeRecord(ph, "t" + ph, route, client, price, "lnbcrt1", "mac", created, expires, 1)


async def test_challenge_lifecycle(store):
    await store.add_challenge(record())
    await store.add_challenge(record())          # idempotent
    got = await store.get_challenge("aa")
    assert got.status == "pending" and got.price_msat == 1000
    assert (await store.pending_challenge("c1", "GET /a", 1000, 1500)).payment_hash == "aa"
    assert await store.pending_challenge("c1", "GET /a", 999, 1500) is None     # price changed
    assert await store.pending_challenge("c2", "GET /a", 1000, 1500) is None
    assert await store.pending_challenge("c1", "GET /a", 1000, 2500) is None    # too close to expiry
    assert await store.count_pending(1500) == 1 and await store.count_pending(1500, "c2") == 0
    assert await store.mark_paid("aa", 1000, 1600) is True
    assert await store.mark_paid("aa", 1000, 1700) is False                      # once only
    got = await store.get_challenge("aa")
    assert got.status == "paid" and got.paid_at == 1600
    assert await store.count_pending(1500) == 0
    assert await store.mark_paid("unknown", 1, 1) is False


async def test_purge_only_expired_unpaid(store):
    await store.add_challenge(record("a1", expires=100))
    await store.add_challenge(record("a2", expires=100))
    await store.add_challenge(record("a3", expires=5000))
    await store.add_challenge(record("a4", expires=100))
    await store.mark_paid("a4", 1000, 50)
    assert await store.purge_expired(200) == 2
    assert await store.get_challenge("a1") is None
    assert await store.get_challenge("a3") is not None and await store.get_challenge("a4") is not None


async def test_credits_debit_and_refund(store):
    assert await store.credits_remaining("t") is None
    assert [await store.debit_credit("t", 3) for _ in range(4)] == [2, 1, 0, None]
    await store.refund_credit("t")
    assert await store.debit_credit("t", 3) == 0


@pytest.mark.parametrize("n,k", [(40, 7), (5, 12)])
async def test_concurrent_debits_succeed_exactly_min_n_k(store, n, k):
    results = await asyncio.gather(*(store.debit_credit("tok", k) for _ in range(n)))
    ok = [r for r in results if r is not None]
    assert len(ok) == min(n, k)
    assert sorted(ok) == list(range(k - len(ok), k))   # every remaining count handed out once


async def test_cursor_only_moves_forward(store):
    assert await store.get_cursor("s") == 0
    await store.advance_cursor("s", 5)
    await store.advance_cursor("s", 3)
    assert await store.get_cursor("s") == 5
    await store.advance_cursor("s", 6)
    assert await store.get_cursor("s") == 6


async def test_receipts_are_write_once(store):
    await store.add_receipt("ph", "r1", 1)
    await store.add_receipt("ph", "r2", 2)
    assert await store.get_receipt("ph") == "r1"
    assert await store.get_receipt("nope") is None


async def test_admission_reads_reuse_and_counts_together(store):
    await store.add_challenge(record("b1", client="c1"))
    await store.add_challenge(record("b2", client="c2", route="GET /b"))
    reuse, total, mine = await store.admission("c1", "GET /a", 1000, 1500, 1500)
    assert reuse.payment_hash == "b1" and (total, mine) == (2, 1)
    await store.debit_credit("tb1", 1)     # its token is in use: paid, even before settlement
    reuse, total, mine = await store.admission("c1", "GET /a", 1000, 1500, 1500)
    assert reuse is None


async def test_stream_payments_are_recorded_once_and_spent_at_most_once(store):
    assert await store.add_stream_payment("h1", "s", 1, 5000, 10, "micropay") is True
    assert await store.add_stream_payment("h1", "s", 1, 5000, 10, "micropay") is False   # hook replay
    assert await store.debit_stream("s", 6000) is None
    assert await store.debit_stream("s", 2000) == 3000
    await store.add_stream_payment("h2", "s", 2, 1000, 11, "micropay")
    results = await asyncio.gather(*(store.debit_stream("s", 1000) for _ in range(10)))
    assert len([r for r in results if r is not None]) == 4       # 6000 in, 2000 used before
    assert await store.stream_balance("s") == (6000, 6000)
    (session,) = await store.stream_sessions("s")
    assert session["payments"] == 2 and session["received_msat"] == 6000 and session["distinct_seqs"] == 2
