"""The sidecar over real HTTP on 127.0.0.1, with the sandbox backend."""
import asyncio
import base64
import json
import stat

import aiohttp
import bolt11

from micropay.l402.wire import format_authorization, parse_challenges
from micropay.l402.macaroon import Macaroon
from micropay.core.receipts import verify_receipt
from micropay.store.stream_usage import StreamUsageRepository
from micropay.l402.tokens import decode_identifier

from ..conftest import FakeClock, make_config, payment_receipt, serve_app, start_sidecar


async def get(url, **kw):
    async with aiohttp.ClientSession() as s:
        async with s.request(kw.pop("method", "GET"), url, **kw) as r:
            return r.status, r.headers.copy(), await r.read()


async def buy(sc, path, method="GET"):
    """Get a challenge for `path`, pay it with the payer node; returns the Authorization value."""
    status, headers, body = await get(sc.url + path, method=method)
    assert status == 402, body
    ch = parse_challenges(headers.getall("WWW-Authenticate"))[0]
    paid = await sc.payer.pay(ch.invoice)
    return format_authorization(ch.macaroon, paid.preimage)


async def table_count(sc, table):
    await sc.rt.gate.challenger.writer.flush()     # the 402s' records are written a few ms after them
    row = await sc.rt.store._fetchrow(f"SELECT COUNT(*) FROM micropay_{table}", ())
    return row[0]


async def test_402_challenge_is_complete(sidecar):
    status, headers, body = await get(sidecar.url + "/api/joke")
    assert status == 402
    assert headers["Content-Type"].startswith("application/problem+json")
    values = headers.getall("WWW-Authenticate")
    assert values[0].startswith('L402 version="0", token="') and values[1].startswith("LSAT macaroon=")
    doc = json.loads(body)
    assert doc["error"] == "payment_required" and doc["price_msat"] == 1000
    assert doc["resource"] == "GET /api/joke" and doc["credits"] == 1
    inv = bolt11.decode(doc["invoice"])
    assert inv.amount_msat == 1000 and inv.payment_hash == doc["payment_hash"]
    ph, _ = decode_identifier(Macaroon.deserialize(doc["macaroon"]).identifier)
    assert ph.hex() == doc["payment_hash"]
    assert doc["expires_at"] == inv.date + inv.expiry


async def test_paid_request_gets_receipt_and_single_use(sidecar):
    auth = await buy(sidecar, "/api/joke")
    status, headers, body = await get(sidecar.url + "/api/joke", headers={"Authorization": auth})
    assert status == 200 and "joke" in json.loads(body)
    _, _, wk = await get(sidecar.url + "/.well-known/l402.json")
    receipt = verify_receipt(headers["Payment-Receipt"], json.loads(wk)["receipt_pubkey"])
    assert receipt["type"] == "request" and receipt["credits_remaining"] == 0
    assert receipt["path"] == "/api/joke"
    before = await table_count(sidecar, "challenges")
    status, headers, body = await get(sidecar.url + "/api/joke", headers={"Authorization": auth})
    doc = json.loads(body)
    assert status == 402 and doc["error"] == "credits_exhausted"
    # bLIP-26 reusing credentials: a spent credential is answered with a fresh challenge
    fresh = parse_challenges(headers.getall("WWW-Authenticate"))[0]
    assert fresh.invoice == doc["invoice"] and doc["price_msat"] == 1000
    assert fresh.macaroon != auth[5:].split(":")[0]
    assert await table_count(sidecar, "challenges") == before + 1


async def test_prepaid_credits(sidecar):
    auth = await buy(sidecar, "/api/fortune/1")
    remaining = []
    for i in range(3):
        status, headers, _ = await get(f"{sidecar.url}/api/fortune/{i}", headers={"Authorization": auth})
        assert status == 200
        remaining.append(headers["Payment-Credits-Remaining"])
    assert remaining == ["2", "1", "0"]
    status, _, _ = await get(sidecar.url + "/api/fortune/9", headers={"Authorization": auth})
    assert status == 402


