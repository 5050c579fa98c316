"""Settlement cursors: where each consumer of the node's settlements has got to."""
from __future__ import annotations

from .base import Store

GET = "SELECT value FROM micropay_cursors WHERE name = $1"
# Forward only: an out-of-order write can never rewind a cursor.
ADVANCE = ("INSERT INTO micropay_cursors (name, value) VALUES ($1, $2) ON CONFLICT (name) "
           "DO UPDATE SET value = excluded.value WHERE micropay_cursors.value < excluded.value")


class CursorRepository:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, name: str) -> int:
        row = await self.store.fetchrow(GET, (name,))
        return int(row[0]) if row else 0

    async def advance(self, name: str, value: int) -> None:
        await self.store.execute(ADVANCE, (name, value))
