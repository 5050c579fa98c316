"""The gate inside someone else's aiohttp app prices the same canonical path it serves."""
import pytest
from aiohttp import web

from micropay.lightning.sandbox import SandboxNetwork
from micropay.sidecar import Gate, create_runtime

from ..conftest import make_config, serve_app
from ..rawhttp import raw_request

CONFIG = '''
service = "emb"
demo = true
[[routes]]
method = "GET"
path = "/api/joke"
price_msat = 1000
'''


@pytest.fixture
async def embedded(tmp_path):
    cfg = make_config(tmp_path, CONFIG)
    net = SandboxNetwork()
    rt = await create_runtime(cfg, node=net.add_node("shop"))
    gate = Gate(tokens=rt.tokens, node=rt.node, store=rt.store, receipts=rt.receipts,
                limits=cfg.limits, pricing=cfg.pricing)
    served = []

    async def api(request):
        served.append(request.path)
        return web.Response(text=request.match_info["name"])

    @gate.require(price_msat=500)
    async def files(request):
        served.append(request.path)
        return web.Response(text=request.match_info["tail"])

    app = web.Application()
    gate.install(app)
    app.router.add_get("/api/{name}", api)
    plain = web.Application()
    plain.router.add_get("/files/{tail:.*}", files)       # require() alone, no middleware
    runner, url = await serve_app(app)
    plain_runner, plain_url = await serve_app(plain)
    yield url, plain_url, served
    await runner.cleanup()
    await plain_runner.cleanup()
    await rt.store.close()


def port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_middleware_redirects_other_spellings_to_the_path_it_prices(embedded):
    import asyncio
    url, _, served = embedded
    for target in ("/api/x/../joke", "/api/./joke", "/api//joke", "/x/%2e%2e/api/joke"):
        status, headers, _ = await asyncio.to_thread(raw_request, port(url), "GET", target)
        assert (status, headers.get("Location")) == (308, "/api/joke"), target
        # again, from the gate's route table, with a query: redirected the same way, query kept
        status, headers, _ = await asyncio.to_thread(raw_request, port(url), "GET", target + "?n=2")
        assert (status, headers.get("Location")) == (308, "/api/joke?n=2"), target
    status, _, _ = await asyncio.to_thread(raw_request, port(url), "GET", "/api/%6Aoke")
    assert status == 402                       # the same path, spelled with an escape: priced
    status, _, _ = await asyncio.to_thread(raw_request, port(url), "GET", "/api/x%2F..%2Fjoke")
    assert status == 400
    status, _, body = await asyncio.to_thread(raw_request, port(url), "GET", "/api/free")
    assert status == 200 and body == b"free"
    assert served == ["/api/free"]


async def test_require_sees_the_canonical_path(embedded):
    import asyncio
    _, plain_url, served = embedded
    status, headers, _ = await asyncio.to_thread(raw_request, port(plain_url), "GET", "/files/a/../b")
    assert (status, headers.get("Location")) == (308, "/files/b")
    status, _, _ = await asyncio.to_thread(raw_request, port(plain_url), "GET", "/files/b")
    assert status == 402 and served == []


async def test_a_one_credit_tokens_receipt_matches_what_its_debit_left(tmp_path):
    """A one-credit token's receipt is signed alongside its debit (gate.handle): the
    receipt a client gets says 0 credits left, a request that was not served gives the
    credit back and its error carries no receipt, and a spent token's refusal carries
    none. A handler guarded twice charges once."""
    import aiohttp

    from micropay.core.errors import UpstreamUnreachable
    from micropay.core.receipts import verify_receipt
    from micropay.l402.wire import format_authorization, parse_challenges
    cfg = make_config(tmp_path, CONFIG)
    net = SandboxNetwork()
    rt = await create_runtime(cfg, node=net.add_node("shop"))
    payer = net.add_node("payer", balance_msat=10_000_000)
    gate = Gate(tokens=rt.tokens, node=rt.node, store=rt.store, receipts=rt.receipts,
                limits=cfg.limits, pricing=cfg.pricing)
    calls = []

    @gate.require(price_msat=700)
    async def flaky(request):
        calls.append(1)
        if len(calls) == 1:
            raise UpstreamUnreachable("the upstream is down")
        return web.Response(text="ok")

    async def joke(request):
        calls.append(2)
        return web.Response(text="joke")

    app = web.Application()
    gate.install(app, middleware=False)       # the hook that puts receipts on responses
    app.router.add_get("/flaky", flaky)
    app.router.add_get("/api/joke", gate.guard(gate.guard(joke)))    # two layers: one charge
    runner, url = await serve_app(app)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/flaky") as r:
                assert r.status == 402
                ch = parse_challenges(r.headers.getall("WWW-Authenticate"))[0]
            auth = format_authorization(ch.macaroon, (await payer.pay(ch.invoice)).preimage)
            async with s.get(url + "/flaky", headers={"Authorization": auth}) as r:
                assert r.status == 502 and "Payment-Receipt" not in r.headers
                assert "Payment-Credits-Remaining" not in r.headers
            token_id = gate.tokens.verify_header(auth, "GET", "/flaky").token_id_hex
            assert await gate.l402.credits_remaining(token_id) == 1          # given back
            async with s.get(url + "/flaky", headers={"Authorization": auth}) as r:
                assert r.status == 200 and await r.text() == "ok"
                receipt = verify_receipt(r.headers["Payment-Receipt"], rt.receipts.pubkey_hex)
                assert r.headers["Payment-Credits-Remaining"] == "0"
            assert receipt["credits_remaining"] == 0 and receipt["token_id"] == token_id
            assert receipt["type"] == "request" and receipt["path"] == "/flaky"
            async with s.get(url + "/flaky", headers={"Authorization": auth}) as r:
                assert r.status == 402 and "Payment-Receipt" not in r.headers
                assert (await r.json(content_type=None))["error"] == "credits_exhausted"
            async with s.get(url + "/api/joke") as r:
                assert r.status == 402
                ch = parse_challenges(r.headers.getall("WWW-Authenticate"))[0]
            joke_auth = format_authorization(ch.macaroon, (await payer.pay(ch.invoice)).preimage)
            async with s.get(url + "/api/joke", headers={"Authorization": joke_auth}) as r:
                assert r.status == 200 and await r.text() == "joke"
                assert verify_receipt(r.headers["Payment-Receipt"], rt.receipts.pubkey_hex)["credits_remaining"] == 0
        assert calls == [1, 1, 2] and await gate.l402.credits_remaining(token_id) == 0
    finally:
        await runner.cleanup()
        await rt.store.close()