async def test_pass_token_is_stateless_and_expires(tmp_path):
    clock = FakeClock()
    sc = await start_sidecar(make_config(tmp_path), clock=clock)
    try:
        auth = await buy(sc, "/api/echo")
        for method in ("GET", "POST", "GET"):
            status, headers, _ = await get(sc.url + "/api/echo", method=method, headers={"Authorization": auth})
            assert status == 200
            assert verify_receipt(headers["Payment-Receipt"])["type"] == "pass"
        assert await table_count(sc, "credits") == 0          # no store writes on this path
        clock.advance(3601)
        status, headers, body = await get(sc.url + "/api/echo", headers={"Authorization": auth})
        assert status == 402 and json.loads(body)["error"] == "token_expired"
        assert parse_challenges(headers.getall("WWW-Authenticate"))[0].invoice == json.loads(body)["invoice"]
    finally:
        await sc.runner.cleanup()


async def test_bad_credentials_get_a_fresh_challenge_and_spend_nothing(sidecar):
    """bLIP-26's server flow: a request whose L402 is "invalid or insufficient in some
    way" gets a 402 with a new credential and invoice; its own example of a malformed
    credential (a 24-hex preimage) included. The body's `error` says what was wrong."""
    good = await buy(sidecar, "/api/fortune/1")
    mac_b64, preimage = good[5:].split(":")
    mac = Macaroon.deserialize(mac_b64)
    urlsafe = base64.urlsafe_b64encode(mac.to_bytes()).decode().rstrip("=")
    forged = Macaroon(mac.identifier, mac.caveats[:-1] + (b"credits=999",), mac.signature, mac.location)
    wider = mac.add_first_party_caveat(b"path=/api/joke")
    credits = await table_count(sidecar, "credits")
    cases = [
        ("L402 AGIAJEemVQUTEyNCR0exk7ek90Cg==:1234abcd1234abcd1234abcd", "malformed_credential"),  # bLIP-26's
        ("L402 garbage", "malformed_credential"),
        ("L402 " + "A" * 10_000 + ":" + "0" * 64, "malformed_credential"),
        (f"L402 {mac_b64}:nothex", "malformed_credential"),
        (f"L402 AAAA:{preimage}", "malformed_credential"),
        (f"L402 {mac_b64}:{'00' * 32}", "invalid_credential"),
        (f"L402 {forged.serialize()}:{preimage}", "invalid_credential"),
        (f"L402 {wider.serialize()}:{preimage}", "invalid_credential"),
    ]
    invoices = set()
    for header, code in cases:
        status, headers, body = await get(sidecar.url + "/api/fortune/1", headers={"Authorization": header})
        doc = json.loads(body)
        assert (status, doc["error"]) == (402, code), header[:40]
        assert headers["Content-Type"].startswith("application/problem+json")
        assert headers["Cache-Control"] == "no-store"
        (fresh,) = [c for c in parse_challenges(headers.getall("WWW-Authenticate")) if c.scheme == "L402"]
        assert fresh.invoice == doc["invoice"] and fresh.macaroon not in header
        invoices.add(fresh.invoice)
    assert len(invoices) == len(cases)                         # a new invoice every time
    # a token for one route does not open another: a challenge for that one instead
    status, _, body = await get(sidecar.url + "/api/echo", headers={"Authorization": good})
    assert status == 402 and json.loads(body)["error"] == "invalid_credential"
    assert await table_count(sidecar, "credits") == credits   # nothing spent
    # and the genuine one, in LSAT and URL-safe form, still works
    status, _, _ = await get(sidecar.url + "/api/fortune/2", headers={"Authorization": f"LSAT {urlsafe}:{preimage}"})
    assert status == 200


