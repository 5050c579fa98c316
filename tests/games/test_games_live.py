"""Live events (SSE, WebSocket) and the webhook outbox."""
import asyncio
import json
import time

import aiohttp
import pytest
from aiohttp import web

from micropay.games.signing import WebhookVerificationError, sign, verify_webhook

from ..conftest import FakeClock, serve_app
from ..games_util import GAMES_TOML, start_game_sidecar


async def read_sse(resp, n, timeout=5.0):
    """Read n events from an SSE response: [(id, type, data, arrived_at)]."""
    out, cur = [], {}
    async def run():
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in cur:
                    out.append((int(cur["id"]), cur["event"], json.loads(cur["data"]), time.perf_counter()))
                    if len(out) == n:
                        return
                cur.clear()
                continue
            if line.startswith(":"):
                continue
            k, _, v = line.partition(": ")
            cur[k] = v
    await asyncio.wait_for(run(), timeout)
    return out


@pytest.fixture
async def gs(tmp_path):
    g = await start_game_sidecar(tmp_path)
    yield g
    await g.close()


async def test_sse_paid_within_50ms_and_resumable(gs):
    p = await gs.buy(player="alice", key="a")
    latencies = []
    async with aiohttp.ClientSession() as s:
        url = f"{gs.url}/v1/purchases/{p['id']}/events?token={p['client_token']}"
        async with s.get(url) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            reader = asyncio.create_task(read_sse(resp, 1))
            await asyncio.sleep(0.05)
            settled = time.perf_counter()
            await gs.payer.pay(p["invoice"])     # the sandbox node reports the settlement now
            (eid, etype, data, arrived), = await reader
            latencies.append(arrived - settled)
        assert etype == "purchase.paid" and data["data"]["purchase"]["status"] == "paid"
        assert data["data"]["purchase"]["receipt"]
        # several purchases: every one within 50 ms
        for i in range(5):
            q = await gs.buy(player="alice", key=f"more{i}")
            async with s.get(f"{gs.url}/v1/purchases/{q['id']}/events", headers=gs.auth()) as resp:
                reader = asyncio.create_task(read_sse(resp, 1))
                await asyncio.sleep(0.02)
                settled = time.perf_counter()
                await gs.payer.pay(q["invoice"])
                (_, _, _, arrived), = await reader
                latencies.append(arrived - settled)
        assert max(latencies) < 0.050, latencies
        # reconnecting with Last-Event-ID: nothing already seen comes again
        async with s.get(url, headers={"Last-Event-ID": str(eid)}) as resp:
            with pytest.raises(asyncio.TimeoutError):
                await read_sse(resp, 1, timeout=0.3)
        async with s.get(url, headers={"Last-Event-ID": str(eid - 1)}) as resp:
            assert [e[0] for e in await read_sse(resp, 1)] == [eid]
        async with s.get(url, headers={"Last-Event-ID": "nope"}) as resp:
            assert resp.status == 400


async def test_app_stream_and_websocket(gs):
    a, b = await gs.buy(player="a", key="a"), await gs.buy(player="b", key="b")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gs.url}/v1/events", headers=gs.auth()) as sse, \
                s.ws_connect(f"{gs.url}/v1/ws", headers=gs.auth()) as ws, \
                s.ws_connect(f"{gs.url}/v1/ws?purchase_id={b['id']}&token={b['client_token']}") as ws_b:
            reader = asyncio.create_task(read_sse(sse, 2))
            await asyncio.sleep(0.05)
            await gs.payer.pay(a["invoice"])
            await gs.payer.pay(b["invoice"])
            events = await reader
            assert [e[2]["data"]["purchase"]["id"] for e in events] == [a["id"], b["id"]]
            got = [json.loads((await ws.receive(timeout=5)).data) for _ in range(2)]
            assert [g["id"] for g in got] == [e[0] for e in events]
            only_b = json.loads((await ws_b.receive(timeout=5)).data)
            assert only_b["data"]["purchase"]["id"] == b["id"]
        # resume the app stream from the first event: only the second comes
        async with s.get(f"{gs.url}/v1/events", headers=dict(gs.auth(), **{"Last-Event-ID": str(events[0][0])})) as sse:
            assert [e[0] for e in await read_sse(sse, 1)] == [events[1][0]]
        async with s.get(f"{gs.url}/v1/ws?purchase_id={a['id']}&token={b['client_token']}") as r:
            assert r.status == 401


# -- webhooks -----------------------------------------------------------------------

def test_signature_verification():
    body, now = b'{"id":1}', 1_800_000_000
    header = sign(body, ["new-secret", "old-secret"], now)
    assert verify_webhook(body, header, "old-secret", now=now)["id"] == 1     # rotation overlap
    assert verify_webhook(body, header, ["x", "new-secret"], now=now + 299)["id"] == 1
    for bad_body, hdr, secrets, at, why in [
        (body, header, "other", now, "no signature"),
        (b'{"id":2}', header, "new-secret", now, "no signature"),
        (body, header, "new-secret", now + 301, "tolerance"),       # replayed later
        (body, header, "new-secret", now - 301, "tolerance"),
        (body, "t=abc,v1=00", "new-secret", now, "timestamp"),
        (body, "v1=00", "new-secret", now, "t="),
        (body, None, "new-secret", now, "missing"),
        (body, "garbage", "new-secret", now, "malformed"),
    ]:
        with pytest.raises(WebhookVerificationError, match=why):
            verify_webhook(bad_body, hdr, secrets, now=at)


