"""Lightning Addresses served by the sidecar, on the sandbox: the payRequest, the
callback's invoice (amount, description hash), refusals in LNURL's own shape, LUD-21
verify, tips stored with their comment, `tip.received` live and as a webhook, per-client
bounds, and the third-party `lnurl` package reading it all."""
from __future__ import annotations

import asyncio
import hashlib
import json
import time

import aiohttp
import pytest

from micropay.games.apikeys import create_key

from ..conftest import make_config, start_sidecar

TOML = """
service = "creator"
[creators]
tip_expiry_s = 600
[[addresses]]
name = "alice"
description = "Tips for Alice's streams"
min_sendable_msat = 1000
max_sendable_msat = 5000000
comment_allowed = 80
success_message = "Thanks for the tip!"
[[addresses]]
name = "quiet"
description = "No comments please"
"""


async def get(url: str, **params):
    async with aiohttp.ClientSession() as s:
        async with s.get(url, params=params or None, allow_redirects=False) as r:
            return r.status, json.loads(await r.read()), r.headers.copy()


@pytest.fixture
async def creator(tmp_path):
    sc = await start_sidecar(make_config(tmp_path, TOML))
    key, _ = await create_key(sc.rt.store, "overlay", ["tips:read", "events:read"])
    sc.key = key
    yield sc
    await sc.runner.cleanup()


async def test_pay_request_and_invoice_commit_to_the_metadata(creator):
    status, doc, headers = await get(f"{creator.url}/.well-known/lnurlp/alice")
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    assert doc["tag"] == "payRequest" and doc["minSendable"] == 1000 and doc["maxSendable"] == 5000000
    assert doc["commentAllowed"] == 80 and "allowsNostr" not in doc
    meta = json.loads(doc["metadata"])
    assert ["text/plain", "Tips for Alice's streams"] in meta
    assert ["text/identifier", f"alice@127.0.0.1:{creator.port}"] in meta
    assert doc["callback"] == f"{creator.url}/lnurlp/alice/callback"

    status, ans, _ = await get(doc["callback"], amount="21000", comment="great stream")
    assert status == 200, ans
    assert ans["routes"] == [] and ans["successAction"] == {"tag": "message", "message": "Thanks for the tip!"}
    dec = await creator.rt.node.decode(ans["pr"])
    assert dec.amount_msat == 21000
    assert dec.description_hash == hashlib.sha256(doc["metadata"].encode()).hexdigest()
    # LUD-21: not settled yet, then settled with the preimage once paid
    status, v, _ = await get(ans["verify"])
    assert status == 200 and v == {"status": "OK", "settled": False, "preimage": None, "pr": ans["pr"]}
    paid = await creator.payer.pay(ans["pr"])
    for _ in range(100):
        status, v, _ = await get(ans["verify"])
        if v["settled"]:
            break
        await asyncio.sleep(0.02)
    assert v["settled"] is True and v["preimage"] == paid.preimage
    # the tip is stored with its comment
    status, page, _ = await get_auth(creator, "/v1/tips")
    assert status == 200
    [tip] = page["tips"]
    assert tip["address"] == "alice" and tip["status"] == "paid" and tip["comment"] == "great stream"
    assert tip["amount_msat"] == tip["received_msat"] == 21000 and tip["shares"] == []


async def get_auth(sc, path: str, **params):
    async with aiohttp.ClientSession() as s:
        async with s.get(sc.url + path, params=params or None, headers={"Authorization": f"Bearer {sc.key}"}) as r:
            return r.status, json.loads(await r.read()), r.headers.copy()


@pytest.mark.parametrize("params, status, reason", [
    ({}, 400, "amount is required"),
    ({"amount": "999"}, 400, "between 1000 and 5000000"),
    ({"amount": "5000001"}, 400, "between 1000 and 5000000"),
    ({"amount": "1.5"}, 400, "whole number"),
    ({"amount": "-5"}, 400, "whole number"),
    ({"amount": "2000", "comment": "x" * 81}, 400, "longer than 80"),
    ({"amount": "2000", "comment": "a\x00b"}, 400, "control characters"),
    ({"amount": "2000", "nostr": "{}"}, 400, "does not accept zaps"),
])
async def test_callback_refusals_are_lnurl_errors_and_leave_nothing(creator, params, status, reason):
    got, doc, headers = await get(f"{creator.url}/lnurlp/alice/callback", **params)
    assert got == status and doc["status"] == "ERROR" and reason in doc["reason"], doc
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert await creator.rt.store.query("SELECT COUNT(*) FROM micropay_tips") == [(0,)]


