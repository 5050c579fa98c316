"""Benchmark target: the same tiny handler, bare or behind the micropay gate.

    python bench/_server.py --mode bare|gated|stub|fleet --port P [--data-dir D] [--store URL]
                            [--loop asyncio|uvloop]

`stub`: gated, on a node that hands back a ready-made invoice at once (no signing, no
I/O), so a 402's figure is the gate's own cost: admission, token, record, response.
`fleet`: gated in fleet mode (`[backend] kind = "fleet"`) on the store at --store
(default SQLite in the data dir), whose pool for /mint's price is filled beforehand with
--pool ready-made invoices of one node whose heartbeat stays fresh: each 402 is a claim
from the pool, the figure a fleet sidecar costs per 402 while its pool holds out.
`--loop uvloop` (the benches pass $MICROPAY_BENCH_LOOP): the same target on uvloop, if
installed (it is not a dependency), to compare event loops in one run.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import tomllib
from pathlib import Path

from aiohttp import web

BENCH_CONFIG = """
service = "bench"
demo = true
[challenges]
per_client_per_minute = 100000
max_pending = 10000000
max_pending_per_client = 100000
[[routes]]
method = "GET"
path = "/pass"
price_msat = 1000
pass_s = 86400
[[routes]]
method = "GET"
path = "/mint"
price_msat = 1000
[[routes]]
method = "GET"
path = "/sess"
price_msat = 1000
[routes.session]
deposit_units = 1000000
[[routes]]
method = "GET"
path = "/sse"
price_msat = 1000
[routes.session]
deposit_units = 1000000
"""
SSE_EVENTS = 2000      # events per /sse response
EVENT = b'data: {"token":"lorem"}\n\n'


async def sse(request: web.Request) -> web.StreamResponse:
    """A streamed response of SSE_EVENTS events; on a session route, each event is a unit
    (the handler charges the session before writing it, as the proxy does)."""
    from micropay.sidecar.session_gate import SESSION_METER
    meter = request.get(SESSION_METER)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for _ in range(SSE_EVENTS):
        if meter is not None and not await meter.charge(resp):
            break
        await resp.write(EVENT)
    await resp.write_eof()
    return resp


async def payload(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "n": 42})


class StubNode:
    """A node whose invoices cost nothing to make: the same BOLT11 text every time (the
    gate never parses it), a fresh payment hash each time."""

    network = "regtest"
    pays_offers = False
    cursor_namespace = "stub"
    BOLT11 = "lnbcrt10n1" + "q" * 300

    def __init__(self) -> None:
        self.preimages: dict[str, str] = {}     # payment hash -> preimage, for bench clients to "pay"

    async def create_invoice(self, amount_msat, label, description, expiry_s):
        import hashlib
        import os
        import time

        from micropay.lightning.base import Invoice
        preimage = os.urandom(32)
        payment_hash = hashlib.sha256(preimage).hexdigest()
        if len(self.preimages) < 2_000_000:
            self.preimages[payment_hash] = preimage.hex()
        return Invoice(self.BOLT11, payment_hash, amount_msat, int(time.time()) + expiry_s, label)

    async def has_invoice(self, payment_hash):
        return True

    async def settlements(self, after_pay_index):
        await asyncio.Event().wait()
        yield

    async def close(self):
        pass


async def fill_pool(store, n: int) -> None:
    """n ready invoices of one live node for /mint's price and description."""
    import hashlib
    import time

    from micropay.store.fleet import FleetRepository, NodeBeat
    repo = FleetRepository(store)
    node = "02" + "ab" * 32
    await repo.heartbeat(NodeBeat(node, "regtest", int((time.time() + 86400) * 1000), 10**15, 10**15))
    rows = []
    for i in range(n):
        h = hashlib.sha256(f"pool-{i}".encode()).hexdigest()
        rows.append((h, node, f"micropay-fleet-bench-{i}", 1000, "bench: GET /mint", StubNode.BOLT11,
                     int(time.time()) + 7 * 86400, int(time.time() * 1000)))
    for start in range(0, n, 500):
        chunk = rows[start:start + 500]
        marks = ",".join(f"(${8 * k + 1}, ${8 * k + 2}, ${8 * k + 3}, ${8 * k + 4}, ${8 * k + 5}, ${8 * k + 6}, "
                         f"${8 * k + 7}, ${8 * k + 8})" for k in range(len(chunk)))
        await store.execute("INSERT INTO micropay_fleet_invoices (payment_hash, node_id, node_label, amount_msat, "
                            f"description, bolt11, expires_at, created_ms) VALUES {marks}",
                            [v for row in chunk for v in row])


