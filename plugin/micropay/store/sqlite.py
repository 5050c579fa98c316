"""SQLite adapter: one connection on one worker thread, WAL.

Several processes may share the file: SQLite's locking serializes writers and
busy_timeout makes them wait rather than fail.

Statements are group-committed: the ones asked for while the worker is busy (or in the
same turn of the event loop) go to the worker together and run in one transaction, each
with its own result or error, so a busy gate pays one thread hand-off and one commit per
batch instead of per statement. A statement's caller hears of it only after the batch is
committed; if the commit fails, or SQLite rolled the transaction back on its own (a full
disk, an I/O error), every statement of the batch fails with StoreUnavailable: nothing is
reported done that is not on disk. A lone statement runs in autocommit, as before.

Point statements (base.point: a few rows by key, or one bounded range of an index) skip
the worker when it is idle: a batch of them runs on the event loop's thread, at the end of
the loop turn that asked for them, if it holds at most INLINE_MAX statements, at most one
of them ranged (so the loop is blocked a few milliseconds at most).
Handing a statement to the worker thread costs more than running it: the worker has to win
the GIL from a busy loop (measured in the gate: 33 us of CPU and ~200 us of waiting per
record, against 19 us for the statement itself). So that the loop never waits on another
process, the attempt runs with busy_timeout 0: if another connection holds the write lock,
nothing is done and the batch goes to the worker, which waits for the lock as before.
Nothing on the loop's thread runs a WAL checkpoint (automatic checkpoints are off for this
connection); the worker runs a passive one every CHECKPOINT_EVERY batches.
"""
from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import StoreUnavailable
from ..core.secretfile import private_dir, private_umask
from .base import POINT_STATEMENTS, RollBack, Step, Store, TxResult
from .schema import (APPLIED, INTERIM_TABLE, RECORD_STEP, SERIAL_PK, STEPS_TABLE, Schema, interim_steps,
                     steps_to_apply)

_PLACEHOLDER = re.compile(r"\$(\d+)")
_READ = re.compile(r"\s*SELECT\b", re.I)
MAX_BATCH = 256              # statements per group commit
INLINE_MAX = 128             # point statements run on the loop's thread at once (~15 us each) ...
INLINE_RANGED_MAX = 1        # ... of which ranged ones (base.point: up to a few ms each)
CHECKPOINT_EVERY = 100       # batches between the worker's passive WAL checkpoints
BUSY_TIMEOUT_MS = 30000
_UNAVAILABLE = re.compile(r"locked|busy|disk I/O|unable to open|readonly|full")
_BUSY = re.compile(r"locked|busy")
log = logging.getLogger("micropay.store")


class _Busy(Exception):
    """Another connection holds the lock: an attempt on the loop's thread gives way."""


