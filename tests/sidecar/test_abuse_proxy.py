"""The reverse proxy under abuse (issue 18, sections 1 and 3): trickled request bodies
hold no upstream connection, one client holds at most its share of the upstream pool, a
Payment charge whose request never reached the upstream is given back, and the headers
an upstream reads as ours cannot be forged in any spelling."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import wsgiref.simple_server

import aiohttp
import pytest
from aiohttp import web

from micropay.payment import scheme as pa

from ..conftest import make_config, serve_app, start_sidecar
from ..helpers_proc import free_port
from ..payment.test_payment_scheme import buy_payment, credential
from .test_proxy import pay, start_upstream

PASS_ROUTE = '''
[[routes]]
path = "/api/stream"
price_msat = 100
pass_s = 60
'''


async def _trickle(port: int, source: str, path: str, stop: asyncio.Event) -> None:
    """A POST that declares 100 bytes of body and sends one a second until `stop`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n".encode())
        for _ in range(100):
            await writer.drain()
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
                return
            except asyncio.TimeoutError:
                writer.write(b"x")
    except ConnectionError:
        pass
    finally:
        writer.close()


async def test_260_trickled_posts_leave_the_upstream_pool_to_a_paid_request(tmp_path):
    """The review's case: 260 unpaid POSTs sending a byte a second (the pool holds 256)."""
    up_runner, up_url, seen = await start_upstream()
    sc = await start_sidecar(make_config(tmp_path, f'service = "px"\nupstream = "{up_url}"\n{PASS_ROUTE}'))
    stop = asyncio.Event()
    tricklers = [asyncio.create_task(_trickle(sc.port, f"127.0.0.{2 + i % 2}", "/free-upload", stop))
                 for i in range(260)]
    try:
        await asyncio.sleep(1.5)
        async with aiohttp.ClientSession() as s:
            auth = await pay(sc, s, "GET", "/api/stream")
            started = time.monotonic()
            async with s.get(sc.url + "/api/stream", headers={"Authorization": auth},
                             timeout=aiohttp.ClientTimeout(total=15)) as r:
                assert r.status == 200, await r.text()
                await r.read()
            assert time.monotonic() - started < 3
            print(f"paid request served in {(time.monotonic() - started) * 1000:.0f} ms beside 260 trickled POSTs")
        assert "headers" not in seen            # no trickled body has reached the upstream
    finally:
        stop.set()
        await asyncio.gather(*tricklers, return_exceptions=True)
        await sc.runner.cleanup()
        await up_runner.cleanup()


async def test_a_body_that_does_not_arrive_within_body_timeout_s_gets_408_and_never_reaches_the_upstream(tmp_path):
    up_runner, up_url, seen = await start_upstream()
    sc = await start_sidecar(make_config(tmp_path, f'upstream = "{up_url}"\nbody_timeout_s = 1\n'))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        writer.write(b"POST /free-upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx")
        started = time.monotonic()
        head = None
        for _ in range(20):                       # a byte every 0.2 s, for at most 4 s
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 0.2)
                break
            except asyncio.TimeoutError:
                writer.write(b"x")
        writer.close()
        assert head is not None and head.startswith(b"HTTP/1.1 408"), head
        assert 0.9 <= time.monotonic() - started <= 3
        assert "headers" not in seen
    finally:
        await sc.runner.cleanup()
        await up_runner.cleanup()


async def test_a_declared_body_over_max_body_bytes_is_refused_before_the_upstream(tmp_path):
    up_runner, up_url, seen = await start_upstream()
    sc = await start_sidecar(make_config(tmp_path, f'upstream = "{up_url}"\nmax_body_bytes = 1000\n'))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(sc.url + "/free-upload", data=b"x" * 1001) as r:
                assert r.status == 413 and (await r.json(content_type=None))["error"] == "request_body_too_large"
            async with s.post(sc.url + "/free-upload", data=b"x" * 1000) as r:
                assert r.status == 200 and (await r.json())["bytes"] == 1000
    finally:
        await sc.runner.cleanup()
        await up_runner.cleanup()


