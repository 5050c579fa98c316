"""The RecordStore port in memory: for the sandbox backend and tests. Same rules as
lightningd's datastore: must-create, and replace at a known generation."""
from __future__ import annotations

import json
from typing import Any

from .base import RecordExists, StaleRecord


class MemoryRecords:
    def __init__(self) -> None:
        self.records: dict[tuple[str, ...], tuple[str, int]] = {}   # key -> (JSON text, generation)

    async def get(self, key: tuple[str, ...] | list[str]) -> tuple[Any, int] | None:
        found = self.records.get(tuple(key))
        return (json.loads(found[0]), found[1]) if found else None

    async def list(self, key: tuple[str, ...] | list[str]) -> list[tuple[list[str], Any, int]]:
        prefix = tuple(key)
        return [(list(k), json.loads(text), gen) for k, (text, gen) in sorted(self.records.items())
                if k[:len(prefix)] == prefix and len(k) == len(prefix) + 1]

    async def create(self, key: tuple[str, ...] | list[str], value: Any) -> int:
        k = tuple(key)
        if k in self.records:
            raise RecordExists(f"record {'/'.join(k)} already exists")
        self.records[k] = (json.dumps(value, sort_keys=True), 0)
        return 0

    async def replace(self, key: tuple[str, ...] | list[str], value: Any, generation: int) -> int:
        k = tuple(key)
        found = self.records.get(k)
        if found is None or found[1] != generation:
            raise StaleRecord(f"record {'/'.join(k)} changed underneath us")
        self.records[k] = (json.dumps(value, sort_keys=True), generation + 1)
        return generation + 1

    async def delete(self, key: tuple[str, ...] | list[str]) -> None:
        self.records.pop(tuple(key), None)
