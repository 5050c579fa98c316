"""PostgreSQL adapter (asyncpg pool). Tables live in the schema named by the URL's
`schema` query parameter (default: the connection's search_path)."""
from __future__ import annotations

from typing import Any, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from ..errors import ConfigError
from .base import SCHEMA, Store


def split_schema(url: str) -> tuple[str, str | None]:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", None)
    if schema is not None and not schema.replace("_", "").isalnum():
        raise ConfigError(f"store url: schema must be letters, digits and '_', got {schema!r}")
    return urlunsplit(parts._replace(query=urlencode(query))), schema


class PostgresStore(Store):
    def __init__(self, url: str, min_size: int = 1, max_size: int = 10) -> None:
        self.url = url
        self._dsn, self.schema = split_schema(url)
        self._min, self._max = min_size, max_size
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        settings = {"search_path": self.schema} if self.schema else None
        try:
            if self.schema:
                conn = await asyncpg.connect(self._dsn)
                try:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                finally:
                    await conn.close()
            self._pool = await asyncpg.create_pool(self._dsn, min_size=self._min, max_size=self._max,
                                                   server_settings=settings)
        except (OSError, asyncpg.PostgresError) as exc:
            host = urlsplit(self._dsn).hostname
            raise ConfigError(f"store: cannot connect to PostgreSQL at {host}: {exc}") from None
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                # Serialize schema creation across processes starting together.
                await conn.execute("SELECT pg_advisory_xact_lock(4020402)")
                for stmt in SCHEMA:
                    await conn.execute(stmt)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def _execute(self, sql: str, args: Sequence[Any]) -> None:
        assert self._pool is not None, "store is not open"
        await self._pool.execute(sql, *args)

    async def _fetchall(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        assert self._pool is not None, "store is not open"
        return [tuple(r) for r in await self._pool.fetch(sql, *args)]