async def test_unknown_names_and_foreign_hashes(creator):
    status, doc, _ = await get(f"{creator.url}/.well-known/lnurlp/bob")
    assert status == 404 and doc["status"] == "ERROR" and "no Lightning Address" in doc["reason"]
    status, doc, _ = await get(f"{creator.url}/lnurlp/bob/callback", amount="2000")
    assert status == 404 and doc["status"] == "ERROR"
    status, doc, _ = await get(f"{creator.url}/lnurlp/quiet/callback", amount="2000", comment="hi")
    assert status == 400 and "takes no comments" in doc["reason"]
    # a hash of another address's tip is not verified through this one
    _, pr, _ = await get(f"{creator.url}/.well-known/lnurlp/alice")
    _, ans, _ = await get(pr["callback"], amount="3000")
    h = ans["verify"].rsplit("/", 1)[1]
    status, doc, _ = await get(f"{creator.url}/lnurlp/quiet/verify/{h}")
    assert status == 404 and doc["status"] == "ERROR"
    status, doc, _ = await get(f"{creator.url}/lnurlp/alice/verify/zz")
    assert status == 404 and doc["status"] == "ERROR"


async def test_tip_received_reaches_a_live_listener_fast(creator):
    """An overlay listening on /v1/events sees tip.received within 50 ms of settlement."""
    _, pr, _ = await get(f"{creator.url}/.well-known/lnurlp/alice")
    _, ans, _ = await get(pr["callback"], amount="42000", comment="hello overlay")
    seen: asyncio.Future = asyncio.get_running_loop().create_future()

    async def listen():
        async with aiohttp.ClientSession() as s:
            async with s.get(creator.url + "/v1/events", headers={"Authorization": f"Bearer {creator.key}"}) as r:
                assert r.status == 200
                ready.set()
                async for line in r.content:
                    text = line.decode().strip()
                    if text.startswith("data:"):
                        ev = json.loads(text[5:])
                        if ev["type"] == "tip.received":
                            seen.set_result((time.perf_counter(), ev))
                            return
    ready = asyncio.Event()
    task = asyncio.create_task(listen())
    await ready.wait()
    await asyncio.sleep(0.1)
    settled_at = []
    real = creator.rt.creators.service.on_settlement

    async def timed(s):
        settled_at.append(time.perf_counter())
        return await real(s)
    creator.rt.creators.service.on_settlement = timed
    # the router holds the bound method: re-register through the router's table
    for i, (prefix, handler) in enumerate(_router_routes(creator)):
        if prefix == "micropay-tip-":
            _router_routes(creator)[i] = (prefix, timed)
    await creator.payer.pay(ans["pr"])
    at, ev = await asyncio.wait_for(seen, 5)
    task.cancel()
    tip = ev["data"]["tip"]
    assert tip["comment"] == "hello overlay" and tip["received_msat"] == 42000 and tip["status"] == "paid"
    if settled_at:
        assert at - settled_at[0] < 0.05, f"{(at - settled_at[0]) * 1000:.1f} ms from settlement to the event"


def _router_routes(sc):
    for task in asyncio.all_tasks():
        if task.get_name() == "micropay-settlements":
            coro = task.get_coro()
            router = coro.cr_frame.f_locals.get("self")
            return router._routes
    return []


async def test_per_client_bound_on_unpaid_tips(tmp_path):
    from micropay.seller.config import ChallengeLimits
    sc = await start_sidecar(make_config(tmp_path, TOML, limits=ChallengeLimits(per_client_per_minute=1000,
                                                                                max_pending=100,
                                                                                max_pending_per_client=3)))
    try:
        codes = []
        for _ in range(5):
            status, doc, headers = await get(f"{sc.url}/lnurlp/alice/callback", amount="2000")
            codes.append(status)
        assert codes == [200, 200, 200, 429, 429]
        assert "Retry-After" in headers and doc["status"] == "ERROR"
        assert await sc.rt.store.query("SELECT COUNT(*) FROM micropay_tips") == [(3,)]
    finally:
        await sc.runner.cleanup()


async def test_per_client_rate(tmp_path):
    from micropay.seller.config import ChallengeLimits
    sc = await start_sidecar(make_config(tmp_path, TOML, limits=ChallengeLimits(per_client_per_minute=2)))
    try:
        codes = [(await get(f"{sc.url}/lnurlp/alice/callback", amount="2000"))[0] for _ in range(3)]
        assert codes == [200, 200, 429]
    finally:
        await sc.runner.cleanup()


