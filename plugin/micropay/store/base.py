"""The Store port: a database that runs statements and transactions.

Adapters (sqlite.py, postgres.py) implement it; repositories (l402.py, cursors.py,
stream_usage.py, issued.py, and games/repository.py) own the tables and statements of
one feature each and return frozen dataclasses. SQL is written once with PostgreSQL's
`$n` placeholders; the SQLite adapter maps them to SQLite's `?n`. Both engines run the
same UPSERT ... RETURNING statements, so every state change is one atomic, idempotent
statement or one transaction.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence


POINT_STATEMENTS: dict[str, bool] = {}      # sql -> ranged


def point(sql: str, *, ranged: bool = False) -> str:
    """Mark `sql` as a point statement: it reads or writes a few rows found by a key
    (primary or unique), or scans a table as small as the fleet's nodes, so it takes
    microseconds. `ranged`: it walks a range of an index bounded by a LIMIT instead (a
    fleet reserve's claim of up to 256 rows, a page of the settlement feed), which takes
    up to a few milliseconds. The SQLite adapter may run such statements on the event
    loop's thread, at most one ranged statement per batch there (sqlite.py); others
    ignore the mark."""
    POINT_STATEMENTS[sql] = ranged
    return sql


@dataclass(frozen=True, slots=True)
class Step:
    sql: str
    args: Sequence[Any]
    required: bool = False     # no row back -> roll the whole transaction back
    many: bool = False         # args is a list of argument tuples: the statement runs once for each, no rows back

    def __post_init__(self) -> None:
        if self.many and self.required:
            raise ValueError("a many step returns no rows, so it cannot be required")


@dataclass(frozen=True, slots=True)
class TxResult:
    rows: list[list[tuple[Any, ...]]]
    failed_step: int | None = None   # index of the required step that returned nothing

    @property
    def ok(self) -> bool:
        return self.failed_step is None


class RollBack(Exception):
    def __init__(self, index: int) -> None:
        self.index = index


class Store(abc.ABC):
    """A database. Subclasses provide open, close, _execute, _fetchall and _transaction;
    `schemas` names the features' tables it brings up to date when opened."""

    url: str
    schemas: tuple[Any, ...] = ()      # schema.Schema, one per feature

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def _execute(self, sql: str, args: Sequence[Any]) -> None: ...

    @abc.abstractmethod
    async def _fetchall(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]: ...

    async def _fetchrow(self, sql: str, args: Sequence[Any]) -> tuple[Any, ...] | None:
        rows = await self._fetchall(sql, args)
        return rows[0] if rows else None

    @abc.abstractmethod
    async def _transaction(self, steps: Sequence[Step]) -> TxResult:
        """Run `steps` in one transaction. If a step marked `required` returns no row,
        roll everything back and report that step's index."""

    # -- what repositories use ---------------------------------------------
    async def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await self._fetchall(sql, args)

    async def transaction(self, steps: Sequence[Step]) -> TxResult:
        return await self._transaction(steps)

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        await self._execute(sql, args)

    async def fetchrow(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        return await self._fetchrow(sql, args)

    # -- notifications between processes ---------------------------------------------
    # PostgreSQL carries them (LISTEN/NOTIFY); SQLite has none, so whoever waits on a
    # channel also polls (a listener is a wake-up, never the only way to learn news).
    async def notify(self, channel: str) -> None:
        return None

    async def listen(self, channel: str, wake: Callable[[], None]) -> Callable[[], Awaitable[None]]:
        """Call `wake()` (on this loop) whenever `channel` is notified; returns a function
        that stops listening."""
        async def stop() -> None:
            return None
        return stop
