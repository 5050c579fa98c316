"""Fleet mode against single-host mode on a real regtest network, in one run.

    python bench/bench_fleet.py [--seconds 2] [--depth 20000] [--dir /tmp/micropay-bench-fleet]

Starts bitcoind, a payer node and two merchant nodes (Core Lightning v26.06 with the
micropay plugin; the merchants run the fleet agent against a fresh PostgreSQL schema,
$MICROPAY_BENCH_PG, default postgresql://postgres@127.0.0.1:5432/test), with a channel
from the payer to each merchant so that both can receive. Then, with wrk on fresh
clients (every 402 a new invoice):

1. the node-bound baseline: `micropay serve --backend cln` on merchant 1 (single host,
   every 402 waits on the node's `invoice`), 402s a second and latency p50/p99, and
   raw `invoice` a second from 8 concurrent callers;
2. the agent's refill rate: how fast merchant 1's agent fills a pool of --depth
   invoices, against raw `invoice`;
3. fleet mode, one node: one and two `micropay serve` processes (kind "fleet") claiming
   from the pool, 402s a second as a ratio to 1., and p50/p99 (the burst absorbed);
   then a sidecar with pool_depth 0 selling a price no pool holds (a description of its
   own), so that every 402 is asked of the agent on demand (the 402 latency without a
   pool);
4. fleet mode, two nodes: merchant 2's agent pools too; one sidecar, then two; 402s a
   second;
5. paid requests (a pass token bought over Lightning, then repeated): single host, and
   fleet with 1 node and 1 sidecar, 2 nodes and 1 sidecar, 2 nodes and 2 sidecars,
   requests a second (a paid request never touches a node in either mode).

Only 127.0.0.1. The machine's two cores are shared by everything here, so the absolute
figures are low; the ratios are what to compare. Goal: 402s from the pool at >= 20x the
node-bound rate.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "contrib" / "regtest"))
sys.path.insert(0, str(HERE))

import network  # noqa: E402
from common import script, wrk_stats  # noqa: E402

PG = os.environ.get("MICROPAY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
ROUTES = """
service = "fleetbench"
demo = true
trust_forwarded_for = true
data_dir = "{data}"
[challenges]
per_client_per_minute = 100000
max_pending = 10000000
max_pending_per_client = 100000
[[routes]]
method = "GET"
path = "/api/joke"
price_msat = 10000
description = "joke"
[[routes]]
method = "GET"
path = "/api/echo"
price_msat = 10000
pass_s = 86400
description = "echo"
"""


SCHEMA: list[str] = []          # the run's schema, once made


def pg(sql: str, *args):
    import asyncpg

    async def run():
        settings = {"search_path": SCHEMA[0]} if SCHEMA else None
        conn = await asyncpg.connect(PG, timeout=5, server_settings=settings)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()
    return asyncio.run(run())


class Sidecar:
    def __init__(self, root: Path, name: str, backend: str, store: str | None, routes: str = ROUTES) -> None:
        self.port = network.free_port()
        cfg = root / f"{name}.toml"
        text = routes.format(data=root / "sidecar-data") + backend
        if store:
            text += f'[store]\nurl = "{store}"\n'
        cfg.write_text(text)
        self.log = open(root / f"{name}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "micropay.cli", "serve", "--config", str(cfg),
                                      "--listen", f"127.0.0.1:{self.port}"], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        network.wait(self._up, f"sidecar {name}", 60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"sidecar exited; see {self.log.name}")
        try:
            urllib.request.urlopen(self.url + "/healthz", timeout=1).read()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def burst(urls: list[str], seconds: int, connections: int = 16) -> dict:
    """wrk on each url at once (fresh clients): summed rate, worst p50/p99, non-2xx."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(urls)) as pool:
        runs = list(pool.map(lambda u: wrk_stats(u + "/api/joke", seconds, connections, script=script("/api/joke")),
                             urls))
    return {"rate": sum(r["rate"] for r in runs), "total": sum(r["total"] for r in runs),
            "p50_ms": max(r["p50_ms"] or 0 for r in runs), "p99_ms": max(r["p99_ms"] or 0 for r in runs)}


def asks(description: str = "joke") -> int:
    return int(pg("SELECT COUNT(*) FROM micropay_fleet_asks WHERE description = $1", description)[0][0])