class Receiver:
    """A webhook receiver on 127.0.0.1 that can be down (503 or refusing) or up."""

    def __init__(self, secret_path, clock):
        self.secret_path, self.clock = secret_path, clock
        self.up, self.received, self.attempts = False, [], 0
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.app = app

    async def handle(self, request):
        self.attempts += 1
        if not self.up:
            return web.Response(status=503)
        body = await request.read()
        secrets = self.secret_path.read_text().split()
        event = verify_webhook(body, request.headers.get("Micropay-Signature"), secrets, now=self.clock())
        assert request.headers["Micropay-Event-Id"] == str(event["id"])
        self.received.append(event)
        return web.Response(status=204)


async def hooked_sidecar(tmp_path, extra_toml=""):
    """A receiver (down until told otherwise) and a sidecar whose deliveries the test drives."""
    clock = FakeClock()
    rcv = Receiver(tmp_path / "data" / "webhook-game.secret", clock)
    runner, url = await serve_app(rcv.app)
    toml = GAMES_TOML + f'\n[[webhooks]]\nname = "game"\nurl = "{url}/hook"\n' + extra_toml
    gs = await start_game_sidecar(tmp_path, toml, clock=clock, manual_delivery=True)
    return clock, rcv, runner, gs


async def test_receiver_down_for_an_hour_loses_nothing_and_keeps_order(tmp_path):
    clock, rcv, runner, gs = await hooked_sidecar(tmp_path)
    deliver = gs.games.deliverer
    try:
        purchases = [await gs.buy(player=f"p{i}", key=f"k{i}") for i in range(4)]
        for p in purchases[:3]:
            await gs.payer.pay(p["invoice"])
        for _ in range(100):
            if len(await gs.games.purchases.events_after(0)) == 3:
                break
            await asyncio.sleep(0.01)
        clock.advance(600)                         # the 4th purchase expires unpaid
        assert await gs.games.purchases.expire_due() == 1
        # the receiver is down for an hour: attempts back off, nothing is dropped
        elapsed = 0
        while elapsed < 3600:
            await deliver.run_once()
            clock.advance(30)
            elapsed += 30
        # doubling from 1 s, capped at 600 s: about 15 attempts per event in an hour
        assert rcv.received == [] and 4 * 10 <= rcv.attempts <= 4 * 16
        rows = await gs.rt.store.query("SELECT status, attempts FROM micropay_webhook_deliveries")
        assert len(rows) == 4 and all(r[0] == "pending" for r in rows)
        rcv.up = True
        for _ in range(30):                        # max backoff is 600 s
            await deliver.run_once()
            clock.advance(30)
        types = [(e["type"], e["data"]["purchase"]["id"]) for e in rcv.received]
        assert sorted(types) == sorted([("purchase.paid", p["id"]) for p in purchases[:3]]
                                       + [("purchase.expired", purchases[3]["id"])])
        assert len({e["id"] for e in rcv.received}) == 4     # each event once
    finally:
        await gs.close()
        await runner.cleanup()


async def test_events_for_one_purchase_are_delivered_in_order(tmp_path):
    clock, rcv, runner, gs = await hooked_sidecar(tmp_path)
    try:
        p = await gs.buy(player="p", key="k")
        clock.advance(601)
        await gs.games.purchases.expire_due()       # expired first ...
        node = gs.rt.node                           # ... then the late settlement still counts
        from micropay.lightning.base import Settlement
        state = node._by_hash[p["payment_hash"]]
        await gs.games.purchases.on_settlement(Settlement(99, state.invoice.label, p["payment_hash"],
                                                          50000, state.preimage.hex(), int(clock())))
        rows = await gs.rt.store.query(GAMES_ORDER_SQL)
        assert [r[0] for r in rows] == ["purchase.expired", "purchase.paid"]
        # the first delivery fails; the second must wait for it even though it is due
        await gs.games.deliverer.run_once()
        assert rcv.attempts == 1
        clock.advance(1)
        rcv.up = True
        await gs.games.deliverer.run_once()
        await gs.games.deliverer.run_once()
        assert [e["type"] for e in rcv.received] == ["purchase.expired", "purchase.paid"]
        _, got, _ = await gs.call("GET", f"/v1/purchases/{p['id']}")
        assert got["status"] == "paid"
    finally:
        await gs.close()
        await runner.cleanup()


GAMES_ORDER_SQL = "SELECT e.type FROM micropay_webhook_deliveries d JOIN micropay_events e ON e.id = d.event_id ORDER BY d.event_id"


