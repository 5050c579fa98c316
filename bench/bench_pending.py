"""What the gate's once-a-second read of unpaid challenges costs, as the number of
clients holding one grows: the read of every client (what a gate did before, the
baseline) against the read of the clients near their bound (seller/challenger.py,
PendingCounts, with the default limits' floor of 18), in the same run, on the same rows.

    python bench/bench_pending.py [--clients 10000 100000] [--reads 5] [--store URL]

Two cases per size, each in a store holding only its own rows (the bench refuses a
store that holds challenges already, and deletes its rows when done):
- few near: one unpaid challenge per client, and 20 clients holding 25 (near their
  bound of 50): the usual case, 20 clients named;
- all near: the same number of unpaid challenges, held 18 each by clients/18 clients,
  every one at the floor: the most a read can name.
Each read goes through the store's own repository call, as the gate makes it; the
two reads alternate in order. Three figures per read:
- loop: CPU of the event loop's thread (time.thread_time), what every 402 waits behind.
  On SQLite the worker thread builds the rows while holding the GIL, which this does
  not count, so the baseline's loop figure is understated;
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


def records(clients: int, each: int = 1) -> list[ChallengeRecord]:
    """`each` unpaid challenges for each of clients / each clients, and HEAVY clients
    holding HEAVY_HOLDS each."""
    out = []
    owners = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(clients // each) for _ in range(each)]
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


async def one_case(url: str | None, clients: int, reads: int, each: int) -> None:
    tmp = None
    if url is None:
        tmp = tempfile.mkdtemp(prefix="micropay-bench-pending-")
        url = f"sqlite:///{tmp}/store.sqlite3"
    store = open_store_from_url(url)
    await store.open()
    try:
        repo = L402Repository(store)
        held = await store.fetchrow("SELECT COUNT(*) FROM micropay_challenges")
        if held and held[0]:
            raise SystemExit(f"this store holds {held[0]} challenges already: give the bench a store of its "
                             "own (a fresh SQLite file, the default, or PostgreSQL with ?schema=bench_pending)")
        rows = records(clients, each)
        for start in range(0, len(rows), 2000):
            await repo.add_challenges(rows[start:start + 2000])
        floor = read_floor(ChallengeLimits())
        every: dict[str, list] = {"all": [], "near": []}
        calls = {"all": lambda: repo.pending_by_client(NOW), "near": lambda: repo.pending_near_bound(NOW, floor)}
        for k in range(reads):          # alternating which goes first, so caches and drift favour neither
            for key in (("all", "near") if k % 2 == 0 else ("near", "all")):
                every[key].append(await timed(calls[key]))
        full = await repo.pending_by_client(NOW)
        total, near = await repo.pending_near_bound(NOW, floor)
        named = HEAVY + (clients // each if each >= floor else 0)
        assert total == sum(full.values()) == len(rows) and len(near) == named, (total, len(near))
        med = {k: tuple(statistics.median(r[i] for r in v) for i in range(3)) for k, v in every.items()}
        print(f"{len(full):>8} clients holding {len(rows):>8} unpaid challenges, {len(near)} of them near their "
              f"bound (median of {reads} reads)")
        for key, name in (("all", "every client (baseline)"), ("near", f"clients holding >= {floor}")):
            loop, proc, wall = med[key]
            ratio = loop / med["all"][0]
            print(f"  {name:26}: loop {loop:8.2f} ms  ratio {ratio:5.3f}x   process {proc:8.2f} ms   "
                  f"wall {wall:8.2f} ms   ({len(full) if key == 'all' else len(near)} clients back)")
    finally:
        await store.execute("DELETE FROM micropay_challenges")    # only the bench's own rows (checked above)
        await store.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


async def main(sizes: list[int], reads: int, url: str | None) -> None:
    floor = read_floor(ChallengeLimits())
    for clients in sizes:
        await one_case(url, clients, reads, 1)
        await one_case(url, clients, reads, floor)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--reads", type=int, default=5)
    ap.add_argument("--store", default=None, help="store URL (default: a fresh SQLite file)")
    a = ap.parse_args()
    asyncio.run(main(a.clients, a.reads, a.store))
