"""Settlement to "paid" event latency over SSE (goal < 50 ms), sandbox + SQLite.

    python bench/bench_events.py [--n 200] [--listeners 3000]

Ours: a purchase is created through the API, a client listens on its SSE stream, the
payer node pays; measured from the moment the sandbox node reports the settlement to
the moment the client has parsed the purchase.paid event. In between: the settlement
watcher, the store transaction (status, receipt signature, event, outbox), the wake-up,
the store read and the write to the socket.
Baseline in the same run: a bare aiohttp SSE handler that writes an event the moment
an asyncio.Event is set, read by the same client code.

With --listeners L: L app-wide SSE listeners are connected, 5 purchases are paid one
after another, and the time until every listener has all 5 events is measured, against
a bare aiohttp handler that pushes 5 events to L listeners from memory.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

import sys
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.games_util import start_game_sidecar  # noqa: E402
from tests.conftest import serve_app  # noqa: E402


async def first_event(resp) -> float:
    async for raw in resp.content:
        if raw.startswith(b"data: "):
            return time.perf_counter()
    raise RuntimeError("stream ended")


async def baseline(n: int) -> list[float]:
    trigger: dict[str, asyncio.Event] = {}

    async def handler(request):
        ev = trigger[request.match_info["k"]] = asyncio.Event()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await ev.wait()
        await resp.write(b'id: 1\nevent: purchase.paid\ndata: {"id":1}\n\n')
        return resp
    app = web.Application()
    app.router.add_get("/e/{k}", handler)
    runner, url = await serve_app(app)
    out = []
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            async with s.get(f"{url}/e/{i}") as resp:
                reader = asyncio.create_task(first_event(resp))
                while str(i) not in trigger:
                    await asyncio.sleep(0.001)
                t0 = time.perf_counter()
                trigger[str(i)].set()
                out.append(await reader - t0)
    await runner.cleanup()
    return out


async def ours(n: int) -> list[float]:
    gs = await start_game_sidecar(Path(tempfile.mkdtemp(prefix="micropay-bench-")))
    reported: dict[str, float] = {}
    node = gs.rt.node
    orig = node._settle

    def settle(state):            # the moment the node reports the settlement
        reported[state.invoice.payment_hash] = time.perf_counter()
        orig(state)
    node._settle = settle
    out = []
    async with aiohttp.ClientSession() as s:
        for i in range(n):
            p = await gs.buy(player=f"p{i % 50}", key=f"bench-{i}")
            async with s.get(f"{gs.url}/v1/purchases/{p['id']}/events", headers=gs.auth()) as resp:
                reader = asyncio.create_task(first_event(resp))
                await asyncio.sleep(0.005)
                await gs.payer.pay(p["invoice"])
                out.append(await reader - reported[p["payment_hash"]])
    await gs.close()
    return out


async def count_events(resp, k: int) -> None:
    seen = 0
    async for raw in resp.content:
        if raw.startswith(b"data: "):
            seen += 1
            if seen == k:
                return


async def fanout_baseline(listeners: int, k: int = 5) -> float:
    waiting: list[asyncio.Queue] = []

    async def handler(request):
        q: asyncio.Queue = asyncio.Queue()
        waiting.append(q)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(k):
            await resp.write(await q.get())
        return resp
    app = web.Application()
    app.router.add_get("/e", handler)
    runner, url = await serve_app(app)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        streams = [await s.get(f"{url}/e") for _ in range(listeners)]
        readers = [asyncio.create_task(count_events(r, k)) for r in streams]
        while len(waiting) < listeners:
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        for i in range(k):
            for q in waiting:
                q.put_nowait(f'id: {i}\nevent: purchase.paid\ndata: {{"id":{i}}}\n\n'.encode())
        await asyncio.gather(*readers)
        elapsed = time.perf_counter() - t0
        for r in streams:
            r.close()
    await runner.cleanup()
    return elapsed


async def fanout_ours(listeners: int, k: int = 5) -> float:
    from tests.games_util import GAMES_TOML
    toml = GAMES_TOML + f"\n[events]\nmax_streams = {listeners}\nmax_streams_per_credential = {listeners}\n"
    gs = await start_game_sidecar(Path(tempfile.mkdtemp(prefix="micropay-bench-")), toml)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        streams = [await s.get(f"{gs.url}/v1/events", headers=gs.auth()) for _ in range(listeners)]
        readers = [asyncio.create_task(count_events(r, k)) for r in streams]
        await asyncio.sleep(0.5)
        purchases = [await gs.buy(player=f"p{i}", key=f"fan-{i}") for i in range(k)]
        t0 = time.perf_counter()
        for p in purchases:
            await gs.payer.pay(p["invoice"])
        await asyncio.gather(*readers)
        elapsed = time.perf_counter() - t0
        for r in streams:
            r.close()
    await gs.close()
    return elapsed


def summary(xs: list[float]) -> str:
    xs = sorted(xs)
    ms = lambda v: f"{v * 1000:.2f} ms"  # noqa: E731
    return (f"median {ms(statistics.median(xs))}, p99 {ms(xs[int(len(xs) * 0.99) - 1])}, "
            f"max {ms(xs[-1])}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--listeners", type=int, default=0)
    args = ap.parse_args()
    n = args.n
    if args.listeners:
        base = await fanout_baseline(args.listeners)
        mine = await fanout_ours(args.listeners)
        print(f"baseline (bare aiohttp, 5 events from memory to {args.listeners} listeners): {base:.3f} s")
        print(f"micropay (5 purchases paid, every listener has all 5 events):     {mine:.3f} s")
        print(f"ratio: {mine / base:.2f}x")
        return
    base = await baseline(n)
    mine = await ours(n)
    print(f"baseline (bare aiohttp SSE push): {summary(base)}")
    print(f"micropay settlement -> SSE event:  {summary(mine)}")
    print(f"ratio of medians: {statistics.median(mine) / statistics.median(base):.1f}x; "
          f"events over 50 ms: {sum(x > 0.050 for x in mine)} of {n}")


if __name__ == "__main__":
    asyncio.run(main())
