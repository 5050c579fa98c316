"""JSON records in Core Lightning's datastore, with generation compare-and-swap (the
RecordStore port, see base.py).

Keys are arrays under the ("micropay", ...) prefix. `create` is must-create (so a
retry cannot overwrite), `replace` is must-replace at a known generation (so two
writers cannot both win)."""
from __future__ import annotations

import json
from typing import Any

from .base import RecordExists, StaleRecord
from .cln import ClnRpc, ClnRpcError

ALREADY_EXISTS, DOES_NOT_EXIST, WRONG_GENERATION = 1202, 1203, 1204
PREFIX = ("micropay",)


__all__ = ["Datastore", "RecordExists", "StaleRecord"]


class Datastore:
    """The RecordStore port on lightningd's datastore."""

    def __init__(self, rpc: ClnRpc, prefix: tuple[str, ...] = PREFIX) -> None:
        self.rpc, self.prefix = rpc, list(prefix)

    def _key(self, key: list[str] | tuple[str, ...]) -> list[str]:
        return self.prefix + [str(k) for k in key]

    async def get(self, key: list[str] | tuple[str, ...]) -> tuple[Any, int] | None:
        rows = (await self.rpc.call("listdatastore", {"key": self._key(key)}))["datastore"]
        for row in rows:
            if row["key"] == self._key(key) and "string" in row:
                return json.loads(row["string"]), row.get("generation", 0)
        return None

    async def list(self, key: list[str] | tuple[str, ...]) -> list[tuple[list[str], Any, int]]:
        """Records directly under `key` (one level down)."""
        rows = (await self.rpc.call("listdatastore", {"key": self._key(key)}))["datastore"]
        out = []
        for row in rows:
            if "string" in row:
                out.append((row["key"][len(self.prefix):], json.loads(row["string"]), row.get("generation", 0)))
        return out

    async def create(self, key: list[str] | tuple[str, ...], value: Any) -> int:
        try:
            r = await self.rpc.call("datastore", {"key": self._key(key), "string": _dump(value),
                                                  "mode": "must-create"})
        except ClnRpcError as exc:
            if exc.cln_code == ALREADY_EXISTS:
                raise RecordExists(f"record {'/'.join(self._key(key))} already exists") from None
            raise
        return r.get("generation", 0)

    async def replace(self, key: list[str] | tuple[str, ...], value: Any, generation: int) -> int:
        try:
            r = await self.rpc.call("datastore", {"key": self._key(key), "string": _dump(value),
                                                  "mode": "must-replace", "generation": generation})
        except ClnRpcError as exc:
            if exc.cln_code in (WRONG_GENERATION, DOES_NOT_EXIST):
                raise StaleRecord(f"record {'/'.join(self._key(key))} changed underneath us") from None
            raise
        return r.get("generation", generation + 1)

    async def delete(self, key: list[str] | tuple[str, ...]) -> None:
        try:
            await self.rpc.call("deldatastore", {"key": self._key(key)})
        except ClnRpcError as exc:
            if exc.cln_code != 1200:
                raise


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
