"""Reverse-proxy mode: a real upstream on 127.0.0.1 behind the gate."""
import asyncio
import hashlib

import aiohttp
import pytest
from aiohttp import web

from micropay.l402.wire import format_authorization, parse_challenges
from micropay.core.receipts import verify_receipt

from ..conftest import make_config, serve_app, start_sidecar


async def start_upstream():
    seen = {}

    async def stream(request):
        resp = web.StreamResponse(headers={"Cache-Control": "public, max-age=60"})   # a paid answer: made private
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f"chunk{i}\n".encode())
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    async def upload(request):
        seen["headers"] = dict(request.headers)
        h, n = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(65536):
            h.update(chunk)
            n += len(chunk)
        return web.json_response({"sha256": h.hexdigest(), "bytes": n},
                                 headers={"Keep-Alive": "timeout=5", "X-Up": "yes"})

    async def free(request):
        return web.Response(text=f"free {request.query_string}")

    app = web.Application(client_max_size=64 * 1024 ** 2)
    app.router.add_get("/api/stream", stream)
    app.router.add_post("/api/upload", upload)
    app.router.add_post("/free-upload", upload)
    app.router.add_get("/free", free)
    runner, url = await serve_app(app)
    return runner, url, seen


@pytest.fixture
async def proxied(tmp_path):
    up_runner, up_url, seen = await start_upstream()
    toml = f'''
service = "px"
upstream = "{up_url}"
[[routes]]
path = "/api/stream"
price_msat = 100
pass_s = 60
[[routes]]
path = "/api/upload"
method = "POST"
price_msat = 200
credits = 2
[[routes]]
path = "/down"
price_msat = 100
credits = 2
upstream = "http://127.0.0.1:9"
'''
    sc = await start_sidecar(make_config(tmp_path, toml))
    yield sc, seen
    await sc.runner.cleanup()
    await up_runner.cleanup()


async def pay(sc, session, method, path):
    async with session.request(method, sc.url + path) as r:
        assert r.status == 402
        ch = parse_challenges(r.headers.getall("WWW-Authenticate"))[0]
    paid = await sc.payer.pay(ch.invoice)
    return format_authorization(ch.macaroon, paid.preimage)


async def test_free_paths_pass_through(proxied):
    sc, _ = proxied
    async with aiohttp.ClientSession() as s, s.get(sc.url + "/free?a=1") as r:
        assert r.status == 200 and await r.text() == "free a=1"


async def test_streamed_response_arrives_in_chunks_with_receipt(proxied):
    sc, _ = proxied
    async with aiohttp.ClientSession() as s:
        auth = await pay(sc, s, "GET", "/api/stream")
        async with s.get(sc.url + "/api/stream", headers={"Authorization": auth}) as r:
            assert r.status == 200
            assert verify_receipt(r.headers["Payment-Receipt"])["type"] == "pass"
            assert r.headers["Cache-Control"] == "private, max-age=60"    # the upstream's, made private
            chunks = [c async for c in r.content.iter_any()]
    assert b"".join(chunks) == b"".join(f"chunk{i}\n".encode() for i in range(5))
    assert len(chunks) > 1      # not buffered into one piece