async def test_fresh_challenges_rate_limit_and_pending_bound(tmp_path):
    routes = "".join(f'[[routes]]\npath = "/api/fortune/r{i}"\nprice_msat = {100 + i}\n' for i in range(8))
    toml = (f'demo = true\ntrust_forwarded_for = true\n[challenges]\nper_client_per_minute = 3\n'
            f'max_pending = 40\n{routes}')
    sc = await start_sidecar(make_config(tmp_path, toml))

    def as_client(n):
        return {"headers": {"X-Forwarded-For": f"192.0.2.{n}"}}
    try:
        first = json.loads((await get(sc.url + "/api/fortune/r0", **as_client(1)))[2])["payment_hash"]
        again = json.loads((await get(sc.url + "/api/fortune/r0", **as_client(1)))[2])["payment_hash"]
        assert again != first                                 # never the same challenge twice
        statuses = [(await get(f"{sc.url}/api/fortune/r{i}", **as_client(1)))[0] for i in range(1, 3)]
        assert statuses == [402, 429]                         # 3 new invoices a minute
        status, headers, body = await get(sc.url + "/api/fortune/r5", **as_client(1))
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert json.loads(body)["error"] == "rate_limited"
        from micropay.core.ratelimit import TokenBucket
        sc.rt.gate.challenger.bucket = TokenBucket(1000)
        # one client holds at most a tenth of max_pending (4 here), whatever it asks for
        statuses = [(await get(f"{sc.url}/api/fortune/r{i}", **as_client(1)))[0] for i in range(3, 8)]
        assert statuses == [402, 429, 429, 429, 429]
        # the store-wide bound, reached by many clients
        for n in range(2, 11):
            for i in range(4):
                await get(f"{sc.url}/api/fortune/r{i}", **as_client(n))
        assert await table_count(sc, "challenges") == 40
        status, _, body = await get(sc.url + "/api/fortune/r7", **as_client(99))
        assert status == 503 and json.loads(body)["error"] == "too_many_pending_challenges"
    finally:
        await sc.runner.cleanup()


async def test_free_tier(tmp_path):
    toml = 'demo = true\n[[routes]]\npath = "/api/joke"\nprice_msat = 10\nfree_per_hour = 2\n'
    sc = await start_sidecar(make_config(tmp_path, toml))
    try:
        assert [(await get(sc.url + "/api/joke"))[0] for _ in range(3)] == [200, 200, 402]
    finally:
        await sc.runner.cleanup()


async def test_well_known_and_metrics(sidecar):
    auth = await buy(sidecar, "/api/joke")
    await get(sidecar.url + "/api/joke", headers={"Authorization": auth})
    await get(sidecar.url + "/api/joke", headers={"Authorization": "L402 x"})
    for _ in range(50):
        if sidecar.rt.metrics.revenue_msat:
            break
        await asyncio.sleep(0.01)
    status, _, body = await get(sidecar.url + "/.well-known/l402.json")
    doc = json.loads(body)
    assert status == 200 and doc["service"] == "test" and doc["sandbox"] is True
    joke = next(r for r in doc["routes"] if r["path"] == "/api/joke")
    assert joke["price_msat"] == 1000 and joke["method"] == ["GET"]
    assert "services=test:0" in joke["caveats"]
    status, headers, body = await get(sidecar.url + "/metrics")   # private by default: it shows revenue
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(body)["error"] == "unauthorized"
    status, _, _ = await get(sidecar.url + "/metrics", headers={"Authorization": "Bearer wrong"})
    assert status == 401
    token_file = sidecar.rt.config.data_dir / "metrics.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    status, headers, text = await get(sidecar.url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    text = text.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'micropay_challenges_total{route="GET /api/joke"} 2' in text    # the malformed one got a 402 too
    assert 'micropay_paid_requests_total{route="GET /api/joke"} 1' in text
    assert 'micropay_rejections_total{reason="malformed_credential"} 1' in text
    assert "micropay_revenue_msat_total 1000" in text
    assert "micropay_gate_latency_seconds_count 3" in text


async def test_metrics_can_be_made_public(tmp_path):
    sc = await start_sidecar(make_config(tmp_path, "demo = true\n[metrics]\npublic = true\n"))
    try:
        status, _, text = await get(sc.url + "/metrics")
        assert status == 200 and b"micropay_settlements_total" in text
        assert not (sc.rt.config.data_dir / "metrics.token").exists()
    finally:
        await sc.runner.cleanup()


