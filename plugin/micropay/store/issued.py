"""The plugin's issued invoices, mirrored from the node's datastore (where the records
live) so that micropay-list finds ours among the node's invoices by label."""
from __future__ import annotations

from typing import Sequence

from .base import Store

RECORD = ("INSERT INTO micropay_issued_invoices (label, record, created_at) VALUES ($1, $2, $3) "
          "ON CONFLICT (label) DO NOTHING")
COUNT = "SELECT COUNT(*) FROM micropay_issued_invoices"


class IssuedInvoiceRepository:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def record(self, label: str, record: str, created_at: int) -> None:
        await self.store.execute(RECORD, (label, record, created_at))

    async def records(self, labels: Sequence[str]) -> dict[str, str]:
        """The records (JSON text) of those labels that are ours."""
        out: dict[str, str] = {}
        for i in range(0, len(labels), 500):
            chunk = list(labels[i:i + 500])
            marks = ",".join(f"${n + 1}" for n in range(len(chunk)))
            rows = await self.store.query(
                f"SELECT label, record FROM micropay_issued_invoices WHERE label IN ({marks})", chunk)
            out.update(dict(rows))
        return out

    async def count(self) -> int:
        row = await self.store.fetchrow(COUNT, ())
        return int(row[0]) if row else 0