async def test_upload_streams_and_headers_are_cleaned(proxied):
    sc, seen = proxied
    body = bytes(range(256)) * 8192          # 2 MiB
    async with aiohttp.ClientSession() as s:
        auth = await pay(sc, s, "POST", "/api/upload")

        async def gen():
            for i in range(0, len(body), 100_000):
                yield body[i:i + 100_000]

        async with s.post(sc.url + "/api/upload", data=gen(), headers={
                "Authorization": auth, "Connection": "keep-alive, X-Hop", "X-Hop": "secret",
                "X-Keep": "kept"}) as r:
            assert r.status == 200
            doc = await r.json()
            assert r.headers["X-Up"] == "yes" and "Keep-Alive" not in r.headers
            assert r.headers["Payment-Credits-Remaining"] == "1"
    assert doc == {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    h = seen["headers"]
    assert "X-Hop" not in h and h["X-Keep"] == "kept"
    assert "Authorization" not in h                 # the preimage never reaches the upstream
    assert len(h["X-L402-Token-Id"]) == 64 and h["X-Forwarded-For"] == "127.0.0.1"


async def test_upstream_down_is_502_json_and_refunds_the_credit(proxied):
    sc, _ = proxied
    async with aiohttp.ClientSession() as s:
        auth = await pay(sc, s, "GET", "/down")
        for _ in range(3):   # 2 credits; failures must not consume them
            async with s.get(sc.url + "/down", headers={"Authorization": auth}) as r:
                assert r.status == 502
                assert (await r.json(content_type=None))["error"] == "upstream_unavailable"
    row = await sc.rt.store._fetchrow("SELECT remaining FROM micropay_credits", ())
    assert row[0] == 2


async def test_client_cannot_spoof_the_headers_the_proxy_sets(proxied):
    sc, seen = proxied
    spoof = {"X-L402-Token-Id": "f" * 64, "X-L402-Payment-Hash": "e" * 64, "X-Forwarded-Proto": "gopher",
             "X-Forwarded-Host": "evil.example", "X-Forwarded-For": "203.0.113.9", "Forwarded": "for=1.2.3.4",
             "X-Real-IP": "1.2.3.4", "X-Micropay-Stream": "0123456789abcdef"}
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/free-upload", data=b"x", headers=spoof) as r:
            assert r.status == 200
        free = seen["headers"]
        auth = await pay(sc, s, "POST", "/api/upload")
        async with s.post(sc.url + "/api/upload", data=b"x", headers=dict(spoof, Authorization=auth)) as r:
            assert r.status == 200
        paid = seen["headers"]
    assert "X-L402-Token-Id" not in free and "X-L402-Payment-Hash" not in free
    assert paid["X-L402-Token-Id"] != "f" * 64 and paid["X-L402-Payment-Hash"] != "e" * 64
    for h in (free, paid):
        assert h["X-Forwarded-Proto"] == "http" and h["X-Forwarded-Host"] != "evil.example"
        assert h["X-Forwarded-For"] == "127.0.0.1"
        assert "Forwarded" not in h and "X-Real-IP" not in h and "X-Micropay-Stream" not in h


async def test_a_request_the_upstream_received_keeps_its_credit_spent(tmp_path):
    received = []

    async def hang_up(reader, writer):      # reads the request, then closes without answering
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.close()
    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    up = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    toml = f'service = "px"\n[[routes]]\npath = "/act"\nprice_msat = 100\ncredits = 2\nupstream = "{up}"\n'
    sc = await start_sidecar(make_config(tmp_path, toml))
    try:
        async with aiohttp.ClientSession() as s:   # POST: not retried on another connection
            auth = await pay(sc, s, "POST", "/act")
            async with s.post(sc.url + "/act", headers={"Authorization": auth}, data=b"do it") as r:
                assert r.status == 502
                assert (await r.json(content_type=None))["error"] == "upstream_error"
        assert len(received) == 1
        row = await sc.rt.store._fetchrow("SELECT remaining FROM micropay_credits", ())
        assert row[0] == 1                  # the upstream got it: no refund
    finally:
        await sc.runner.cleanup()
        server.close()


async def test_a_catch_all_route_prices_the_upstream_but_not_micropays_own_endpoints(tmp_path):
    """A newcomer's `path = "/*"` in front of an upstream: every upstream path is priced;
    discovery, health, the sandbox wallet and the purchases API stay reachable unpaid (a
    priced wallet could never pay)."""
    up_runner, up_url, _ = await start_upstream()
    toml = f'''
service = "all"
upstream = "{up_url}"
[backend]
kind = "sandbox"
[[routes]]
path = "/*"
price_msat = 300
[[catalog]]
sku = "gems"
price_msat = 10
'''
    sc = await start_sidecar(make_config(tmp_path, toml))
    try:
        async with aiohttp.ClientSession() as s:
            for path in ("/.well-known/l402.json", "/healthz", "/sandbox/wallets/me", "/v1/catalog",
                         "/openapi.json"):
                async with s.get(sc.url + path) as r:
                    assert r.status in (200, 401), (path, r.status)       # 401: the catalog wants an API key
                    assert "WWW-Authenticate" not in r.headers or "L402" not in r.headers["WWW-Authenticate"]
            async with s.get(sc.url + "/free?x=1") as r:
                assert r.status == 402
                ch = parse_challenges(r.headers.getall("WWW-Authenticate"))[0]
            async with s.post(sc.url + "/sandbox/wallets/me/pay", json={"bolt11": ch.invoice}) as r:
                assert r.status == 200
                preimage = (await r.json())["preimage"]
            async with s.get(sc.url + "/free?x=1",
                             headers={"Authorization": format_authorization(ch.macaroon, preimage)}) as r:
                assert r.status == 200 and await r.text() == "free x=1"
    finally:
        await sc.runner.cleanup()
        await up_runner.cleanup()
