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
"""
from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from ..core.errors import StoreUnavailable
from ..core.secretfile import private_dir, private_umask
from .base import RollBack, Step, Store, TxResult
from .schema import (APPLIED, INTERIM_TABLE, RECORD_STEP, SERIAL_PK, STEPS_TABLE, Schema, interim_steps,
                     steps_to_apply)

_PLACEHOLDER = re.compile(r"\$(\d+)")
_READ = re.compile(r"\s*SELECT\b", re.I)
MAX_BATCH = 256              # statements per group commit
_UNAVAILABLE = re.compile(r"locked|busy|disk I/O|unable to open|readonly|full")


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

    def _connect(self) -> None:
        private_dir(self.path.parent)
        # SQLite creates -wal and -shm with the database file's mode: create all three 0600.
        with private_umask():
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            _switch_to_wal(conn)
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        conn.execute("PRAGMA busy_timeout=30000")
        self._conn = conn
        self._migrate()

    def _migrate(self) -> None:
        """Bring the schemas up to date (schema.py), one process at a time."""
        assert self._conn is not None
        self._conn.execute("BEGIN IMMEDIATE")
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
                for stmt in m.statements:
                    self._conn.execute(stmt.replace(SERIAL_PK, "INTEGER PRIMARY KEY AUTOINCREMENT"))
                self._run(RECORD_STEP, (schema.component, m.version, m.description, int(time.time())))
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._connect)
        self.path.chmod(0o600)

    async def close(self) -> None:
        for _ in range(10_000):               # statements already asked for run first
            if not self._draining:
                break
            await asyncio.sleep(0.001)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._pool, conn.close)
        self._pool.shutdown(wait=False)

    def _translate(self, sql: str) -> str:
        out = self._sql_cache.get(sql)
        if out is None:
            out = self._sql_cache[sql] = _PLACEHOLDER.sub(r"?\1", sql)
        return out

    def _run(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        assert self._conn is not None, "store is not open"
        try:
            return self._conn.execute(self._translate(sql), tuple(args)).fetchall()
        except sqlite3.OperationalError as exc:
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
        try:
            job = asyncio.get_running_loop().run_in_executor(self._pool, self._run_batch,
                                                             [(sql, args) for sql, args, _ in batch])
        except RuntimeError as exc:             # the worker is shut down (the store was closed)
            for _, _, done in batch + self._pending:
                if not done.done():
                    done.set_exception(StoreUnavailable(f"the store is closed ({exc})"))
            self._pending, self._draining = [], False
            return
        job.add_done_callback(lambda j: self._answer(batch, j))

    def _answer(self, batch: list[tuple[str, Sequence[Any], asyncio.Future]], job: asyncio.Future) -> None:
        try:
            results: list[Any] = job.result()
        except BaseException as exc:            # the worker itself failed: every statement did
            results = [exc] * len(batch)
        for (_, _, done), result in zip(batch, results):
            if done.done():
                continue
            if isinstance(result, BaseException):
                done.set_exception(result)
            else:
                done.set_result(result)
        if self._pending:
            self._drain()
        else:
            self._draining = False

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
                except Exception as exc:
                    out.append(exc)
            return out
        self._run("BEGIN IMMEDIATE", ())
        out = []
        for sql, args in items:
            try:
                out.append(self._run(sql, args))
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
            lost = StoreUnavailable(f"the store is unavailable ({exc}); try again shortly")
            return [lost] * len(items)
        return out

    def _run_tx(self, steps: list[Step]) -> TxResult:
        assert self._conn is not None, "store is not open"
        out: list[list[tuple[Any, ...]]] = []
        self._run("BEGIN IMMEDIATE", ())   # take the write lock now: no lost updates
        try:
            for i, step in enumerate(steps):
                rows = self._run(step.sql, step.args)
                if step.required and not rows:
                    raise RollBack(i)
                out.append(rows)
        except RollBack as rb:
            self._conn.execute("ROLLBACK")
            return TxResult(out, rb.index)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return TxResult(out)

    async def _transaction(self, steps) -> TxResult:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run_tx, list(steps))