def _switch_to_wal(conn: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """PRAGMA journal_mode=WAL, waiting for other connections. Switching a database that
    is not in WAL mode yet takes an exclusive lock, and when several processes open it at
    once SQLite answers "database is locked" at once instead of calling the busy handler
    (seen: 19 of 300 trials of four connections opening a release-0.1.0 file together).
    So the switch is retried, with a growing pause, for as long as busy_timeout would wait."""
    deadline, pause = time.monotonic() + timeout_s, 0.002
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


class SqliteStore(Store):
    def __init__(self, path: str | Path, schemas: tuple[Schema, ...] = ()) -> None:
        self.path, self.schemas = Path(path), schemas
        self.url = f"sqlite:///{self.path}"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="micropay-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._sql_cache: dict[str, str] = {}
        self._pending: list[tuple[str, Sequence[Any], asyncio.Future]] = []
        self._draining = False
        self._jobs = 0                  # jobs handed to the worker and not finished: it may hold the connection
        self._inline_now = False        # a batch is running on the loop's thread (busy_timeout 0)
        self._batches = 0               # batches since the last checkpoint
        self._checkpointing = False
        self.inline_batches = self.inline_gave_way = 0     # counters, for tests and benchmarks

    def _connect(self) -> None:
        private_dir(self.path.parent)
        # SQLite creates -wal and -shm with the database file's mode: create all three 0600.
        with private_umask():
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            _switch_to_wal(conn)
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # never inside a commit on the loop's thread: see _checkpoint
        self._conn = conn
        self._migrate()

    def _migrate(self) -> None:
        """Bring the schemas up to date (schema.py), one process at a time."""
        assert self._conn is not None
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not _BUSY.search(str(exc)):
                raise
            raise StoreUnavailable(
                f"{self.path}: another process held the database's write lock for {BUSY_TIMEOUT_MS / 1000:g} s "
                "(a long upgrade step, such as rebuilding the credit ledger, may still be running); "
                "start this process again once it is done") from None
        try:
            self._conn.execute(STEPS_TABLE)
            if self._run("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = $1", (INTERIM_TABLE,)):
                (interim,), = self._run(f"SELECT COALESCE(MAX(version), 0) FROM {INTERIM_TABLE}", ())
                for component, version in interim_steps(int(interim)):
                    self._run(RECORD_STEP + " ON CONFLICT DO NOTHING",
                              (component, version, "applied by a development build", int(time.time())))
                self._conn.execute(f"DROP TABLE {INTERIM_TABLE}")
            applied = {c: int(v) for c, v in self._run(APPLIED, ())}
            for schema, m in steps_to_apply(applied, self.schemas):
                for stmt in m.statements + m.sqlite_only:
                    self._conn.execute(stmt.replace(SERIAL_PK, "INTEGER PRIMARY KEY AUTOINCREMENT"))
                self._run(RECORD_STEP, (schema.component, m.version, m.description, int(time.time())))
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    async def open(self) -> None:
        await self._submit(self._connect)
        self.path.chmod(0o600)

    async def close(self) -> None:
        for _ in range(10_000):               # statements already asked for run first
            if not self._draining:
                break
            await asyncio.sleep(0.001)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._submit(conn.close)
        self._pool.shutdown(wait=False)

    def _translate(self, sql: str) -> str:
        out = self._sql_cache.get(sql)
        if out is None:
            out = self._sql_cache[sql] = _PLACEHOLDER.sub(r"?\1", sql)
        return out

    def _run(self, sql: str, args: Sequence[Any], many: bool = False) -> list[tuple[Any, ...]]:
        """Run one statement (`many`: once for each of `args`' tuples, in one call)."""
        assert self._conn is not None, "store is not open"
        try:
            if many:
                self._conn.executemany(self._translate(sql), args)
                return []
            return self._conn.execute(self._translate(sql), tuple(args)).fetchall()
        except sqlite3.OperationalError as exc:
            if self._inline_now and _BUSY.search(str(exc)):
                raise _Busy() from None
            if _UNAVAILABLE.search(str(exc)):      # locked past busy_timeout, or the disk failed
                raise StoreUnavailable(f"the store is unavailable ({exc}); try again shortly") from None
            raise

    async def _execute(self, sql: str, args: Sequence[Any]) -> None:
        await self._fetchall(sql, args)

    async def _fetchall(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending.append((sql, args, done))
        if not self._draining:
            self._draining = True
            loop.call_soon(self._drain)       # statements asked for in this turn join the batch
        return await done

    def _drain(self) -> None:
        batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        items = [(sql, args) for sql, args, _ in batch]
        if self._may_inline(items):
            try:
                results = self._inline(self._run_batch, items)
            except Exception as exc:            # the connection itself failed: every statement did
                results = [exc] * len(items)
            if results is not None:
                self._settle(batch, results)
                if self._pending:
                    self._drain()
                else:
                    self._draining = False
                return
        try:
            job = self._submit(self._run_batch, items)
        except RuntimeError as exc:             # the worker is shut down (the store was closed)
            for _, _, done in batch + self._pending:
                if not done.done():
                    done.set_exception(StoreUnavailable(f"the store is closed ({exc})"))
            self._pending, self._draining = [], False
            return
        job.add_done_callback(lambda j: self._answer(batch, j))

    # -- the worker and the loop's thread ----------------------------------------------
    def _submit(self, fn: Any, *args: Any) -> asyncio.Future:
        """Run fn on the worker; while it runs, nothing runs on the loop's thread. The job
        counts as running until the worker has finished it, even if whoever awaits it is
        cancelled meanwhile (the worker cannot be stopped mid-statement)."""
        loop = asyncio.get_running_loop()
        work = self._pool.submit(fn, *args)     # RuntimeError once the worker is shut down
        self._jobs += 1
        # registered before wrap_future's own callback: the count drops before anyone hears
        work.add_done_callback(lambda _: self._job_done_threadsafe(loop))
        return asyncio.wrap_future(work, loop=loop)

    def _job_done_threadsafe(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.call_soon_threadsafe(self._job_done)
        except RuntimeError:                     # the loop is closed: nothing runs on it any more
            pass

    def _job_done(self) -> None:
        self._jobs -= 1

    def _may_inline(self, statements: Sequence[tuple[str, Any]]) -> bool:
        """A batch runs on the loop's thread when the worker is idle and the batch is point
        statements only, few enough that it blocks the loop for a few milliseconds at
        most: INLINE_MAX of them, INLINE_RANGED_MAX of them ranged (reserve claims started
        for many prices in one loop turn go to the worker together)."""
        if self._jobs or self._conn is None or len(statements) > INLINE_MAX:
            return False
        ranged = 0
        for sql, _ in statements:
            kind = POINT_STATEMENTS.get(sql)
            if kind is None:
                return False
            ranged += kind
        return ranged <= INLINE_RANGED_MAX

    def _inline(self, fn: Any, arg: Any) -> Any:
        """fn(arg) on the loop's thread without waiting for any lock; None if another
        connection held one (nothing was done: the caller hands the work to the worker)."""
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("PRAGMA busy_timeout=0")
        except sqlite3.Error:
            return None
        self._inline_now = True
        try:
            out = fn(arg)
            self.inline_batches += 1
            return out
        except _Busy:
            self.inline_gave_way += 1
            return None
        finally:
            self._inline_now = False
            try:
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            except sqlite3.Error as exc:     # the worker's next statement reports the connection's state
                log.warning("restoring the SQLite busy timeout failed: %s", exc)
            self._after_batch()

    def _after_batch(self) -> None:
        """Count a batch; every CHECKPOINT_EVERY, a passive WAL checkpoint on the worker."""
        self._batches += 1
        if self._batches >= CHECKPOINT_EVERY and not self._checkpointing and self._conn is not None:
            self._batches, self._checkpointing = 0, True
            try:
                self._submit(self._checkpoint).add_done_callback(self._checkpointed)
            except RuntimeError:                 # the worker is shut down
                self._checkpointing = False

    def _checkpoint(self) -> None:
        if self._conn is not None:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _checkpointed(self, job: asyncio.Future) -> None:
        self._checkpointing = False
        if not job.cancelled() and job.exception() is not None:
            log.warning("WAL checkpoint failed: %s", job.exception())

    def _answer(self, batch: list[tuple[str, Sequence[Any], asyncio.Future]], job: asyncio.Future) -> None:
        try:
            results: list[Any] = job.result()
        except BaseException as exc:            # the worker itself failed: every statement did
            results = [exc] * len(batch)
        self._settle(batch, results)
        self._after_batch()
        if self._pending:
            self._drain()
        else:
            self._draining = False

    @staticmethod
    def _settle(batch: list[tuple[str, Sequence[Any], asyncio.Future]], results: list[Any]) -> None:
        for (_, _, done), result in zip(batch, results):
            if done.done():
                continue
            if isinstance(result, BaseException):
                done.set_exception(result)
            else:
                done.set_result(result)

    def _run_batch(self, items: list[tuple[str, Sequence[Any]]]) -> list[Any]:
        """Run statements on the worker: alone or only reads in autocommit (a read never
        waits for another process's writer, as WAL allows), several writes in one
        transaction."""
        assert self._conn is not None, "store is not open"
        if self._conn.in_transaction:           # a ROLLBACK that failed left one open: end it first
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                return [StoreUnavailable(f"the store is unavailable ({exc}); try again shortly")] * len(items)
        if len(items) == 1 or all(_READ.match(sql) for sql, _ in items):
            out: list[Any] = []
            for item in items:
                try:
                    out.append(self._run(*item))
                except _Busy:                   # on the loop's thread: the batch goes to the worker
                    raise                       # (a lone write did nothing; reads are run again)
                except Exception as exc:
                    out.append(exc)
            return out
        self._run("BEGIN IMMEDIATE", ())
        out = []
        for sql, args in items:
            try:
                out.append(self._run(sql, args))
            except _Busy:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            except Exception as exc:            # this statement is undone; the others stand
                out.append(exc)
                if not self._conn.in_transaction:
                    break                       # ... unless SQLite undid the whole batch: run no more
        try:
            if not self._conn.in_transaction:
                raise sqlite3.OperationalError("SQLite rolled the batch back")
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            if self._inline_now and _BUSY.search(str(exc)):
                raise _Busy() from None         # nothing was committed: the worker runs it all
            lost = StoreUnavailable(f"the store is unavailable ({exc}); try again shortly")
            return [lost] * len(items)
        return out

    def _run_tx(self, steps: list[Step]) -> TxResult:
        assert self._conn is not None, "store is not open"
        out: list[list[tuple[Any, ...]]] = []
        if self._conn.in_transaction:       # a ROLLBACK that failed left one open: end it first
            self._conn.execute("ROLLBACK")
        self._run("BEGIN IMMEDIATE", ())   # take the write lock now: no lost updates
        try:
            for i, step in enumerate(steps):
                rows = self._run(step.sql, step.args, step.many)
                if step.required and not rows:
                    raise RollBack(i)
                out.append(rows)
        except RollBack as rb:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            return TxResult(out, rb.index)
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            if self._inline_now and _BUSY.search(str(exc)):
                raise _Busy() from None
            raise StoreUnavailable(f"the store is unavailable ({exc}); try again shortly") from None
        return TxResult(out)

    async def _transaction(self, steps) -> TxResult:
        steps = list(steps)
        # a `many` step counts as one statement per row (the bound on what runs on the loop)
        n = sum(len(step.args) if step.many else 1 for step in steps)
        if n <= INLINE_MAX and self._may_inline(
                [(step.sql, None) for step in steps for _ in range(len(step.args) if step.many else 1)]):
            done = self._inline(self._run_tx, steps)
            if done is not None:
                return done
        try:
            return await self._submit(self._run_tx, steps)
        finally:
            self._after_batch()