def pool_burst(urls: list[str], seconds: int) -> dict:
    """burst() on sidecars that sell from the pool, with what says whether the pool held
    out: the asks the sidecars made meanwhile (a 402 the pool could not serve is asked of
    the agent, at the agent's rate). The rate is "from the pool" only when that is 0."""
    before = asks()
    run = burst(urls, seconds)
    run["asked"] = asks() - before
    return run


def provenance(run: dict, node_id: str | None) -> str:
    left = ready(node_id)
    if run["asked"] == 0:
        return f"all {run['total']} from the pool; {left} left in it"
    return (f"the pool ran dry: {run['asked']} of {run['total']} asked of the agent, so the rate is partly "
            f"the agent's; raise --depth")


def ready(node_id: str | None = None) -> int:
    q = "SELECT COUNT(*) FROM micropay_fleet_invoices WHERE claim_label IS NULL AND expires_at > $1"
    args = [int(time.time())]
    if node_id:
        q += " AND node_id = $2"
        args.append(node_id)
    return int(pg(q, *args)[0][0])


def fill(node_id: str | None, depth: int, timeout: float = 600) -> float:
    """Wait until the pool holds `depth` ready invoices (of one node, or in all); returns
    the invoices a second it took the agents to get there."""
    start, t0 = ready(node_id), time.monotonic()
    network.wait(lambda: ready(node_id) >= depth, f"the pool to reach {depth}", timeout)
    return (ready(node_id) - start) / (time.monotonic() - t0)


async def raw_invoice_rate(rpc_file: str, n: int = 100, k: int = 8) -> float:
    from micropay.lightning.cln import ClnNode
    node = ClnNode(rpc_file)
    await node.connect()
    try:
        async def worker(w: int) -> None:
            for i in range(n):
                await node.rpc.call("invoice", {"amount_msat": 10000, "label": f"raw-{uuid.uuid4().hex}",
                                                "description": "raw", "expiry": 600})
        t = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(k)))
        return k * n / (time.perf_counter() - t)
    finally:
        await node.close()


async def incoming_rate(payer, merchant, n: int, k: int = 8) -> float:
    """n invoices of `merchant` paid by `payer` with k xpay calls at once: settled a second."""
    from micropay.lightning.cln import ClnNode
    invoices = [merchant.rpc.invoice(1000, f"htlc-{uuid.uuid4().hex}", "htlc")["bolt11"] for _ in range(n)]
    node = ClnNode(str(payer.rpc_file))
    await node.connect()
    try:
        queue = list(invoices)

        async def worker() -> None:
            while queue:
                await node.rpc.call("xpay", {"invstring": queue.pop()})
        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(k)))
        return n / (time.perf_counter() - t)
    finally:
        await node.close()


def pass_token(payer, url: str) -> str:
    """Buy a pass token for /api/echo from the payer node (a real Lightning payment)."""
    from micropay.l402.wire import format_authorization, parse_challenges
    try:
        urllib.request.urlopen(url + "/api/echo")
        raise RuntimeError("no 402")
    except urllib.error.HTTPError as e:
        ch = parse_challenges(e.headers.get_all("WWW-Authenticate"))[0]
    paid = payer.rpc.call("xpay", {"invstring": ch.invoice})
    return format_authorization(ch.macaroon, paid["payment_preimage"])


