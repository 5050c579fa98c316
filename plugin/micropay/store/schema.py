"""Schema versions: each feature registers its tables as numbered, forward-only steps.

A `Schema` belongs to one component ("core" for the gate, settlements, streams and the
plugin's invoices; "games" for the purchases API) and lists that component's
migrations in order. Whoever opens a store names the schemas it needs
(`open_store_from_url(url, schemas)`); the adapters know no feature's tables.

At open, each adapter takes a lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory
transaction lock, so several sidecars starting at once apply each step exactly once),
reads which steps every component has applied from `micropay_schema_steps`, and runs
the later ones in that same transaction. A database made by release 0.1.0 has no such
table: step 1 of each component (that release's tables, all CREATE ... IF NOT EXISTS)
is then a no-op, and the later steps bring it up to date.

Every schema change is a new step at the end of its component's list; a released step
is never edited.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ConfigError

SERIAL_PK = "SERIAL_PK"   # each adapter substitutes its auto-increment primary key


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]
    # Run by the SQLite adapter only, after `statements`: a change of storage layout that
    # PostgreSQL has no counterpart for (the step is recorded there all the same).
    sqlite_only: tuple[str, ...] = ()


@dataclass(frozen=True)
class Schema:
    component: str
    migrations: tuple[Migration, ...]

    def __post_init__(self) -> None:
        if [m.version for m in self.migrations] != list(range(1, len(self.migrations) + 1)):
            raise ValueError(f"schema {self.component}: steps must be numbered 1, 2, ... in order")

    @property
    def latest(self) -> int:
        return self.migrations[-1].version

    def pending(self, current: int) -> list[Migration]:
        if current > self.latest:
            raise ConfigError(f"store: the database has {self.component} schema step {current}, newer than "
                              f"this micropay knows ({self.latest}); upgrade micropay instead of running an "
                              "older one against it")
        return [m for m in self.migrations if m.version > current]


STEPS_TABLE = ("CREATE TABLE IF NOT EXISTS micropay_schema_steps (component TEXT NOT NULL, version BIGINT NOT NULL, "
               "description TEXT NOT NULL, applied_at BIGINT NOT NULL, PRIMARY KEY (component, version))")
APPLIED = "SELECT component, MAX(version) FROM micropay_schema_steps GROUP BY component"
RECORD_STEP = ("INSERT INTO micropay_schema_steps (component, version, description, applied_at) "
               "VALUES ($1, $2, $3, $4)")

# Development builds between 0.1.0 and 0.2.0 numbered one list for everything in
# `micropay_schema_version`: 1 = core and games tables, 2 = payout columns (games),
# 3 = the issued-invoice mirror (core). A database they made is carried over once.
INTERIM_TABLE = "micropay_schema_version"
INTERIM_STEPS = {1: (("core", 1), ("games", 1)), 2: (("games", 2),), 3: (("core", 2),)}


def interim_steps(applied_version: int) -> list[tuple[str, int]]:
    """(component, version) pairs a database at that interim version already has."""
    return [pair for v in range(1, applied_version + 1) for pair in INTERIM_STEPS.get(v, ())]


def check_unique(schemas: tuple[Schema, ...]) -> None:
    names = [s.component for s in schemas]
    if len(set(names)) != len(names):
        raise ValueError(f"a store was given the same schema twice: {names}")


def steps_to_apply(applied: dict[str, int], schemas: tuple[Schema, ...]) -> list[tuple[Schema, Migration]]:
    """What a store at `applied` (component -> highest step) still needs, in order."""
    check_unique(schemas)
    return [(s, m) for s in schemas for m in s.pending(applied.get(s.component, 0))]
