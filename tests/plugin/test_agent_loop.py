"""The plugin's agent loop (plugin/runtime.py `_run_agent`), on a sandbox node and a
SQLite store: while the node takes long over a queued payment, the heartbeat keeps
beating and asks are answered; the payment is then paid once and the ledger in the
node's records counts it."""
from __future__ import annotations

import asyncio
import time

from micropay.lightning.memrecords import MemoryRecords
from micropay.lightning.sandbox import SandboxNetwork
from micropay.plugin.runtime import PluginRuntime
from micropay.store import open_store_from_url
from micropay.store.fleet import FLEET_SCHEMA, FleetRepository, QueuedPayment

SETTINGS = {"micropay-fleet-pool-per-round": 50, "micropay-fleet-pay-max-msat": 1_000_000,
            "micropay-fleet-pay-subject-day-msat": 1_000_000, "micropay-fleet-pay-day-msat": 1_000_000,
            "micropay-fleet-pay-max-fee-msat": 5000}


class SlowPayer:
    """A sandbox node whose payments take `delay` seconds, as a real payment can."""

    def __init__(self, node, delay: float) -> None:
        self._node, self.delay = node, delay

    def __getattr__(self, name):
        return getattr(self._node, name)

    async def pay(self, *a, **kw):
        await asyncio.sleep(self.delay)
        return await self._node.pay(*a, **kw)


async def test_a_slow_payment_holds_up_neither_the_heartbeat_nor_asks(tmp_path):
    url = f"sqlite:///{tmp_path / 'fleet.sqlite3'}"
    net = SandboxNetwork()
    merchant = SlowPayer(net.add_node("merchant", balance_msat=10_000_000), delay=4.0)
    payee = net.add_node("payee")
    rt = PluginRuntime.__new__(PluginRuntime)
    rt.node, rt.ds, rt.settings = merchant, MemoryRecords(), SETTINGS
    loop_task = asyncio.create_task(rt._run_agent(url))
    store = open_store_from_url(url, (FLEET_SCHEMA,))
    await store.open()
    repo = FleetRepository(store)
    try:
        me = await merchant.node_id()

        async def beat_ms() -> int:
            rows = await store.query("SELECT heartbeat_ms FROM micropay_fleet_nodes WHERE node_id = $1", (me,))
            return int(rows[0][0]) if rows else 0
        for _ in range(100):
            if await beat_ms():
                break
            await asyncio.sleep(0.05)
        inv = await payee.create_invoice(20_000, "r", "refund", 3600)
        await repo.enqueue(QueuedPayment("micropay-refund-slow", "refund", "", inv.bolt11, None, inv.payment_hash,
                                         20_000, False, 1000), int(time.time() * 1000))
        for _ in range(100):                      # the agent took it and is paying (slowly)
            if (await repo.payment("micropay-refund-slow")).state == "sending":
                break
            await asyncio.sleep(0.05)
        before = await beat_ms()
        await repo.ask("micropay-ask-1", me, 777, "while paying", 600, int(time.time() * 1000))
        await asyncio.sleep(2.5)
        assert await beat_ms() > before, "no heartbeat while a payment was in flight"
        assert await repo.by_claim("micropay-ask-1") is not None, "an ask waited for the payment"
        assert (await repo.payment("micropay-refund-slow")).state == "sending"
        for _ in range(200):
            if (await repo.payment("micropay-refund-slow")).state == "paid":
                break
            await asyncio.sleep(0.05)
        assert (await repo.payment("micropay-refund-slow")).state == "paid"
        assert sum(s.amount_msat for s in payee._settled) == 20_000
        (doc, _), = [v for v in [await rt.ds.get(k) for k in rt.ds.records]]
        assert doc["total"] >= 20_000 and "micropay-refund-slow" in doc["keys"]
    finally:
        loop_task.cancel()
        try:
            await loop_task
        except asyncio.CancelledError:
            pass
        await store.close()
