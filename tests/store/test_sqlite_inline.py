"""Point statements on the SQLite adapter's loop thread (store/sqlite.py): they run there
only while the worker is idle, never wait for another process's lock (the batch goes to
the worker instead, and runs once), keep the group commit's all-or-nothing answer, and
leave WAL checkpoints to the worker."""
from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from micropay.core.errors import StoreUnavailable
from micropay.store import sqlite as sqlite_mod
from micropay.store.base import Step, point
from micropay.store.sqlite import SqliteStore

from .lockholder import another_writer_holds_the_lock

TABLE = "CREATE TABLE IF NOT EXISTS t (k TEXT PRIMARY KEY, v INTEGER NOT NULL)"
WHO = point("SELECT whoami()")                       # the thread that runs the statement
WHO_ON_WORKER = "SELECT whoami() AS not_a_point"     # the same, not marked
BUMP = point("INSERT INTO t (k, v) VALUES ($1, 1) ON CONFLICT (k) DO UPDATE SET v = t.v + 1 RETURNING v")
GET = point("SELECT v FROM t WHERE k = $1")
NULL_V = point("INSERT INTO t (k, v) VALUES ($1, NULL)")     # v is NOT NULL: always fails
SLOW = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 3000000) SELECT COUNT(*) FROM c"


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(tmp_path / "i.sqlite3")
    await s.open()
    s._conn.create_function("whoami", 0, threading.get_ident)
    await s.execute(TABLE)
    yield s
    await s.close()


async def test_point_statements_run_on_the_loop_thread_and_others_on_the_worker(store):
    loop_thread = threading.get_ident()
    assert await store.query(WHO) == [(loop_thread,)]
    (worker,), = await store.query(WHO_ON_WORKER)
    assert worker != loop_thread
    # a batch mixing both kinds goes to the worker as a whole
    got = await asyncio.gather(store.query(WHO), store.query(WHO_ON_WORKER))
    assert got == [[(worker,)], [(worker,)]]
    # automatic checkpoints are off for this connection: none runs inside a commit on the loop
    assert store._conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)


