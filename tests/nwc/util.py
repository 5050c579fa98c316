"""The plugin's NWC service on a sandbox node, for the tests: its own store, a real relay."""
from __future__ import annotations

import contextlib
from pathlib import Path

from micropay.nwc.runner import NwcRunner
from micropay.nwc.schema import NWC_SCHEMA
from micropay.store.core import CORE_SCHEMA
from micropay.store.sqlite import SqliteStore


@contextlib.asynccontextmanager
async def nwc_service(node, tmp_path: Path, relay_url: str, alias: str = "payer"):
    """An NwcRunner serving `node` on `relay_url`, connected, closed afterwards."""
    store = SqliteStore(tmp_path / "nwc.sqlite3", (CORE_SCHEMA, NWC_SCHEMA))
    await store.open()

    async def info():
        return {"alias": alias, "color": "3399ff", "pubkey": await node.node_id(), "network": "regtest",
                "block_height": 1, "block_hash": "00" * 32}
    runner = NwcRunner(node, store, tmp_path / "nwc_secret", [relay_url], node_info=info)
    await runner.start()
    try:
        assert await runner.pool.wait_connected(10)
        yield runner
    finally:
        await runner.close()
        await store.close()