async def test_one_client_holds_at_most_its_share_of_the_upstream_pool(tmp_path):
    release = asyncio.Event()
    reached = []

    async def slow(request):
        reached.append(request.headers["X-Forwarded-For"])
        await release.wait()
        return web.Response(text="slow")

    async def stream(request):
        return web.Response(text="paid")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/api/stream", stream)
    up_runner, up_url = await serve_app(app)
    sc = await start_sidecar(make_config(tmp_path, f'service = "px"\nupstream = "{up_url}"\nupstream_connections = 8\n'
                                         f'upstream_connections_per_client = 2\n{PASS_ROUTE}'))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as greedy:
            async def one():
                async with greedy.get(sc.url + "/slow", timeout=aiohttp.ClientTimeout(total=10)) as r:
                    return r.status, await r.text()
            tasks = [asyncio.create_task(one()) for _ in range(5)]
            for _ in range(100):
                if sum(t.done() for t in tasks) == 3:
                    break
                await asyncio.sleep(0.05)
            busy = [t.result() for t in tasks if t.done()]
            assert [status for status, _ in busy] == [503] * 3, busy
            assert all(json.loads(text)["error"] == "upstream_busy" for _, text in busy)
            assert reached == ["127.0.0.2"] * 2
            async with aiohttp.ClientSession() as s:          # another client, meanwhile: served
                auth = await pay(sc, s, "GET", "/api/stream")
                async with s.get(sc.url + "/api/stream", headers={"Authorization": auth}) as r:
                    assert r.status == 200 and await r.text() == "paid"
            release.set()
            served = await asyncio.gather(*(t for t in tasks if not t.done()))
            assert served == [(200, "slow")] * 2
            async with greedy.get(sc.url + "/slow") as r:            # its share is free again
                assert r.status == 200
    finally:
        release.set()
        await sc.runner.cleanup()
        await up_runner.cleanup()


async def test_a_payment_charge_whose_request_never_reached_the_upstream_is_given_back(tmp_path):
    port = free_port()
    sc = await start_sidecar(make_config(tmp_path, f'''
service = "px"
upstream = "http://127.0.0.1:{port}"
[[routes]]
path = "/api/item"
price_msat = 3000
'''))
    up_runner = None
    try:
        echo, preimage, _ = await buy_payment(sc, "/api/item")
        auth = credential(echo, preimage)
        async with aiohttp.ClientSession() as s:
            for _ in range(2):                   # nothing listens upstream: 502, and the charge stays unspent
                async with s.get(sc.url + "/api/item", headers={"Authorization": auth}) as r:
                    assert r.status == 502 and (await r.json(content_type=None))["error"] == "upstream_unavailable"
            app = web.Application()
            async def item(request):
                return web.Response(text="the item")
            app.router.add_get("/api/item", item)
            up_runner = web.AppRunner(app)
            await up_runner.setup()
            await web.TCPSite(up_runner, "127.0.0.1", port).start()
            async with s.get(sc.url + "/api/item", headers={"Authorization": auth}) as r:
                assert r.status == 200 and await r.text() == "the item"
                assert json.loads(pa.unb64url(r.headers["Payment-Receipt"]))["status"] == "success"
            async with s.get(sc.url + "/api/item", headers={"Authorization": auth}) as r:    # once only
                assert r.status == 402 and (await r.json(content_type=None))["error"] == "payment_unknown_challenge"
    finally:
        await sc.runner.cleanup()
        if up_runner is not None:
            await up_runner.cleanup()


class _WsgiUpstream:
    """wsgiref on 127.0.0.1 in a thread, recording the environ of every request."""

    def __init__(self) -> None:
        self.environs: list[dict] = []

        def app(environ, start_response):
            self.environs.append({k: v for k, v in environ.items() if isinstance(v, str)})
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"wsgi"]

        class Quiet(wsgiref.simple_server.WSGIRequestHandler):
            def log_message(self, *args):
                pass

        self.server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