async def test_statements_of_one_loop_turn_share_one_batch_with_their_own_results(store):
    before = store.inline_batches
    got = await asyncio.gather(*(store.query(BUMP, (f"k{i % 10}",)) for i in range(50)))
    assert store.inline_batches == before + 1
    assert [rows[0][0] for rows in got] == [1 + i // 10 for i in range(50)]
    assert await store.query("SELECT SUM(v) FROM t") == [(50,)]


async def test_while_the_worker_runs_a_statement_point_statements_wait_for_it(store):
    loop_thread = threading.get_ident()
    slow = asyncio.ensure_future(store.query(SLOW))
    await asyncio.sleep(0.01)
    assert store._jobs == 1, "the slow statement should be on the worker"
    # asked for while the worker holds the connection: runs only once the worker is done
    assert await store.query(WHO) == [(loop_thread,)]
    assert slow.done() and slow.result() == [(3000000,)]
    # a transaction of point steps asked for meanwhile goes to the worker, after it
    slow = asyncio.ensure_future(store.query(SLOW))
    await asyncio.sleep(0.01)
    res = await store.transaction([Step(WHO, ())])
    assert res.rows[0][0][0] != loop_thread
    # (the worker ran it after the slow one; the slow caller may hear of its result a
    # loop turn after this one does, when the worker finished both before the loop woke)
    assert await asyncio.wait_for(slow, 5) == [(3000000,)]


async def test_a_cancelled_caller_does_not_free_the_connection_while_the_worker_still_uses_it(store):
    """The worker cannot be stopped mid-transaction: until it is done, point statements
    wait for it, so the transaction commits whole (or not at all), never by halves."""
    insert = "INSERT INTO t (k, v) VALUES ($1, 1)"
    tx = asyncio.ensure_future(store.transaction([Step(insert, ("a",)), Step(SLOW, ()), Step(insert, ("b",))]))
    await asyncio.sleep(0.02)
    assert store._conn.in_transaction, "the transaction should be running on the worker"
    tx.cancel()                     # e.g. the request awaiting it was cancelled (its client left)
    await asyncio.sleep(0)
    assert store._jobs == 1
    assert await store.query(BUMP, ("z",)) == [(1,)]
    assert await store.query("SELECT k FROM t ORDER BY k") == [("a",), ("b",), ("z",)]


async def test_another_writer_holding_the_lock_never_blocks_the_loop_and_each_write_happens_once(store, tmp_path):
    await store.query(BUMP, ("x",))
    gave_way = store.inline_gave_way
    async with another_writer_holds_the_lock(tmp_path / "i.sqlite3") as held:
        single, batch, tx = await asyncio.wait_for(asyncio.gather(
            store.query(BUMP, ("x",)),
            asyncio.gather(store.query(BUMP, ("y",)), store.query(BUMP, ("z",))),
            store.transaction([Step(BUMP, ("x",), True), Step(BUMP, ("w",), True)])), 10)
        waited, ticks = held.waited(), held.ticks
    assert waited >= 0.35, "the writes should have waited for the other writer"
    assert ticks >= 20, f"the loop was blocked while another process held the lock ({ticks} ticks in {waited:.2f}s)"
    assert store.inline_gave_way >= gave_way + 1
    assert sorted([single[0][0], tx.rows[0][0][0]]) == [2, 3]       # each of the two bumps of x once
    assert batch == [[(1,)], [(1,)]] and tx.rows[1] == [(1,)] and tx.ok
    assert await store.query("SELECT k, v FROM t ORDER BY k") == [("w", 1), ("x", 3), ("y", 1), ("z", 1)]


async def test_a_batch_sqlite_rolls_back_on_the_loop_reports_nothing_done(store):
    await store.execute("CREATE TRIGGER boom BEFORE INSERT ON t WHEN NEW.k = 'boom' "
                        "BEGIN SELECT RAISE(ROLLBACK, 'boom'); END")
    before = store.inline_batches
    results = await asyncio.gather(*(store.query(BUMP, (k,)) for k in ("before", "boom", "after")),
                                   return_exceptions=True)
    assert store.inline_batches == before + 1, "the batch should have run on the loop thread"
    assert all(isinstance(r, StoreUnavailable) for r in results), results
    assert await store.query("SELECT COUNT(*) FROM t") == [(0,)]
    assert await store.query(BUMP, ("later",)) == [(1,)]


async def test_a_failing_point_statement_fails_alone_and_a_required_step_rolls_back(store):
    results = await asyncio.gather(store.query(BUMP, ("a",)), store.query(NULL_V, ("c",)),
                                   store.query(BUMP, ("b",)), return_exceptions=True)
    assert results[0] == [(1,)] and results[2] == [(1,)]
    assert isinstance(results[1], sqlite3.IntegrityError)
    res = await store.transaction([Step(BUMP, ("a",), True), Step(GET, ("nope",), True)])
    assert res.failed_step == 1
    assert await store.query(GET, ("a",)) == [(1,)], "the rolled-back transaction's bump stayed"


async def test_checkpoints_run_on_the_worker_every_so_many_batches(store, monkeypatch):
    monkeypatch.setattr(sqlite_mod, "CHECKPOINT_EVERY", 5)
    threads = []
    real = store._checkpoint
    monkeypatch.setattr(store, "_checkpoint", lambda: threads.append(threading.get_ident()) or real())
    for i in range(40):
        await store.query(BUMP, (f"k{i}",))
    await asyncio.sleep(0.05)
    assert len(threads) >= 5 and threading.get_ident() not in threads, threads
    wal = store.path.with_name(store.path.name + "-wal")
    # the checkpoints let the WAL start over: it stays small however many batches ran
    for i in range(400):
        await store.query(BUMP, (f"m{i}",))
    await asyncio.sleep(0.05)
    assert wal.stat().st_size < 400 * 4096, wal.stat().st_size


async def test_a_closed_store_answers_point_statements_with_an_error(tmp_path):
    s = SqliteStore(tmp_path / "c.sqlite3")
    await s.open()
    await s.execute(TABLE)
    await s.close()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(s.query(BUMP, ("x",)), 5)


async def test_a_many_step_counts_each_row_toward_the_inline_bound(tmp_path):
    """A `many` step of up to INLINE_MAX rows runs on the loop's thread; a larger one
    blocks the loop too long and goes to the worker."""
    from micropay.store import CORE_SCHEMA
    from micropay.store.l402 import ADD
    from micropay.store.sqlite import INLINE_MAX
    store = SqliteStore(tmp_path / "db.sqlite3", (CORE_SCHEMA,))
    await store.open()
    try:
        def rows(prefix, n):
            return [(f"{prefix}{i}", f"t{prefix}{i}", "GET /a", "c", 1000, "lnbcrt1", "mac", 1, 2, 1) for i in range(n)]
        before = store.inline_batches
        await store.transaction([Step(ADD, rows("a", INLINE_MAX), many=True)])
        assert store.inline_batches == before + 1
        await store.transaction([Step(ADD, rows("b", INLINE_MAX + 1), many=True)])
        assert store.inline_batches == before + 1
        (count,) = await store.fetchrow("SELECT COUNT(*) FROM micropay_challenges")
        assert count == 2 * INLINE_MAX + 1
    finally:
        await store.close()