async def main(mode: str, port: int, data_dir: str, store_url: str | None = None, pool: int = 0) -> None:
    if mode == "bare":
        app = web.Application()
    else:
        from micropay.seller.configfile import parse_config
        from micropay.sidecar.app import build_app, create_runtime
        text = BENCH_CONFIG
        if mode == "fleet":
            text += '[backend]\nkind = "fleet"\npool_depth = 0\nask_timeout_s = 1\n'
        cfg = parse_config(tomllib.loads(text), "bench").with_overrides(
            data_dir=Path(data_dir), trust_forwarded_for=True, store_url=store_url)
        stub = StubNode() if mode == "stub" else None
        rt = await create_runtime(cfg, node=stub)
        if mode == "fleet":
            await fill_pool(rt.store, pool)
        rt.extra_routes += [("GET", "/pass", payload), ("GET", "/mint", payload), ("GET", "/sess", payload),
                            ("GET", "/sse", sse)]
        if stub is not None:
            async def preimages(request: web.Request) -> web.Response:
                """The stub's preimages, so a bench client can present paid credentials."""
                out, stub.preimages = stub.preimages, {}
                return web.json_response(out)
            rt.extra_routes.append(("GET", "/stub/preimages", preimages))
        app = build_app(rt)
    if mode == "bare":
        app.router.add_get("/pass", payload)
        app.router.add_get("/mint", payload)
        app.router.add_get("/sess", payload)
        app.router.add_get("/sse", sse)
        app.router.add_get("/bare402", bare_402)
        app.router.add_get("/healthz", payload)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    if mode != "bare":
        from micropay.sidecar.server import settle_heap
        settle_heap()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _toggle_profile)
    await stop.wait()
    _toggle_profile(dump_only=True)
    await runner.cleanup()


_PROFILE: dict = {}


def _toggle_profile(dump_only: bool = False) -> None:
    """SIGUSR1 starts cProfile, the next SIGUSR1 (or SIGTERM) writes it to
    $MICROPAY_BENCH_PROFILE: a profile of just the measured requests, in the event loop
    thread's CPU time."""
    import cProfile
    import os
    path = os.environ.get("MICROPAY_BENCH_PROFILE")
    if not path:
        return
    if "prof" in _PROFILE:
        prof = _PROFILE.pop("prof")
        prof.disable()
        prof.dump_stats(path)
    elif not dump_only:
        import time
        # the main thread's CPU time, not the wall clock: a C call that lets go of the GIL
        # (a socket send, a long HMAC) would otherwise be charged for the other threads' turns
        _PROFILE["prof"] = prof = cProfile.Profile(time.thread_time)
        prof.enable()


async def bare_402(request: web.Request) -> web.Response:
    """Baseline for challenge minting: a 402 with a body of the same size, no invoice."""
    return web.json_response({"error": "payment_required", "pad": "x" * 1100}, status=402)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["bare", "gated", "stub", "fleet"], required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--data-dir", default="/tmp/micropay-bench")
    ap.add_argument("--store", default=None, help="store URL (fleet mode; default SQLite in the data dir)")
    ap.add_argument("--pool", type=int, default=100_000, help="fleet mode: invoices pooled before serving")
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                    help="the event loop (uvloop must be installed; micropay itself always runs on asyncio)")
    a = ap.parse_args()
    if a.loop == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main(a.mode, a.port, a.data_dir, a.store, a.pool))
