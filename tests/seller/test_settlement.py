"""The settlement router (micropay/seller/settlement.py): each paid invoice goes to the feature
that issued it, once per settlement, from a cursor that survives restarts."""
import asyncio

import pytest

from micropay.lightning.sandbox import SandboxNetwork
from micropay.seller.settlement import SettlementRouter, cursor_name
from micropay.store.cursors import CursorRepository


async def test_the_longest_registered_prefix_wins_and_strangers_are_ignored(store):
    net = SandboxNetwork()
    node, payer = net.add_node("n"), net.add_node("payer", 10**9)
    got: dict[str, list[str]] = {"l402": [], "games": []}

    async def l402(s):
        got["l402"].append(s.label)

    async def games(s):
        got["games"].append(s.label)
    router = SettlementRouter(node, CursorRepository(store))
    router.register("micropay-", l402)
    router.register("micropay-purchase-", games)
    with pytest.raises(ValueError):
        router.register("micropay-", l402)
    for label in ("micropay-abc", "micropay-purchase-pur_1", "someone-elses"):
        await payer.pay((await node.create_invoice(1000, label, "x", 60)).bolt11)
    task = asyncio.create_task(router.run())
    try:
        for _ in range(100):
            if await CursorRepository(store).get(cursor_name(node)) == 3:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert got == {"l402": ["micropay-abc"], "games": ["micropay-purchase-pur_1"]}
    # a restart resumes after the cursor: nothing is handed over again
    again = SettlementRouter(node, CursorRepository(store))
    again.register("micropay-", l402)
    task = asyncio.create_task(again.run())
    await asyncio.sleep(0.05)
    task.cancel()
    assert got["l402"] == ["micropay-abc"]