async def test_a_stopping_sidecar_writes_its_challenge_records_before_it_stops_hearing_settlements(
        tmp_path, monkeypatch):
    """Records still gathering when a sidecar stops are written while its settlement
    router still runs: another replica that hears of a payment on one of them meanwhile
    finds its record (and a stopped router never misses it either)."""
    from micropay.lightning.sandbox import SandboxNetwork
    from micropay.seller import challenger
    monkeypatch.setattr(challenger, "RECORD_GATHER_S", 30.0)     # still gathering when the stop begins
    net = SandboxNetwork()
    node = net.add_node("merchant")
    inner, unwritten_when_stopped = node.settlements, []

    async def watched(after_pay_index):
        try:
            async for s in inner(after_pay_index):
                yield s
        except asyncio.CancelledError:
            writer = sc.rt.gate.challenger.writer
            unwritten_when_stopped.append(sum(len(r) for r in writer.unwritten_by_client().values()))
            raise
    node.settlements = watched
    sc = await start_sidecar(make_config(tmp_path), node=node, sandbox=net)
    hashes = []
    for _ in range(3):
        status, _, body = await get(sc.url + "/api/joke")
        assert status == 402
        hashes.append(json.loads(body)["payment_hash"])
    assert sc.rt.gate.challenger.writer.holds(hashes[0])
    await sc.runner.cleanup()
    assert unwritten_when_stopped == [0]


async def test_settlements_marked_paid_and_caught_up_after_restart(tmp_path):
    from micropay.lightning.sandbox import SandboxNetwork
    cfg = make_config(tmp_path)
    net = SandboxNetwork()
    node = net.add_node("merchant")
    sc = await start_sidecar(cfg, node=node, sandbox=net)
    status, _, body = await get(sc.url + "/api/joke")
    first = json.loads(body)
    status, _, body = await get(sc.url + "/api/echo")
    second = json.loads(body)
    await sc.payer.pay(first["invoice"])
    for _ in range(100):
        rec = await sc.rt.l402.get_challenge(first["payment_hash"])
        if rec is not None and rec.paid_at:
            break
        await asyncio.sleep(0.01)
    assert (await sc.rt.l402.get_challenge(first["payment_hash"])).status == "paid"
    assert verify_receipt(await payment_receipt(sc.rt.store, first["payment_hash"]))["amount_msat"] == 1000
    await sc.runner.cleanup()                       # sidecar down ...
    await sc.payer.pay(second["invoice"])           # ... a payment arrives meanwhile
    sc2 = await start_sidecar(cfg, node=node, sandbox=net)
    try:
        for _ in range(100):
            rec = await sc2.rt.l402.get_challenge(second["payment_hash"])
            if rec.paid_at:
                break
            await asyncio.sleep(0.01)
        assert rec.status == "paid" and rec.received_msat == 2000
        assert sc2.rt.metrics.settlements == 1       # the first was not counted again
    finally:
        await sc2.runner.cleanup()


async def test_decorator_mode_inside_an_app(tmp_path):
    from aiohttp import web

    from micropay.lightning.sandbox import SandboxNetwork
    from micropay.sidecar import Gate, create_runtime

    net = SandboxNetwork()
    cfg = make_config(tmp_path, "")
    rt = await create_runtime(cfg, node=net.add_node("m"))
    gate = Gate(tokens=rt.tokens, node=rt.node, store=rt.store, receipts=rt.receipts,
                limits=cfg.limits)
    app = web.Application()
    gate.install(app, middleware=False)

    @gate.require(price_msat=777, pass_s=60)
    async def report(request):
        return web.json_response({"report": request.match_info["name"]})

    app.router.add_get("/reports/{name}", report)
    runner, url = await serve_app(app)
    try:
        status, headers, body = await get(url + "/reports/q1")
        assert status == 402 and json.loads(body)["price_msat"] == 777
        ch = parse_challenges(headers.getall("WWW-Authenticate"))[0]
        paid = await net.add_node("p", 10_000).pay(ch.invoice)
        auth = format_authorization(ch.macaroon, paid.preimage)
        for name in ("q1", "q2"):                   # the pass covers the route pattern
            status, headers, body = await get(f"{url}/reports/{name}", headers={"Authorization": auth})
            assert status == 200 and json.loads(body) == {"report": name}
            assert "Payment-Receipt" in headers
    finally:
        await runner.cleanup()
        await rt.store.close()


