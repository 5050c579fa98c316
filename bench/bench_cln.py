"""micropay on a real regtest network vs the raw Core Lightning calls, in one run.

    python bench/bench_cln.py [--n 30] [--dir /tmp/micropay-bench-net]

Starts a 3-node line network (contrib/regtest/network.py; node 1 -> 2 -> 3, so every
payment crosses two hops), then measures:
  1. 402 challenge minting through the sidecar (on node 3) vs raw `invoice` (goal >= 0.8x)
  2. first paid request (402 + xpay + retry) vs a raw `xpay` of the same amount
     (goal: <= 15 ms overhead)
  3. stream engine payments vs raw `xkeysend` (goal >= 0.9x)
Sequential calls, so the figures are per-operation latencies.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "contrib" / "regtest"))
sys.path.insert(0, str(HERE))

import aiohttp  # noqa: E402
import network  # noqa: E402
from pyln.client import LightningRpc  # noqa: E402

from micropay.client.payer import Budget, L402Client, NodeWallet, TokenCache  # noqa: E402
from micropay.seller.configfile import parse_config  # noqa: E402
from micropay.lightning.cln import ClnNode  # noqa: E402
from micropay.sidecar.app import build_app, create_runtime, make_runner  # noqa: E402

CONFIG = """
service = "bench"
demo = true
trust_forwarded_for = true
[backend]
kind = "cln"
rpc_file = "{rpc}"
[challenges]
per_client_per_minute = 100000
max_pending = 1000000
[[routes]]
method = "GET"
path = "/api/joke"
price_msat = 10000
"""


def serve_and_wrk(tmp: Path, rpc_file: str, connections: int, seconds: int) -> float:
    """Run `micropay serve` against the node and measure 402s per second with wrk, each
    request from a distinct X-Forwarded-For (so every 402 mints a new invoice)."""
    import subprocess

    from common import script, wrk_run   # bench/common.py, bench/bench_challenge.py
    cfg = tmp / "serve.toml"
    cfg.write_text(CONFIG.format(rpc=rpc_file))
    port = network.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "micropay.cli", "serve", "--config", str(cfg), "--listen",
                             f"127.0.0.1:{port}", "--data-dir", str(tmp / "serve")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        network.wait(lambda: _healthy(port), "micropay serve", 30)
        rate, _ = wrk_run(f"http://127.0.0.1:{port}/api/joke", seconds, connections, script=script("/api/joke"))
        return rate
    finally:
        proc.terminate()
        proc.wait(15)


def _healthy(port: int) -> bool:
    import urllib.request
    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
    return True


def ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs) * 1e3:7.2f} ms mean, {statistics.median(xs) * 1e3:7.2f} ms median"


async def bench(state: dict, n: int, tmp: Path, rounds: int = 3) -> None:
    n1, n3 = state["nodes"][0], state["nodes"][-1]
    merchant, payer = ClnNode(n3["rpc_file"]), ClnNode(n1["rpc_file"])
    await merchant.connect()
    await payer.connect()
    cfg = parse_config(tomllib.loads(CONFIG.format(rpc=n3["rpc_file"])), "bench").with_overrides(data_dir=tmp)
    rt = await create_runtime(cfg, node=merchant)
    runner = make_runner(build_app(rt))
    await runner.setup()
    port = network.free_port()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}/api/joke"
    try:
        # 1. challenge minting
        raw_inv, gated = [], []
        async with aiohttp.ClientSession() as s:
            for i in range(n):
                t = time.perf_counter()
                await merchant.rpc.call("invoice", {"amount_msat": 10000, "label": f"raw-{os.getpid()}-{i}",
                                                    "description": "raw", "expiry": 600})
                raw_inv.append(time.perf_counter() - t)
                t = time.perf_counter()
                async with s.get(url, headers={"X-Forwarded-For": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"}) as r:
                    await r.read()
                    assert r.status == 402
                gated.append(time.perf_counter() - t)
        print(f"raw invoice           : {ms(raw_inv)}  (sequential)")
        print(f"sidecar 402 challenge : {ms(gated)}  (sequential, HTTP round trip included)")
        print(f"  ratio (latency)     : {statistics.mean(raw_inv) / statistics.mean(gated):.3f}x")
        # Minting throughput with 8 callers at once. The sidecar runs as its own process
        # (`micropay serve`, as deployed) and wrk drives it, so load generation does not
        # share the sidecar's interpreter; raw `invoice` gets 8 concurrent callers too.
        k = 8

        async def raw_worker(w: int) -> None:
            for i in range(n):
                await merchant.rpc.call("invoice", {"amount_msat": 10000, "label": f"rawc-{os.getpid()}-{w}-{i}",
                                                    "description": "raw", "expiry": 600})

        t = time.perf_counter()
        await asyncio.gather(*(raw_worker(w) for w in range(k)))
        raw_rate = k * n / (time.perf_counter() - t)
        gated_rate = serve_and_wrk(tmp, n3["rpc_file"], connections=k, seconds=5)
        print(f"raw invoice, {k} callers   : {raw_rate:7.1f} invoices/s")
        print(f"sidecar 402, {k} callers   : {gated_rate:7.1f} challenges/s  (micropay serve + wrk)")
        print(f"  ratio (throughput)  : {gated_rate / raw_rate:.3f}x  (goal >= 0.8x)")

        # 2. first paid request vs raw xpay, two hops
        raw_pay, flow = [], []
        client = L402Client(NodeWallet(payer), Budget(max_per_request_msat=20000, max_per_host_per_day_msat=None,
                                                      max_total_msat=None), TokenCache(None))
        for i in range(n):
            inv = await merchant.rpc.call("invoice", {"amount_msat": 10000, "label": f"rawpay-{os.getpid()}-{i}",
                                                      "description": "raw", "expiry": 600})
            t = time.perf_counter()
            await payer.rpc.call("xpay", {"invstring": inv["bolt11"]}, timeout_s=None)
            raw_pay.append(time.perf_counter() - t)
            t = time.perf_counter()
            res = await client.get(url)
            flow.append(time.perf_counter() - t)
            assert res.status == 200 and res.paid_msat == 10000
        overhead = statistics.mean(flow) - statistics.mean(raw_pay)
        print(f"raw xpay (2 hops)     : {ms(raw_pay)}")
        print(f"first paid request    : {ms(flow)}")
        print(f"  overhead            : {overhead * 1e3:7.2f} ms mean, "
              f"{(statistics.median(flow) - statistics.median(raw_pay)) * 1e3:7.2f} ms median  (goal <= 15 ms)")
    finally:
        await runner.cleanup()
        await payer.close()

    # 3. stream engine vs raw xkeysend (node 1's plugin pays `n` keysends in one interval),
    # in alternating rounds so that drift in the network's speed hits both alike
    rpc1 = LightningRpc(n1["rpc_file"])
    raw_total = engine_total = 0.0
    failures = 0
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            rpc1.call("xkeysend", {"destination": n3["id"], "amount_msat": 5000})
        raw_total += time.perf_counter() - t
        splits = [{"destination": n3["id"], "share": 1} for _ in range(n)]
        started = time.time()
        sid = rpc1.call("streampay-start", {"amount_msat": 5000 * n, "interval_s": 3600, "splits": splits,
                                            "max_fee_msat": 1000})["id"]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:       # poll slowly: the observer must not slow the engine
            st = rpc1.call("streampay-status", {"id": sid})
            if st["payments"] + st["failures"] >= n:
                break
            await asyncio.sleep(0.25)
        engine_total += st["last_paid_at"] - started    # the engine's own clock: start to last payment
        failures += st["failures"]
        rpc1.call("streampay-stop", {"id": sid})
    total = n * rounds
    print(f"raw xkeysend (2 hops) : {total} in {raw_total:.2f} s, {raw_total / total * 1e3:.2f} ms each")
    print(f"stream engine         : {total} in {engine_total:.2f} s, {engine_total / total * 1e3:.2f} ms each "
          f"({failures} failures)")
    print(f"  ratio (throughput)  : {raw_total / engine_total:.3f}x  (goal >= 0.9x)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--dir", default="/tmp/micropay-bench-net")
    a = ap.parse_args()
    root = Path(a.dir)
    state = network.up(root, 3, None)
    try:
        asyncio.run(bench(state, a.n, root / "sidecar"))
    finally:
        network.down(root)


if __name__ == "__main__":
    main()
