"""What the gate's once-a-second read of unpaid challenges costs, as the number of
clients holding one grows: the read of every client (what a gate did before, the
baseline) against the read of the clients near their bound (seller/challenger.py,
PendingCounts, with the default limits' floor of 18), in the same run, on the same rows.

    python bench/bench_pending.py [--clients 10000 100000] [--reads 5] [--store URL]

Each size fills a fresh store with one unpaid challenge per client, plus 20 clients
holding 25 (near their bound of 50), and times the read through the store's own
repository call, as the gate makes it. Three figures per read:
- loop: CPU of the event loop's thread (time.thread_time), what every 402 waits behind;
- process: CPU of the whole process (on SQLite this includes the store's worker thread,
  which runs the statement; PostgreSQL's own CPU is not counted);
- wall: how long the read takes to come back.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time

from micropay.seller.challenger import read_floor
from micropay.seller.config import ChallengeLimits
from micropay.store import open_store_from_url
from micropay.store.l402 import ChallengeRecord, L402Repository

NOW = 1_800_000_000
HEAVY, HEAVY_HOLDS = 20, 25


def records(clients: int) -> list[ChallengeRecord]:
    """One unpaid challenge per client, and HEAVY clients holding HEAVY_HOLDS each."""
    out = []
    owners = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(clients)]
    owners += [f"192.0.2.{k}" for k in range(HEAVY) for _ in range(HEAVY_HOLDS)]
    for n, client in enumerate(owners):
        h = os.urandom(32).hex()
        out.append(ChallengeRecord(h, os.urandom(16).hex(), "GET /api", client, 1000, "lnbcrt10n1" + h,
                                   "m" * 200, NOW - 10, NOW + 600, 1))
    return out


async def timed(call) -> tuple[float, float, float]:
    loop0, proc0, wall0 = time.thread_time(), time.process_time(), time.perf_counter()
    await call()
    return (time.thread_time() - loop0) * 1e3, (time.process_time() - proc0) * 1e3, (time.perf_counter() - wall0) * 1e3


async def one_size(url: str | None, clients: int, reads: int) -> None:
    tmp = None
    if url is None:
        tmp = tempfile.mkdtemp(prefix="micropay-bench-pending-")
        url = f"sqlite:///{tmp}/store.sqlite3"
    store = open_store_from_url(url)
    await store.open()
    try:
        repo = L402Repository(store)
        await store.execute("DELETE FROM micropay_challenges")
        rows = records(clients)
        for start in range(0, len(rows), 2000):
            await repo.add_challenges(rows[start:start + 2000])
        floor = read_floor(ChallengeLimits())
        every = {"all": [], "near": []}
        for _ in range(reads):          # alternating, so drift hits both alike
            every["all"].append(await timed(lambda: repo.pending_by_client(NOW)))
            every["near"].append(await timed(lambda: repo.pending_near_bound(NOW, floor)))
        full = await repo.pending_by_client(NOW)
        total, near = await repo.pending_near_bound(NOW, floor)
        assert total == sum(full.values()) == len(rows) and len(near) == HEAVY, (total, len(near))
        med = {k: tuple(statistics.median(r[i] for r in v) for i in range(3)) for k, v in every.items()}
        print(f"{clients + HEAVY:>8} clients holding {len(rows):>8} unpaid challenges (median of {reads} reads)")
        for key, name in (("all", "every client (baseline)"), ("near", f"clients holding >= {floor}")):
            loop, proc, wall = med[key]
            ratio = loop / med["all"][0]
            print(f"  {name:26}: loop {loop:8.2f} ms  ratio {ratio:5.3f}x   process {proc:8.2f} ms   "
                  f"wall {wall:8.2f} ms   ({len(full) if key == 'all' else len(near)} clients back)")
    finally:
        await store.execute("DELETE FROM micropay_challenges")    # a PostgreSQL store is kept
        await store.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


async def main(sizes: list[int], reads: int, url: str | None) -> None:
    for clients in sizes:
        await one_size(url, clients, reads)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--reads", type=int, default=5)
    ap.add_argument("--store", default=None, help="store URL (default: a fresh SQLite file)")
    a = ap.parse_args()
    asyncio.run(main(a.clients, a.reads, a.store))