async def test_middleware_mode_in_someone_elses_app(tmp_path):
    from aiohttp import web

    from micropay.lightning.sandbox import SandboxNetwork
    from micropay.seller.pricing import Pricing, RouteRule
    from micropay.sidecar import Gate, create_runtime

    net = SandboxNetwork()
    rt = await create_runtime(make_config(tmp_path, ""), node=net.add_node("m"))
    gate = Gate(tokens=rt.tokens, node=rt.node, store=rt.store, receipts=rt.receipts,
                limits=rt.config.limits, pricing=Pricing([RouteRule(path="/paid/*", price_msat=50)]))
    app = web.Application()
    gate.install(app)

    async def hello(request):
        return web.Response(text="hi")

    app.router.add_get("/paid/x", hello)
    app.router.add_get("/free", hello)
    runner, url = await serve_app(app)
    try:
        assert (await get(url + "/free"))[0] == 200
        status, headers, _ = await get(url + "/paid/x")
        assert status == 402
        ch = parse_challenges(headers.getall("WWW-Authenticate"))[0]
        paid = await net.add_node("p", 1000).pay(ch.invoice)
        status, headers, body = await get(url + "/paid/x", headers={
            "Authorization": format_authorization(ch.macaroon, paid.preimage)})
        assert (status, body) == (200, b"hi") and "Payment-Receipt" in headers
    finally:
        await runner.cleanup()
        await rt.store.close()


async def test_metered_access_paid_by_an_incoming_stream(tmp_path):
    toml = 'demo = true\n[[routes]]\npath = "/api/joke"\nprice_msat = 1000\nstream_msat = 300\n'
    sc = await start_sidecar(make_config(tmp_path, toml))
    try:
        sid = "abc123" * 6
        hdr = {"X-Micropay-Stream": sid}
        status, _, body = await get(sc.url + "/api/joke", headers=hdr)
        assert status == 402 and json.loads(body)["error"] == "stream_balance_low"
        assert await table_count(sc, "challenges") == 0            # no invoice minted for it
        # what the plugin records when streamed keysends arrive
        await StreamUsageRepository(sc.rt.store).add_payment("ph1", sid, 1, 1000, 1, "micropay")
        results = [await get(sc.url + "/api/joke", headers=hdr) for _ in range(4)]
        assert [r[0] for r in results] == [200, 200, 200, 402]
        assert [r[1].get("Payment-Stream-Balance") for r in results[:3]] == ["700", "400", "100"]
        assert verify_receipt(results[0][1]["Payment-Receipt"])["type"] == "stream"
        status, _, body = await get(sc.url + "/api/joke", headers={"X-Micropay-Stream": "bad id!"})
        assert status == 400
        # a session another podcast app streams to, keyed by public values: never spendable
        await StreamUsageRepository(sc.rt.store).add_payment("ph2", "Fountain/feed-42", 1, 100_000, 1, "Fountain")
        status, _, body = await get(sc.url + "/api/joke", headers={"X-Micropay-Stream": "Fountain/feed-42"})
        assert status == 400 and "public values" in json.loads(body)["detail"]
        assert await StreamUsageRepository(sc.rt.store).balance("Fountain/feed-42") == (100_000, 0)
    finally:
        await sc.runner.cleanup()


def _bigsize(n: int) -> bytes:
    return bytes([n]) if n < 0xFD else b"\xfd" + n.to_bytes(2, "big") if n < 0x10000 else b"\xfe" + n.to_bytes(4, "big")


def _keysend_onion(record: dict) -> dict:
    """An htlc_accepted onion as lightningd gives it: a length-prefixed TLV payload."""
    value = json.dumps(record).encode()
    tlv = _bigsize(7629169) + _bigsize(len(value)) + value
    return {"payload": (_bigsize(len(tlv)) + tlv).hex()}


