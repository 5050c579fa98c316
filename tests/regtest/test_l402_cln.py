"""L402 pay-per-request end to end on a real network: the sidecar on node B through
Core Lightning, the client paying from node A."""
import asyncio
import json
import time

import aiohttp

from micropay.client.payer import Budget, L402Client, NodeWallet, TokenCache
from micropay.lightning.cln import ClnNode
from micropay.core.receipts import verify_receipt

from ..conftest import make_config, payment_receipt, start_sidecar

ROUTES = """
service = "shop"
demo = true
trust_forwarded_for = true
[backend]
kind = "cln"
rpc_file = "{rpc}"
[[routes]]
method = "GET"
path = "/api/joke"
price_msat = 21000
[[routes]]
method = "GET"
path = "/api/fortune/*"
price_msat = 30000
credits = 3
"""


async def cln_sidecar(tmp_path, rpc_file):
    cfg = make_config(tmp_path, ROUTES.format(rpc=rpc_file))
    node = ClnNode(rpc_file)
    await node.connect()
    return await start_sidecar(cfg, node=node)


async def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.2)
    return False


async def test_pay_per_request_and_credits_over_cln(node_factory, tmp_path):
    l1, l2 = node_factory.line_graph(2, wait_for_announce=True)
    sc = await cln_sidecar(tmp_path, l2.rpc.socket_path)
    payer = ClnNode(l1.rpc.socket_path)
    events = []
    client = L402Client(NodeWallet(payer), Budget(max_per_request_msat=50_000), TokenCache(tmp_path / "c.json"),
                        on_event=events.append)
    try:
        async with aiohttp.ClientSession() as s, s.get(sc.url + "/api/joke") as r:
            assert r.status == 402
            doc = json.loads(await r.read())
        decoded = l1.rpc.decode(doc["invoice"])
        assert decoded["payee"] == l2.info["id"] and decoded["amount_msat"] == 21000

        res = await client.get(sc.url + "/api/joke")
        assert res.status == 200 and res.paid_msat == 21000 and "joke" in res.json()
        assert res.receipt["type"] == "request"
        def sent():
            return sum(p["amount_msat"] for p in l1.rpc.listsendpays()["payments"] if p["status"] == "complete")
        balance_before = sent()
        for i in range(3):
            r = await client.get(f"{sc.url}/api/fortune/{i}")
            assert r.status == 200
        assert r.receipt["credits_remaining"] == 0
        spent = sent() - balance_before
        assert spent == 30000                   # one payment bought the credits
        assert len([e for e in events if e.startswith("paid ")]) == 2

        async def settled():
            rec = await sc.rt.l402.get_challenge(res.payment_hash)
            return rec is not None and rec.paid_at is not None
        assert await wait_until(settled)
        assert verify_receipt(await payment_receipt(sc.rt.store, res.payment_hash))["amount_msat"] == 21000
        assert sc.rt.metrics.revenue_msat >= 21000
    finally:
        await sc.runner.cleanup()
        await payer.close()


async def test_settlements_survive_sidecar_and_node_restarts(node_factory, tmp_path):
    l1, l2 = node_factory.line_graph(2, wait_for_announce=True, opts={"may_reconnect": True})
    sc = await cln_sidecar(tmp_path, l2.rpc.socket_path)
    async with aiohttp.ClientSession() as s:
        challenges = []
        for path in ("/api/joke", "/api/fortune/1", "/api/fortune/2"):
            async with s.get(sc.url + path, headers={"X-Forwarded-For": path}) as r:
                challenges.append(json.loads(await r.read()))
    await sc.runner.cleanup()                                   # sidecar down
    l1.rpc.xpay(challenges[0]["invoice"])                       # paid while it is down

    sc = await cln_sidecar(tmp_path, l2.rpc.socket_path)        # back: catches up from its cursor
    try:
        async def paid(ph):
            rec = await sc.rt.l402.get_challenge(ph)
            return rec is not None and rec.paid_at is not None
        assert await wait_until(lambda: paid(challenges[0]["payment_hash"]))

        l2.restart()                                            # the node restarts under it
        l1.rpc.connect(l2.info["id"], "localhost", l2.port)
        l1.wait_channel_active(l1.get_channel_scid(l2))
        l1.rpc.xpay(challenges[1]["invoice"])
        assert await wait_until(lambda: paid(challenges[1]["payment_hash"]), timeout=60)
        assert not await paid(challenges[2]["payment_hash"])
        assert sc.rt.metrics.settlements == 2                   # nothing counted twice
    finally:
        await sc.runner.cleanup()


async def test_cli_pays_from_a_node(node_factory, tmp_path):
    import subprocess
    import sys
    l1, l2 = node_factory.line_graph(2, wait_for_announce=True)
    sc = await cln_sidecar(tmp_path, l2.rpc.socket_path)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "micropay.cli", "get", "--wallet", f"cln:{l1.rpc.socket_path}",
            "--max-msat", "25000", "--cache", str(tmp_path / "cli.json"), sc.url + "/api/joke",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        assert "joke" in json.loads(out) and "paid 21000 msat" in err.decode()
    finally:
        await sc.runner.cleanup()