async def test_third_party_lnurl_package_reads_the_address(creator):
    """LNbits' `lnurl` package (PyPI) parses our payRequest and callback answer and checks
    the description hash. Its address parser refuses host:port, so the URL is built here."""
    lnurl = pytest.importorskip("lnurl", reason="the lnurl test extra is not installed")
    pay = await lnurl.handle(f"{creator.url}/.well-known/lnurlp/alice", timeout=5)
    assert isinstance(pay, lnurl.LnurlPayResponse)
    assert pay.minSendable == 1000 and pay.maxSendable == 5000000 and pay.commentAllowed == 80
    assert pay.metadata.text == "Tips for Alice's streams"
    action = await lnurl.execute_pay_request(pay, 7000, comment="via lnurl", timeout=5)
    assert isinstance(action, lnurl.LnurlPayActionResponse)
    dec = await creator.rt.node.decode(str(action.pr))
    assert dec.amount_msat == 7000
    assert dec.description_hash == pay.metadata.h
    [(comment,)] = await creator.rt.store.query("SELECT comment FROM micropay_tips")
    assert comment == "via lnurl"


async def test_the_tips_api_is_in_openapi_and_keeps_to_it(creator):
    from micropay.games.http.openapi import document

    from ..games.test_openapi import API_PREFIXES, Contract
    doc = document(creator.rt.games.cfg)
    routes = {(r.resource.canonical, r.method.lower()) for r in creator.runner.app.router.routes()
              if r.resource and r.resource.canonical.startswith(API_PREFIXES) and r.method != "HEAD"}
    assert routes == {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert {"/v1/tips", "/v1/tips/{id}"} <= set(doc["paths"])
    _, pr, _ = await get(f"{creator.url}/.well-known/lnurlp/alice")
    _, ans, _ = await get(pr["callback"], amount="3000", comment="openapi")
    await creator.payer.pay(ans["pr"])
    c = Contract(doc)

    async def call(template, path, expect, headers=None):
        hdrs = {"Authorization": f"Bearer {creator.key}"} if headers is None else headers
        async with aiohttp.ClientSession() as s:
            async with s.get(creator.url + path, headers=hdrs) as r:
                raw = await r.read()
                c.check(template, "GET", r.status, r.headers.get("Content-Type", ""), raw)
                assert r.status == expect, raw
                return json.loads(raw)
    page = await call("/v1/tips", "/v1/tips?limit=1", 200)
    await call("/v1/tips/{id}", f"/v1/tips/{page['tips'][0]['id']}", 200)
    await call("/v1/tips/{id}", "/v1/tips/tip_nope", 404)
    await call("/v1/tips", "/v1/tips?limit=0", 400)
    await call("/v1/tips", "/v1/tips?status=lost", 400)
    await call("/v1/tips", "/v1/tips?cursor=zz~zz", 400)
    await call("/v1/tips", "/v1/tips", 401, headers={})
    other, _ = await create_key(creator.rt.store, "no-tips", ["purchases:read"])
    await call("/v1/tips", "/v1/tips", 403, headers={"Authorization": f"Bearer {other}"})


async def test_tips_pages_newest_first_without_gaps(creator):
    _, pr, _ = await get(f"{creator.url}/.well-known/lnurlp/alice")
    made = []
    for i in range(5):
        _, ans, _ = await get(pr["callback"], amount=str(1000 + i))
        made.append(ans["pr"])
    seen, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        status, page, _ = await get_auth(creator, "/v1/tips", **params)
        assert status == 200 and len(page["tips"]) <= 2
        seen += [t["bolt11"] for t in page["tips"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(made) and len(seen) == 5
    status, page, _ = await get_auth(creator, "/v1/tips", address="quiet")
    assert status == 200 and page["tips"] == []
    status, page, _ = await get_auth(creator, "/v1/tips", status="pending")
    assert len(page["tips"]) == 5


async def test_expired_tips_are_deleted_a_day_later(tmp_path):
    from ..conftest import FakeClock
    from micropay.creators.service import KEEP_EXPIRED_S
    clock = FakeClock(float(int(time.time())))
    sc = await start_sidecar(make_config(tmp_path, TOML), clock=clock)
    try:
        creators = sc.rt.creators.service
        _, pr, _ = await get(f"{sc.url}/.well-known/lnurlp/alice")
        for amount in ("2000", "3000"):
            status, ans, _ = await get(pr["callback"], amount=amount)
            assert status == 200
            clock.advance(1)                   # listed newest first: the two must not share a second
        await sc.payer.pay(ans["pr"])          # the second one is paid
        for _ in range(100):
            if (await creators.list(status="paid"))["tips"]:
                break
            await asyncio.sleep(0.02)
        clock.advance(601)
        assert await creators.expire_due() == 1
        assert [t["status"] for t in (await creators.list())["tips"]] == ["paid", "expired"]
        clock.advance(KEEP_EXPIRED_S)
        await creators.expire_due()
        assert [t["status"] for t in (await creators.list())["tips"]] == ["paid"]      # paid tips stay
    finally:
        await sc.runner.cleanup()


@pytest.mark.parametrize("extra, why", [
    ('success_url = "https://elsewhere.example/thanks"', "must be on the domain of [creators] public_url"),
    ('success_message = "x"\nsuccess_url = "https://pay.example/t"', "not both"),
    ('comment_allowed = 2001', "comment_allowed"),
    ('splits = [{ destination = "nobody", share = 1 }]', "must be a node id"),
    ('splits = [{ destination = "a@b.example", share = 0 }]', "share"),
    ('name = "Bad Name"', "name"),
    ('max_sendable_msat = 10', "at least min_sendable_msat"),
    ('image_file = "big.png"', "larger than 32768 bytes"),
])
def test_bad_address_config_is_refused_with_its_key(tmp_path, extra, why):
    from micropay.core.errors import ConfigError
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + b"\0" * 40_000)
    text = ('[creators]\npublic_url = "https://pay.example"\n[[addresses]]\n'
            + ('' if extra.startswith("name") else 'name = "alice"\n') + 'description = "d"\n' + extra + "\n")
    path = tmp_path / "c.toml"
    path.write_text(text)
    from micropay.seller.configfile import load_config
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert why in err.value.message and "addresses[0]" in err.value.message, err.value.message


def test_a_success_url_on_the_public_domain_is_taken(tmp_path):
    from micropay.seller.configfile import load_config
    path = tmp_path / "c.toml"
    path.write_text('[creators]\npublic_url = "https://pay.example"\n[[addresses]]\nname = "alice"\n'
                    'description = "d"\nsuccess_url = "https://pay.example/thanks"\n')
    a = load_config(path).creators.addresses[0]
    assert a.success_action == {"tag": "url", "description": "Thank you!", "url": "https://pay.example/thanks"}


async def test_tip_received_goes_out_as_a_signed_webhook_and_over_the_websocket(tmp_path):
    """The webhook endpoint receives the signed tip.received (checked with the receiver's
    own verification helper), and a WebSocket listener gets the same event."""
    from aiohttp import web
    from micropay.games.signing import verify_webhook
    from ..conftest import serve_app
    got: list[dict] = []
    hook = web.Application()

    async def receive(request):
        body = await request.read()
        secrets = (tmp_path / "data" / "webhook-overlay.secret").read_text().split()
        got.append(verify_webhook(body, request.headers.get("Micropay-Signature"), secrets))
        return web.Response(status=204)
    hook.router.add_post("/hook", receive)
    hook_runner, hook_url = await serve_app(hook)
    toml = TOML + f'[[webhooks]]\nname = "overlay"\nurl = "{hook_url}/hook"\nevents = ["tip.received"]\n'
    sc = await start_sidecar(make_config(tmp_path, toml))
    key, _ = await create_key(sc.rt.store, "overlay", ["events:read"])
    try:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"{sc.url}/v1/ws", headers={"Authorization": f"Bearer {key}"}) as ws:
                _, pr, _ = await get(f"{sc.url}/.well-known/lnurlp/alice")
                _, ans, _ = await get(pr["callback"], amount="9000", comment="on the socket")
                await sc.payer.pay(ans["pr"])
                msg = await asyncio.wait_for(ws.receive_json(), 5)
        assert msg["type"] == "tip.received" and msg["data"]["tip"]["comment"] == "on the socket"
        for _ in range(250):
            if got:
                break
            await asyncio.sleep(0.02)
        assert [e["type"] for e in got] == ["tip.received"]
        assert got[0]["data"]["tip"]["received_msat"] == 9000 and got[0]["data"]["tip"]["address"] == "alice"
    finally:
        await sc.runner.cleanup()
        await hook_runner.cleanup()