def test_only_payer_chosen_secret_ids_make_spendable_sessions():
    from micropay.streams.attribution import attribute
    htlc = {"payment_hash": "aa" * 32, "amount_msat": "1000msat"}
    mine = attribute(_keysend_onion({"action": "stream", "app_name": "micropay",
                                     "micropay_stream_id": "0f" * 16, "micropay_seq": 3}), htlc)
    assert (mine.stream_id, mine.seq, mine.amount_msat, mine.spendable) == ("0f" * 16, 3, 1000, True)
    assert mine.shown_id == "0f0f0f0f…"
    podcast = attribute(_keysend_onion({"action": "boost", "app_name": "Fountain", "feedID": 42}), htlc)
    assert (podcast.stream_id, podcast.spendable) == ("Fountain/42", False)
    # a record naming a public value as its "secret" gets a public key, not that value
    named = attribute(_keysend_onion({"app_name": "x", "micropay_stream_id": "Fountain/42"}), htlc)
    assert named.stream_id == "x/unknown" and not named.spendable
    assert attribute(_keysend_onion({"action": "stream", "x": "[" * 10_000}), htlc) is not None
    assert attribute({"payload": "ff"}, htlc) is None and attribute({}, htlc) is None


async def test_a_restarted_sandbox_never_hands_out_an_invoice_it_forgot(tmp_path):
    cfg = make_config(tmp_path)
    first = await start_sidecar(cfg)
    _, _, body = await get(first.url + "/api/joke")
    old = json.loads(body)["payment_hash"]
    await first.runner.cleanup()
    second = await start_sidecar(cfg)              # same store, a new in-memory network
    try:
        status, headers, body = await get(second.url + "/api/joke")
        doc = json.loads(body)
        assert status == 402 and doc["payment_hash"] != old
        paid = await second.payer.pay(doc["invoice"])   # payable on the network that is up now
        assert paid.payment_hash == doc["payment_hash"]
    finally:
        await second.runner.cleanup()


async def test_a_dynamic_price_binds_the_token_to_its_query(tmp_path):
    """A price hook next to the config file is found without PYTHONPATH; a token bought
    at the price for ?n=1 does not open ?n=50, which the hook prices 50 times higher."""
    from micropay.client.payer import Budget, L402Client, NodeWallet, TokenCache
    from micropay.seller.configfile import load_config
    (tmp_path / "shop_prices.py").write_text(
        "def per_item(request, rule):\n    return 1000 * int(request.query.get('n', '1'))\n")
    (tmp_path / "shop.toml").write_text(
        'demo = true\n[[routes]]\nmethod = "GET"\npath = "/api/echo"\nprice_hook = "shop_prices:per_item"\n'
        'pass_s = 600\n')
    cfg = load_config(tmp_path / "shop.toml").with_overrides(data_dir=tmp_path / "data")
    sc = await start_sidecar(cfg)
    try:
        status, headers, body = await get(sc.url + "/api/echo?n=1")
        assert status == 402 and json.loads(body)["price_msat"] == 1000
        ch = parse_challenges(headers.getall("WWW-Authenticate"))[0]
        auth = format_authorization(ch.macaroon, (await sc.payer.pay(ch.invoice)).preimage)
        assert (await get(sc.url + "/api/echo?n=1", headers={"Authorization": auth}))[0] == 200
        status, _, body = await get(sc.url + "/api/echo?n=50", headers={"Authorization": auth})
        doc = json.loads(body)       # refused, with a challenge at the n=50 price
        assert status == 402 and "another query" in doc["detail"] and doc["price_msat"] == 50_000
        # the client knows: it pays the n=50 price for n=50 instead of sending the n=1 token
        client = L402Client(NodeWallet(sc.payer), Budget(max_per_request_msat=None), TokenCache(tmp_path / "c.json"))
        assert (await client.get(sc.url + "/api/echo?n=2")).paid_msat == 2000
        assert (await client.get(sc.url + "/api/echo?n=3")).paid_msat == 3000
        assert (await client.get(sc.url + "/api/echo?n=2")).paid_msat == 0        # its own pass, reused
    finally:
        await sc.runner.cleanup()
