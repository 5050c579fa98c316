"""Claims a second that one PostgreSQL server gives fleet sidecars (the store side of a
402 from the pool), against the same number of trivial statements (`SELECT 1`) in the
same run, from 1 and 2 processes with 8 concurrent claimers each.

    python bench/bench_claims.py [--n 20000]

PostgreSQL: $MICROPAY_BENCH_PG (default postgresql://postgres@127.0.0.1:5432/test), in
a schema of its own, dropped afterwards. The pool holds --n invoices of two live nodes;
every claim binds one to a new label (FOR UPDATE SKIP LOCKED), as a fleet sidecar's 402
does. The server shares this machine's two cores with the claimers.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

PG = os.environ.get("MICROPAY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")

WORKER = textwrap.dedent("""
    import asyncio, json, sys, time
    from micropay.store import open_store_from_url
    from micropay.store.fleet import FLEET_SCHEMA, FleetRepository
    async def main(url, who, per, mode):
        store = open_store_from_url(url, (FLEET_SCHEMA,))
        await store.open()
        repo = FleetRepository(store)
        now_ms = int(time.time() * 1000)
        async def worker(w):
            for i in range(per):
                if mode == "select":
                    await store.fetchrow("SELECT 1")
                else:
                    assert await repo.claim(f"micropay-{who}-{w}-{i}", 1000, "bench", now_ms=now_ms,
                                            payable_after=now_ms // 1000 + 60, fresh_since_ms=now_ms - 60_000)
        t = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(8)))
        print(json.dumps(time.perf_counter() - t))
        await store.close()
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
""")


async def prepare(url: str, n: int) -> None:
    from micropay.store import open_store_from_url
    from micropay.store.fleet import FLEET_SCHEMA, FleetRepository, NodeBeat
    store = open_store_from_url(url, (FLEET_SCHEMA,))
    await store.open()
    repo = FleetRepository(store)
    far = int((time.time() + 3600) * 1000)
    for node in ("02" + "aa" * 32, "02" + "bb" * 32):
        await repo.heartbeat(NodeBeat(node, "regtest", far, 10**15, 10**15))
    await store.execute("DELETE FROM micropay_fleet_invoices")
    rows = []
    for i in range(n):
        h = hashlib.sha256(f"{uuid.uuid4()}".encode()).hexdigest()
        node = "02" + ("aa" if i % 2 else "bb") * 32
        rows.append(f"('{h}','{node}','micropay-fleet-{h[:24]}',1000,'bench','lnbcrt1',{int(time.time()) + 86400},0)")
    for k in range(0, n, 2000):
        await store.execute("INSERT INTO micropay_fleet_invoices (payment_hash, node_id, node_label, amount_msat, "
                            "description, bolt11, expires_at, created_ms) VALUES " + ",".join(rows[k:k + 2000]))
    await store.close()


async def drop(schema: str) -> None:
    import asyncpg
    conn = await asyncpg.connect(PG)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await conn.close()


def run(url: str, procs: int, per: int, mode: str) -> float:
    ps = [subprocess.Popen([sys.executable, "-c", WORKER, url, f"p{k}", str(per), mode], stdout=subprocess.PIPE,
                           text=True) for k in range(procs)]
    times = [json.loads(p.communicate(timeout=600)[0]) for p in ps]
    return procs * 8 * per / max(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    a = ap.parse_args()
    schema = f"mp_claims_{uuid.uuid4().hex[:8]}"
    url = f"{PG}{'&' if '?' in PG else '?'}schema={schema}"
    try:
        for procs in (1, 2):
            asyncio.run(prepare(url, a.n))
            per = a.n // (8 * procs)
            sel = run(url, procs, per, "select")
            claims = run(url, procs, per, "claim")
            print(f"{procs} process(es) x 8 claimers: {claims:7.0f} claims/s   SELECT 1: {sel:7.0f}/s   "
                  f"ratio {claims / sel:.2f}x")
    finally:
        asyncio.run(drop(schema))


if __name__ == "__main__":
    main()