async def test_dead_letter_and_redeliver(tmp_path):
    clock, rcv, runner, gs = await hooked_sidecar(
        tmp_path, 'events = ["purchase.paid"]\n[webhook_retry]\nfirst_s = 1\nmax_s = 60\ngive_up_after_s = 300\n')
    from micropay.games.webhooks import list_deliveries, redeliver
    try:
        p = await gs.buy(player="p", key="k")
        await gs.payer.pay(p["invoice"])
        for _ in range(100):
            if await list_deliveries(gs.rt.store):
                break
            await asyncio.sleep(0.01)
        for _ in range(20):
            await gs.games.deliverer.run_once()
            clock.advance(60)
        (d,) = await list_deliveries(gs.rt.store)
        assert d.status == "failed" and d.last_error == "HTTP 503" and d.attempts >= 5
        rcv.up = True
        assert await redeliver(gs.rt.store, d.event_id, now=int(clock())) == ["game"]
        await gs.games.deliverer.run_once()
        assert [e["id"] for e in rcv.received] == [d.event_id]
    finally:
        await gs.close()
        await runner.cleanup()


async def test_listeners_see_events_written_by_another_sidecar_sharing_the_store(tmp_path):
    """Two processes' worth of sidecars on one store: a purchase paid through A reaches
    an SSE listener on B (through B's poller of the shared store, within about a second)."""
    shared = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    a = await start_game_sidecar(tmp_path / "a", store_url=shared)
    b = await start_game_sidecar(tmp_path / "b", store_url=shared)
    try:
        p = await a.buy(player="zed", key="z")
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{b.url}/v1/events", headers=b.auth()) as resp:
                reader = asyncio.create_task(read_sse(resp, 1, timeout=5))
                await asyncio.sleep(0.1)
                await a.payer.pay(p["invoice"])
                (_, etype, data, _), = await reader
        assert etype == "purchase.paid" and data["data"]["purchase"]["id"] == p["id"]
    finally:
        await a.close()
        await b.close()


async def test_one_event_costs_one_store_read_whatever_the_number_of_listeners(tmp_path):
    toml = GAMES_TOML + "\n[events]\nmax_streams = 1000\nmax_streams_per_credential = 1000\n"
    gs = await start_game_sidecar(tmp_path, toml)
    from micropay.games.repository import EVENTS_AFTER
    reads = []
    store_query = gs.rt.store.query

    async def counting(sql, args=()):
        if sql == EVENTS_AFTER:
            reads.append(args)
        return await store_query(sql, args)
    gs.rt.store.query = counting
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            streams = [await s.get(f"{gs.url}/v1/events", headers=gs.auth()) for _ in range(200)]
            readers = [asyncio.create_task(read_sse(r, 5, timeout=20)) for r in streams]
            await asyncio.sleep(0.2)
            reads.clear()
            started = time.perf_counter()
            for i in range(5):
                p = await gs.buy(player=f"p{i}", key=f"k{i}")
                await gs.payer.pay(p["invoice"])
            results = await asyncio.gather(*readers)
            elapsed = time.perf_counter() - started
            for r in streams:
                r.close()
        assert all([e[1] for e in got] == ["purchase.paid"] * 5 for got in results)
        assert len(reads) <= 15, len(reads)      # the feed's reads, not one per listener per event
        assert elapsed < 5, elapsed
    finally:
        await gs.close()


async def test_event_streams_are_capped_per_credential_and_overall(tmp_path):
    toml = GAMES_TOML + "\n[events]\nmax_streams = 3\nmax_streams_per_credential = 2\n"
    gs = await start_game_sidecar(tmp_path, toml)
    from micropay.games.apikeys import create_key
    other, _ = await create_key(gs.rt.store, "other", ["events:read", "purchases:write"])
    try:
        async with aiohttp.ClientSession() as s:
            held = [await s.get(f"{gs.url}/v1/events", headers=gs.auth()) for _ in range(2)]
            assert [r.status for r in held] == [200, 200]
            async with s.get(f"{gs.url}/v1/events", headers=gs.auth()) as r:
                assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
                assert "this credential already holds 2" in (await r.json())["detail"]
            ws = await s.ws_connect(f"{gs.url}/v1/ws", headers=gs.auth(other))
            async with s.get(f"{gs.url}/v1/events", headers=gs.auth(other)) as r:
                assert r.status == 429 and "has 3 event streams open" in (await r.json())["detail"]
            for r in held:
                r.close()
            await ws.close()
            for _ in range(100):                  # closed streams give their slot back
                if gs.games.streams.open == 0:
                    break
                await asyncio.sleep(0.02)
            async with s.get(f"{gs.url}/v1/events", headers=gs.auth(other)) as r:
                assert r.status == 200
    finally:
        await gs.close()


async def test_the_paywall_frames_only_for_the_configured_origins(tmp_path):
    for extra, expected in [("", "frame-ancestors 'none'"),
                            ('\n[paywall]\nframe_ancestors = ["https://game.example", "\'self\'"]\n',
                             "frame-ancestors https://game.example 'self'")]:
        gs = await start_game_sidecar(tmp_path / str(len(extra)), GAMES_TOML + extra)
        try:
            async with aiohttp.ClientSession() as s, s.get(gs.url + "/paywall/article-1") as r:
                assert r.status == 200 and r.headers["Content-Security-Policy"].endswith(expected)
        finally:
            await gs.close()
