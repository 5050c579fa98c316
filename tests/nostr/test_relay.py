"""Our relay connection against a real relay on loopback (rust-nostr's LocalRelay)."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from micropay.core.tasks import Backoff
from micropay.nostr.event import sign_event
from micropay.nostr.keys import Keys, NostrError
from micropay.nostr.relay import Relay, RelayError
from micropay.nostr.urls import relay_url


async def _collect(relay_url_: str, kinds: list[int]):
    seen: list = []
    relay = Relay(relay_url_, lambda sub, ev: seen.append((sub, ev)), backoff=Backoff(first_s=0.05, max_s=0.2))
    await relay.subscribe("s1", [{"kinds": kinds}])
    relay.start()
    assert await relay.wait_connected(10)
    return relay, seen


async def _until(cond, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_publish_and_receive(nostr_relay):
    reader, seen = await _collect(nostr_relay.url, [23194])
    writer = Relay(nostr_relay.url, lambda s, e: None)
    writer.start()
    try:
        assert await writer.wait_connected(10)
        keys = Keys.generate()
        ev = sign_event(keys, 23194, "hello", [["p", Keys.generate().pubkey]])
        await writer.publish(ev)
        await writer.publish(sign_event(keys, 1, "a note the reader did not ask for"))
        await _until(lambda: seen)
        await asyncio.sleep(0.2)
        assert [(s, e.id, e.content) for s, e in seen] == [("s1", ev.id, "hello")]
        await writer.publish(ev)                       # the same event again: the relay says duplicate, fine
    finally:
        await writer.close()
        await reader.close()


async def test_reconnects_and_resubscribes_when_the_relay_returns(nostr_relay):
    reader, seen = await _collect(nostr_relay.url, [23194])
    try:
        nostr_relay.stop()
        await _until(lambda: not reader.connected)
        with pytest.raises(RelayError):
            await reader.publish(sign_event(Keys.generate(), 23194, "nobody listens"))
        nostr_relay.start()
        await _until(lambda: reader.connected and reader.stats.connects == 2)
        async with aiohttp.ClientSession() as s, s.ws_connect(nostr_relay.url) as ws:
            ev = sign_event(Keys.generate(), 23194, "after the restart")
            await ws.send_str(json.dumps(["EVENT", ev.as_json()]))
            await _until(lambda: any(e.id == ev.id for _, e in seen))
    finally:
        await reader.close()


async def fake_relay(port, frames):
    """A relay on 127.0.0.1:`port` that answers each REQ with `frames(sub_id)` (lists are
    sent as JSON, strings as they are)."""
    from aiohttp import web

    async def serve(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            for frame in frames(json.loads(msg.data)[1]):
                await ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))
        return ws
    app = web.Application()
    app.router.add_get("/", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def test_forged_events_from_a_relay_are_dropped(unused_tcp_port):
    """A relay (here a fake one) that hands on an event whose signature does not verify:
    the connection drops it and counts it; the handler never sees it."""
    good = sign_event(Keys.generate(), 23194, "good")
    forged = {**good.as_json(), "content": "pay me"}

    runner = await fake_relay(unused_tcp_port, lambda sub: [["EVENT", sub, forged], ["EVENT", "other-sub", good.as_json()],
                                                           "not json", ["EVENT", sub, good.as_json()]])
    reader, seen = await _collect(f"ws://127.0.0.1:{unused_tcp_port}", [23194])
    try:
        await _until(lambda: seen)
        await asyncio.sleep(0.1)
        assert [e.content for _, e in seen] == ["good"]
        assert reader.stats.dropped_events == 2
    finally:
        await reader.close()
        await runner.cleanup()


def test_relay_urls_are_checked():
    assert relay_url(" wss://relay.example.com ") == "wss://relay.example.com"
    for bad in ("https://relay.example.com", "ws://", "ws://user:pw@host", "relay.example.com", "ws://h/#x"):
        with pytest.raises(NostrError):
            relay_url(bad)


async def test_a_lone_surrogate_or_an_odd_frame_never_ends_the_connection(unused_tcp_port):
    good = sign_event(Keys.generate(), 23194, "good")
    surrogate = {**good.as_json(), "content": "\ud800"}

    runner = await fake_relay(unused_tcp_port, lambda sub: [["EVENT", sub, surrogate], ["CLOSED", ["not", "a", "name"], "x"],
                                                           ["EVENT", sub, good.as_json()]])
    reader, seen = await _collect(f"ws://127.0.0.1:{unused_tcp_port}", [23194])
    try:
        await _until(lambda: seen)
        assert [e.content for _, e in seen] == ["good"] and reader.stats.connects == 1
    finally:
        await reader.close()
        await runner.cleanup()
