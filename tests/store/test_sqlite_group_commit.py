"""The SQLite adapter's group commit (store/sqlite.py): statements asked for together run
in one transaction on the worker, each answered with its own rows or error, and none is
answered as done unless the batch is on disk."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

from micropay.core.errors import StoreUnavailable
from micropay.store.sqlite import SqliteStore

TABLE = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)"


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(tmp_path / "g.sqlite3")
    await s.open()
    await s.execute(TABLE)
    yield s
    await s.close()


async def test_statements_asked_together_share_one_batch_and_keep_their_own_results(store, monkeypatch):
    batches = []
    real = store._run_batch
    monkeypatch.setattr(store, "_run_batch", lambda items: batches.append(len(items)) or real(items))
    got = await asyncio.gather(*(store.query("INSERT INTO t (k, v) VALUES ($1, $2) RETURNING v", (f"k{i}", i))
                                 for i in range(50)))
    assert got == [[(i,)] for i in range(50)]
    assert sum(batches) == 50 and max(batches) > 1, batches
    assert await store.query("SELECT COUNT(*) FROM t") == [(50,)]


async def test_a_failing_statement_fails_alone(store):
    await store.execute("INSERT INTO t (k, v) VALUES ('dup', 1)")
    results = await asyncio.gather(
        store.execute("INSERT INTO t (k, v) VALUES ('a', 1)"),
        store.execute("INSERT INTO t (k, v) VALUES ('dup', 2)"),        # primary key taken
        store.execute("INSERT INTO t (k, v) VALUES ('b', 2)"),
        return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert await store.query("SELECT k, v FROM t ORDER BY k") == [("a", 1), ("b", 2), ("dup", 1)]


async def test_when_sqlite_rolls_the_batch_back_no_statement_is_reported_done(store):
    # RAISE(ROLLBACK) in a trigger undoes the whole transaction, as a full disk would
    await store.execute("CREATE TRIGGER boom BEFORE INSERT ON t WHEN NEW.k = 'boom' "
                        "BEGIN SELECT RAISE(ROLLBACK, 'boom'); END")
    results = await asyncio.gather(
        store.query("INSERT INTO t (k, v) VALUES ('before', 1) RETURNING v"),
        store.query("INSERT INTO t (k, v) VALUES ('boom', 2) RETURNING v"),
        store.query("INSERT INTO t (k, v) VALUES ('after', 3) RETURNING v"),
        return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    assert await store.query("SELECT COUNT(*) FROM t") == [(0,)], "a statement of a rolled-back batch stayed"
    assert await store.query("INSERT INTO t (k, v) VALUES ('later', 4) RETURNING v") == [(4,)]


async def test_a_lone_statement_and_transactions_still_work(store):
    from micropay.store.base import Step
    assert await store.query("INSERT INTO t (k, v) VALUES ('x', 1) RETURNING k") == [("x",)]
    res = await store.transaction([Step("UPDATE t SET v = v + 1 WHERE k = 'x' RETURNING v", (), True),
                                   Step("UPDATE t SET v = v + 1 WHERE k = 'nope' RETURNING v", (), True)])
    assert res.failed_step == 1
    assert await store.query("SELECT v FROM t WHERE k = 'x'") == [(1,)]


async def test_batches_are_bounded_reads_alone_take_no_write_lock_and_a_closed_store_fails_fast(tmp_path):
    from micropay.store.sqlite import MAX_BATCH
    s = SqliteStore(tmp_path / "b.sqlite3")
    await s.open()
    await s.execute(TABLE)
    sizes = []
    real = s._run_batch
    s._run_batch = lambda items: sizes.append(len(items)) or real(items)
    await asyncio.gather(*(s.execute("INSERT INTO t (k, v) VALUES ($1, 1)", (f"k{i}",)) for i in range(600)))
    assert max(sizes) <= MAX_BATCH and sum(sizes) == 600
    # another connection holds the write lock: reads still answer at once
    other = sqlite3.connect(tmp_path / "b.sqlite3", timeout=0.1)
    other.execute("BEGIN IMMEDIATE")
    try:
        got = await asyncio.wait_for(asyncio.gather(*(s.query("SELECT COUNT(*) FROM t") for _ in range(5))), 5)
        assert got == [[(600,)]] * 5
    finally:
        other.execute("ROLLBACK")
        other.close()
    await s.close()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(s.query("SELECT 1"), 5)
