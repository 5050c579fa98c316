"""Sidecar memory with 1,000 concurrent keep-alive connections (goal <= 100 MB RSS),
against a bare aiohttp server holding the same connections.

    python bench/bench_rss.py [--connections 1000]

Each connection makes one paid request (pass token) and then stays open, idle, in
the client's keep-alive pool while the server's RSS is read from /proc.
"""
from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp

from common import Target


async def hold(url: str, n: int, headers: dict[str, str]) -> int:
    conn = aiohttp.TCPConnector(limit=n, limit_per_host=n, keepalive_timeout=120)
    async with aiohttp.ClientSession(connector=conn) as s:
        barrier = asyncio.Barrier(n)

        async def one() -> int:
            async with s.get(url, headers=headers) as r:
                await r.read()
                status = r.status
            return status

        async def one_concurrent() -> int:
            await barrier.wait()   # make all n requests at once so n connections open
            return await one()

        statuses = await asyncio.gather(*(one_concurrent() for _ in range(n)))
        assert all(st == 200 for st in statuses), set(statuses)
        await asyncio.sleep(0.5)
        return len(conn._conns.get(next(iter(conn._conns)), [])) if conn._conns else 0


def measure(target: Target, path: str, n: int, headers: dict[str, str]) -> tuple[int, int, int]:
    before = target.rss_kib()
    rss: list[int] = []

    async def run() -> int:
        task = asyncio.create_task(hold(target.url + path, n, headers))
        idle = 0
        deadline = time.monotonic() + 60
        while not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            rss.append(target.rss_kib())
        idle = await task
        rss.append(target.rss_kib())
        return idle

    idle = asyncio.run(run())
    return before, max(rss), idle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=1000)
    n = ap.parse_args().connections
    bare, gated = Target("bare"), Target("gated")
    try:
        auth = {"Authorization": gated.buy_pass()}
        b0, b1, bidle = measure(bare, "/pass", n, {})
        g0, g1, gidle = measure(gated, "/pass", n, auth)
    finally:
        bare.stop()
        gated.stop()
    print(f"bare aiohttp : {b0 / 1024:6.1f} MB idle -> {b1 / 1024:6.1f} MB peak with {n} connections "
          f"({bidle} kept alive)")
    print(f"sidecar      : {g0 / 1024:6.1f} MB idle -> {g1 / 1024:6.1f} MB peak with {n} connections "
          f"({gidle} kept alive)  (goal <= 100 MB)")
    print(f"ratio sidecar/bare peak RSS: {g1 / b1:5.2f}x")


if __name__ == "__main__":
    main()
