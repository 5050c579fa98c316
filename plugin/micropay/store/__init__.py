"""The Store port, its adapters (chosen by URL scheme), and the core repositories."""
from __future__ import annotations

from ..core.errors import ConfigError
from .base import Store
from .core import CORE_SCHEMA
from .schema import Schema


def open_store_from_url(url: str, schemas: tuple[Schema, ...] = (CORE_SCHEMA,)) -> Store:
    """sqlite:///relative/or//absolute/path.sqlite3, or postgresql://user@host/db[?schema=s].
    `schemas`: the features whose tables the store brings up to date when opened."""
    if url.startswith("sqlite://"):
        from .sqlite import SqliteStore
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url[len("sqlite://"):]
        if not path:
            raise ConfigError("store url: sqlite:// needs a file path")
        return SqliteStore(path, schemas)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore
        return PostgresStore(url, schemas)
    raise ConfigError(f"store url must start with sqlite:// or postgresql://, got {url.split(':')[0]!r}")


__all__ = ["CORE_SCHEMA", "Schema", "Store", "open_store_from_url"]
