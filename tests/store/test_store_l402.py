"""The gate's repository (store/l402.py), against SQLite and PostgreSQL (the `store` fixture)."""
import asyncio

import pytest

from micropay.store.l402 import ChallengeRecord, ChallengeStatus, L402Repository


def record(ph="aa", client="c1", route="GET /a", price=1000, expires=2000, created=1000):
    return ChallengeRecord(ph, "t" + ph, route, client, price, "lnbcrt1", "mac", created, expires, 1)


@pytest.fixture
def repo(store):
    return L402Repository(store)


async def test_challenge_lifecycle(repo):
    await repo.add_challenge(record())
    await repo.add_challenge(record())          # idempotent
    got = await repo.get_challenge("aa")
    assert got.status == ChallengeStatus.PENDING and got.price_msat == 1000
    assert await repo.count_pending_of("c1", 1500) == 1
    assert await repo.count_pending_of("c2", 1500) == 0                           # another client
    assert await repo.count_pending_of("c1", 2000) == 0                           # expired
    assert await repo.count_pending(1500) == 1
    assert await repo.mark_paid("aa", 1000, 1600) is True
    assert await repo.count_pending_of("c1", 1500) == 0                           # paid
    assert await repo.mark_paid("aa", 1000, 1700) is False                      # once only
    got = await repo.get_challenge("aa")
    assert got.status == ChallengeStatus.PAID and got.paid_at == 1600
    assert await repo.count_pending(1500) == 0
    assert await repo.mark_paid("unknown", 1, 1) is False


async def test_purge_only_expired_unpaid(repo):
    await repo.add_challenge(record("a1", expires=100))
    await repo.add_challenge(record("a2", expires=100))
    await repo.add_challenge(record("a3", expires=5000))
    await repo.add_challenge(record("a4", expires=100))
    await repo.mark_paid("a4", 1000, 50)
    assert await repo.purge_expired(200) == 2
    assert await repo.get_challenge("a1") is None
    assert await repo.get_challenge("a3") is not None and await repo.get_challenge("a4") is not None


async def test_credits_debit_and_refund(repo):
    assert await repo.credits_remaining("t") is None
    assert [await repo.debit_credit("t", 3) for _ in range(4)] == [2, 1, 0, None]
    await repo.refund_credit("t")
    assert await repo.debit_credit("t", 3) == 0


@pytest.mark.parametrize("n,k", [(40, 7), (5, 12)])
async def test_concurrent_debits_succeed_exactly_min_n_k(repo, n, k):
    results = await asyncio.gather(*(repo.debit_credit("tok", k) for _ in range(n)))
    ok = [r for r in results if r is not None]
    assert len(ok) == min(n, k)
    assert sorted(ok) == list(range(k - len(ok), k))   # every remaining count handed out once


async def test_receipts_are_write_once(repo, store):
    await repo.add_receipt("ph", "r1", 1)
    await repo.add_receipt("ph", "r2", 2)
    assert await store.query("SELECT receipt FROM micropay_receipts WHERE payment_hash = $1", ("ph",)) == [("r1",)]


async def test_records_written_together(repo):
    await repo.add_challenges([record("x1"), record("x2", client="c2")])
    await repo.add_challenges([record("x1")])                   # again: nothing changes
    assert await repo.count_pending(1500) == 2


async def test_a_client_s_pending_count_is_its_own_across_routes(repo):
    await repo.add_challenge(record("b1", client="c1"))
    await repo.add_challenge(record("b3", client="c1", route="GET /b", price=5))
    await repo.add_challenge(record("b2", client="c2", route="GET /b"))
    assert await repo.count_pending_of("c1", 1500) == 2 and await repo.count_pending_of("c2", 1500) == 1
    assert await repo.count_pending(1500) == 3


async def test_records_written_together_are_each_written_once(repo, store):
    """add_challenges runs one statement for every record (a `many` step): each lands,
    a record written again changes nothing, and a batch beside it in the same call too."""
    await repo.add_challenges([record(f"m{i}", client=f"c{i % 3}") for i in range(300)])
    await repo.add_challenges([record("m0", price=9), record("m300")])      # m0 again: kept as it was
    assert (await repo.get_challenge("m0")).price_msat == 1000
    assert (await repo.get_challenge("m300")) is not None
    assert await repo.count_pending(1500) == 301
    await repo.add_challenges([])                                           # nothing to write: nothing done
    assert await repo.count_pending(1500) == 301


async def test_a_many_step_that_fails_rolls_its_transaction_back(store):
    from micropay.store.base import Step
    from micropay.store.l402 import ADD
    good = ("g1", "tg1", "GET /a", "c", 1000, "lnbcrt1", "mac", 1000, 2000, 1)
    bad = ("g2", "tg2", "GET /a", "c", 1000, None, "mac", 1000, 2000, 1)        # bolt11 is NOT NULL
    with pytest.raises(Exception):
        await store.transaction([Step(ADD, [good, bad], many=True)])
    assert await L402Repository(store).get_challenge("g1") is None           # the good row went too


def test_a_many_step_cannot_be_required():
    from micropay.store.base import Step
    with pytest.raises(ValueError, match="cannot be required"):
        Step("INSERT INTO t VALUES ($1)", [(1,), (2,)], required=True, many=True)