FORGED = {"X_L402_Token_Id": "f" * 64, "X_L402_Payment_Hash": "e" * 64, "X_Forwarded_For": "203.0.113.9",
          "x_forwarded_proto": "gopher", "X_Forwarded_Host": "evil.example", "X_Real_IP": "1.2.3.4",
          "X_Micropay_Stream": "0123456789abcdef", "X-L402.Token-Id": "d" * 64,
          "X-HTTP-Method-Override": "DELETE", "X-HTTP-Method": "DELETE", "X-Method-Override": "DELETE",
          "X_HTTP_Method_Override": "DELETE"}


@pytest.mark.parametrize("trusted", [False, True])
async def test_a_wsgi_upstream_sees_no_forged_spelling_of_the_headers_we_set(tmp_path, trusted):
    up = _WsgiUpstream()
    sc = await start_sidecar(make_config(tmp_path, f'service = "px"\nupstream = "{up.url}"\n'
                                         f'trust_forwarded_for = {str(trusted).lower()}\n{PASS_ROUTE}'))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(sc.url + "/free", headers=FORGED, data=b"x") as r:
                assert r.status == 200 and await r.text() == "wsgi"
            auth = await pay(sc, s, "GET", "/api/stream")
            async with s.get(sc.url + "/api/stream", headers=dict(FORGED, Authorization=auth)) as r:
                assert r.status == 200
        free, paid = up.environs
        assert free["REQUEST_METHOD"] == "POST" and paid["REQUEST_METHOD"] == "GET"
        assert "HTTP_X_L402_TOKEN_ID" not in free and "HTTP_X_L402_PAYMENT_HASH" not in free
        assert len(paid["HTTP_X_L402_TOKEN_ID"]) == 64 and set(paid["HTTP_X_L402_TOKEN_ID"]) != {"f"}
        assert "," not in paid["HTTP_X_L402_TOKEN_ID"] and "," not in paid["HTTP_X_L402_PAYMENT_HASH"]
        assert paid["HTTP_X_L402_PAYMENT_HASH"] != "e" * 64
        for env in (free, paid):
            assert env["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"          # neither forged nor "forged,real"
            assert env["HTTP_X_FORWARDED_PROTO"] == "http" and env["HTTP_X_FORWARDED_HOST"] != "evil.example"
            for name in ("HTTP_X_REAL_IP", "HTTP_X_MICROPAY_STREAM", "HTTP_X_HTTP_METHOD_OVERRIDE",
                         "HTTP_X_HTTP_METHOD", "HTTP_X_METHOD_OVERRIDE"):
                assert name not in env, (name, env.get(name))
            assert not any(set(v) == {"d"} for v in env.values())
    finally:
        await sc.runner.cleanup()
        await asyncio.to_thread(up.stop)


async def test_the_proxy_adds_no_accept_encoding_or_other_header_of_its_own(tmp_path):
    from ..rawhttp import RecordingUpstream, raw_request
    up = await RecordingUpstream().start()
    sc = await start_sidecar(make_config(tmp_path, f'upstream = "{up.url}"\n'))
    try:
        status, _, _ = await asyncio.to_thread(raw_request, sc.port, "GET", "/plain", {})
        assert status == 200
        status, _, _ = await asyncio.to_thread(raw_request, sc.port, "POST", "/post", {"Content-Length": "2"}, 10, b"{}")
        assert status == 200
        status, _, _ = await asyncio.to_thread(raw_request, sc.port, "GET", "/asked",
                                               {"Accept-Encoding": "br", "User-Agent": "me/1"})
        assert status == 200
        plain, post, asked = up.seen
        for seen in (plain, post):
            names = {k.lower() for k in seen.headers}
            assert not names & {"accept-encoding", "accept", "user-agent", "content-type"}, seen.headers
        assert asked.headers["Accept-Encoding"] == "br" and asked.headers["User-Agent"] == "me/1"
    finally:
        await sc.runner.cleanup()
        await up.runner.cleanup()


REWRITES = {"X-Original-URL": "/admin/delete-all", "X-Rewrite-URL": "/admin/delete-all",
            "X-Original-URI": "/admin/delete-all", "x_original_url": "/admin", "X-REWRITE_URL": "/admin",
            "x-original.uri": "/admin"}


async def test_the_url_rewrite_headers_some_upstreams_route_on_never_reach_the_upstream(tmp_path):
    """Legacy Symfony, Zend and IIS route on X-Original-URL / X-Rewrite-URL (X-Original-URI
    too, with some set-ups): a client's copy would have the upstream serve another path
    than the one the gate priced. Every spelling is dropped, free and paid requests alike."""
    from ..rawhttp import RecordingUpstream, raw_request
    up = await RecordingUpstream().start()
    sc = await start_sidecar(make_config(tmp_path, f'service = "px"\nupstream = "{up.url}"\n{PASS_ROUTE}'))
    try:
        status, _, _ = await asyncio.to_thread(raw_request, sc.port, "GET", "/free", REWRITES)
        assert status == 200
        async with aiohttp.ClientSession() as s:
            auth = await pay(sc, s, "GET", "/api/stream")
        status, _, _ = await asyncio.to_thread(raw_request, sc.port, "GET", "/api/stream",
                                               dict(REWRITES, Authorization=auth))
        assert status == 200
        assert [seen.raw_path for seen in up.seen] == ["/free", "/api/stream"]
        for seen in up.seen:
            leaked = {k: v for k, v in seen.headers.items()
                      if k.lower().replace("_", "-").replace(".", "-") in
                      ("x-original-url", "x-rewrite-url", "x-original-uri")}
            assert not leaked, leaked
    finally:
        await sc.runner.cleanup()
        await up.stop()


async def _start_reading_upstream() -> tuple[web.AppRunner, str, list]:
    """An upstream that reads each request body whole: (runner, URL, outcomes)."""
    outcomes: list = []

    async def read_all(request: web.Request) -> web.Response:
        try:
            outcomes.append(len(await request.read()))
        except Exception as exc:                 # the proxy cut the body off
            outcomes.append(type(exc).__name__)
            raise
        return web.Response(text="read")
    app = web.Application(client_max_size=1024 ** 3)
    app.router.add_route("*", "/{tail:.*}", read_all)
    runner, url = await serve_app(app)
    return runner, url, outcomes


async def test_a_streamed_body_sent_slower_than_body_min_rate_is_cut_off_in_bounded_time(tmp_path):
    """A body over 1 MiB is streamed to the upstream after its first MiB; one that then
    trickles (2 KiB every 0.2 s: never a pause of body_timeout_s, but 10 KiB/s) holds the
    upstream connection only until it falls behind body_min_rate_bytes_s, not for the
    190 s the rest would take."""
    up_runner, up_url, outcomes = await _start_reading_upstream()
    sc = await start_sidecar(make_config(tmp_path, f'upstream = "{up_url}"\nbody_timeout_s = 1\n'
                                                   'body_min_rate_bytes_s = 65536\n'))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        writer.write(f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {3 * 1024 ** 2}\r\n\r\n".encode())
        writer.write(b"a" * (1024 ** 2 + 64 * 1024))
        await writer.drain()
        started = time.monotonic()
        head = None
        for _ in range(50):                      # 2 KiB every 0.2 s, for at most 10 s
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 0.2)
                break
            except asyncio.TimeoutError:
                try:
                    writer.write(b"b" * 2048)
                    await writer.drain()
                except ConnectionError:
                    break
            except (ConnectionError, asyncio.IncompleteReadError):
                break
        took = time.monotonic() - started
        writer.close()
        print(f"trickled streamed body: {head!r} after {took:.1f} s; upstream saw {outcomes}")
        assert took < 5, took
        assert head is None or head.split()[1] in (b"408", b"502"), head
        for _ in range(20):                      # the upstream's read ends too (the slot is free)
            if outcomes:
                break
            await asyncio.sleep(0.1)
        assert outcomes and outcomes[0] != 3 * 1024 ** 2
    finally:
        await sc.runner.cleanup()
        await up_runner.cleanup()


def test_body_min_rate_bytes_s_is_read_from_the_config(tmp_path):
    assert make_config(tmp_path, "").body_min_rate_bytes_s == 65536
    assert make_config(tmp_path, "body_min_rate_bytes_s = 1000\n").body_min_rate_bytes_s == 1000