def paid_rate(url: str, auth: str, seconds: int) -> float:
    from common import wrk
    return wrk(url + "/api/echo", seconds, 16, headers={"Authorization": auth})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--depth", type=int, default=20000,
                    help="pool depth per node for the burst runs: enough for --seconds of 402s from the pool "
                         "(the run says whether it held out)")
    ap.add_argument("--dir", default="/tmp/micropay-bench-fleet")
    a = ap.parse_args()
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    schema = f"mp_fleetbench_{uuid.uuid4().hex[:8]}"
    SCHEMA.append(schema)
    store = f"{PG}{'&' if '?' in PG else '?'}schema={schema}"
    agent = {"micropay-fleet-store": store, "micropay-fleet-pool-per-round": "10000"}
    sidecars: list[Sidecar] = []
    out: list[str] = []

    def say(line: str) -> None:
        out.append(line)
        print(line, flush=True)
    try:
        btc = network.Bitcoind(root)
        payer = network.Node(root, 1, btc, None, with_plugin=False)
        m1 = network.Node(root, 2, btc, None, options=agent)
        for node in (payer,):
            addr = node.rpc.newaddr("bech32")
            btc.cli("sendtoaddress", addr.get("bech32") or addr["p2tr"], str(network.FUND_SAT * 2 / 1e8))
        btc.mine(1)
        network.wait(lambda: payer.rpc.listfunds()["outputs"], "funds")
        payer.rpc.connect(m1.id, "127.0.0.1", m1.port)
        payer.rpc.fundchannel(m1.id, network.CHANNEL_SAT)
        btc.mine(6)
        network.wait(lambda: all(c["state"] == "CHANNELD_NORMAL" for c in payer.rpc.listpeerchannels()["channels"]),
                     "the channel")

        # 1. node-bound baseline (single host, --backend cln)
        raw = asyncio.run(raw_invoice_rate(str(m1.rpc_file)))
        single = Sidecar(root, "single", f'[backend]\nkind = "cln"\nrpc_file = "{m1.rpc_file}"\n', None)
        sidecars.append(single)
        base = burst([single.url], a.seconds)
        say(f"raw `invoice`, 8 callers             : {raw:8.0f} invoices/s")
        say(f"single host (cln), 402s              : {base['rate']:8.0f} /s   p50 {base['p50_ms']:6.1f} ms  "
                   f"p99 {base['p99_ms']:6.1f} ms   (the node-bound rate)")

        # 2. refill rate of one agent
        fleet_backend = ('[backend]\nkind = "fleet"\nnetwork = "regtest"\nheartbeat_timeout_s = 15\n'
                         f'pool_depth = {a.depth}\nask_timeout_s = 5\n')
        f1 = Sidecar(root, "fleet1", fleet_backend, store)
        sidecars.append(f1)
        for _ in range(2):                          # a price is wanted from its second miss on
            try:
                urllib.request.urlopen(f1.url + "/api/joke")
            except urllib.error.HTTPError:
                pass
        refill = fill(m1.id, a.depth)
        say(f"agent refill, one node               : {refill:8.0f} invoices/s   ratio {refill / raw:.2f}x raw "
                   "`invoice`")

        # 3. fleet, one node: one sidecar, then two
        one = pool_burst([f1.url], a.seconds)
        say(f"fleet, 1 node, 1 sidecar, 402s       : {one['rate']:8.0f} /s   p50 {one['p50_ms']:6.1f} ms  "
                   f"p99 {one['p99_ms']:6.1f} ms   ratio {one['rate'] / base['rate']:.1f}x single host  "
                   f"({provenance(one, m1.id)})")
        fill(m1.id, a.depth)
        f2 = Sidecar(root, "fleet2", fleet_backend, store)
        sidecars.append(f2)
        two = pool_burst([f1.url, f2.url], a.seconds)
        say(f"fleet, 1 node, 2 sidecars, 402s      : {two['rate']:8.0f} /s   p50 {two['p50_ms']:6.1f} ms  "
                   f"p99 {two['p99_ms']:6.1f} ms   ratio {two['rate'] / base['rate']:.1f}x single host  "
                   f"({provenance(two, m1.id)})")
        f2.stop()
        sidecars.remove(f2)
        fill(m1.id, a.depth)                        # the agent is not refilling meanwhile
        # without a pool: a description of its own, so no pool holds its price (pool_depth 0
        # alone would still take from the pool fleet1 keeps for the same price), and every
        # 402 is an invoice asked of the agent on demand
        nopool = Sidecar(root, "nopool", fleet_backend.replace(f"pool_depth = {a.depth}", "pool_depth = 0"), store,
                         routes=ROUTES.replace('description = "joke"', 'description = "joke, asked for"'))
        sidecars.append(nopool)
        asked = burst([nopool.url], a.seconds)
        pooled = pg("SELECT COUNT(*) FROM micropay_fleet_invoices WHERE description = $1", "joke, asked for")[0][0]
        answered = pg("SELECT COUNT(*) FROM micropay_fleet_asks WHERE description = $1 AND answered_ms IS NOT NULL",
                      "joke, asked for")[0][0]
        say(f"fleet, 1 node, no pool (asks), 402s  : {asked['rate']:8.0f} /s   p50 {asked['p50_ms']:6.1f} ms  "
                   f"p99 {asked['p99_ms']:6.1f} ms   ratio {asked['rate'] / base['rate']:.1f}x single host  "
                   f"({answered} asks answered; {pooled - answered} invoices from a pool)")
        nopool.stop()
        sidecars.remove(nopool)
        fleet_paid_one = paid_rate(f1.url, pass_token(payer, f1.url), a.seconds)

        # 4. a second node
        m2 = network.Node(root, 3, btc, None, options=agent)
        payer.rpc.connect(m2.id, "127.0.0.1", m2.port)
        payer.rpc.fundchannel(m2.id, network.CHANNEL_SAT)
        btc.mine(6)
        network.wait(lambda: all(c["state"] == "CHANNELD_NORMAL" for c in payer.rpc.listpeerchannels()["channels"]),
                     "the second channel")
        both = fill(None, 2 * a.depth)
        say(f"agent refill, two nodes              : {both:8.0f} invoices/s   ratio {both / raw:.2f}x raw "
                   "`invoice` of one node")
        one_two = pool_burst([f1.url], a.seconds)
        say(f"fleet, 2 nodes, 1 sidecar, 402s      : {one_two['rate']:8.0f} /s   p50 {one_two['p50_ms']:6.1f} ms  "
                   f"p99 {one_two['p99_ms']:6.1f} ms   ratio {one_two['rate'] / base['rate']:.1f}x single host  "
                   f"({provenance(one_two, None)})")
        fill(None, 2 * a.depth)
        f2 = Sidecar(root, "fleet2b", fleet_backend, store)
        sidecars.append(f2)
        two_nodes = pool_burst([f1.url, f2.url], a.seconds)
        nodes_seen = pg("SELECT COUNT(DISTINCT node_id) FROM micropay_fleet_invoices WHERE claim_label IS NOT NULL")
        say(f"fleet, 2 nodes, 2 sidecars, 402s     : {two_nodes['rate']:8.0f} /s   p50 "
                   f"{two_nodes['p50_ms']:6.1f} ms  p99 {two_nodes['p99_ms']:6.1f} ms   ratio "
                   f"{two_nodes['rate'] / base['rate']:.1f}x single host  ({nodes_seen[0][0]} nodes' invoices claimed; "
                   f"{provenance(two_nodes, None)})")

        # 5. paid requests (pass token, repeated): they touch no node, so the nodes' count
        # should not matter; one sidecar process and two
        single_paid = paid_rate(single.url, pass_token(payer, single.url), a.seconds)
        fleet_paid = paid_rate(f1.url, pass_token(payer, f1.url), a.seconds)
        auths = [(u, pass_token(payer, u)) for u in (f1.url, f2.url)]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2) as both_paid:
            fleet_paid_two = sum(both_paid.map(lambda ua: paid_rate(ua[0], ua[1], a.seconds), auths))
        say(f"paid requests, single host           : {single_paid:8.0f} /s")
        say(f"paid requests, fleet, 1 node, 1 sidecar  : {fleet_paid_one:8.0f} /s   ratio "
            f"{fleet_paid_one / single_paid:.2f}x")
        say(f"paid requests, fleet, 2 nodes, 1 sidecar : {fleet_paid:8.0f} /s   ratio {fleet_paid / single_paid:.2f}x")
        say(f"paid requests, fleet, 2 nodes, 2 sidecars: {fleet_paid_two:8.0f} /s   ratio "
            f"{fleet_paid_two / single_paid:.2f}x")
        # 6. incoming payments a node settles a second (the HTLC rate the capacity model needs)
        htlc_rate = asyncio.run(incoming_rate(payer, m1, 200))
        say(f"incoming payments settled, one node  : {htlc_rate:8.1f} /s   (8 payers' xpay at once, one hop)")
        held = [r for r in (one, two, one_two, two_nodes) if r["asked"] == 0]
        best = max((r["rate"] for r in held), default=0.0)
        say(f"goal: 402s from the pool >= 20x the node-bound rate: {best / base['rate']:.1f}x at best of the runs "
            f"the pool held out for ({len(held)} of 4)")
    finally:
        for s in sidecars:
            s.stop()
        for proc in network.STARTED:
            if proc.poll() is None:
                proc.terminate()
        for proc in network.STARTED:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            pg(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        except Exception as exc:      # noqa: BLE001
            print(f"(could not drop schema {schema}: {exc})")
    print(json.dumps({"seconds": a.seconds, "depth": a.depth, "lines": len(out)}))


if __name__ == "__main__":
    main()
