"""The Store port and its adapters, chosen by URL scheme."""
from __future__ import annotations

from ..errors import ConfigError
from .base import ChallengeRecord, Store


def open_store_from_url(url: str) -> Store:
    """sqlite:///relative/or//absolute/path.sqlite3, or postgresql://user@host/db[?schema=s]."""
    if url.startswith("sqlite://"):
        from .sqlite import SqliteStore
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url[len("sqlite://"):]
        if not path:
            raise ConfigError("store url: sqlite:// needs a file path")
        return SqliteStore(path)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore
        return PostgresStore(url)
    raise ConfigError(f"store url must start with sqlite:// or postgresql://, got {url.split(':')[0]!r}")


__all__ = ["ChallengeRecord", "Store", "open_store_from_url"]
