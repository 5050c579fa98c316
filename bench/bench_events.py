"""Settlement to "paid" event latency over SSE (goal < 50 ms), sandbox + SQLite.

    python bench/bench_events.py [--n 200]

Ours: a purchase is created through the API, a client listens on its SSE stream, the
payer node pays; measured from the moment the sandbox node reports the settlement to
the moment the client has parsed the purchase.paid event. In between: the settlement
watcher, the store transaction (status, receipt signature, event, outbox), the wake-up,
the store read and the write to the socket.
Baseline in the same run: a bare aiohttp SSE handler that writes an event the moment
an asyncio.Event is set, read by the same client code.
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


def summary(xs: list[float]) -> str:
    xs = sorted(xs)
    ms = lambda v: f"{v * 1000:.2f} ms"  # noqa: E731
    return (f"median {ms(statistics.median(xs))}, p99 {ms(xs[int(len(xs) * 0.99) - 1])}, "
            f"max {ms(xs[-1])}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    n = ap.parse_args().n
    base = await baseline(n)
    mine = await ours(n)
    print(f"baseline (bare aiohttp SSE push): {summary(base)}")
    print(f"micropay settlement -> SSE event:  {summary(mine)}")
    print(f"ratio of medians: {statistics.median(mine) / statistics.median(base):.1f}x; "
          f"events over 50 ms: {sum(x > 0.050 for x in mine)} of {n}")


if __name__ == "__main__":
    asyncio.run(main())
