"""Payment sessions (draft-lightning-session) on the sidecar, over HTTP on 127.0.0.1 with
the sandbox backend and a real upstream: open, per-unit spending (per request, and per
SSE event of a proxied stream), top-up mid-stream, close with a refund that reaches the
payer's wallet, idle close, replays, and bad credentials."""
import asyncio
import json
import os

import aiohttp
import pytest
from aiohttp import web

from micropay.payment import scheme as pa
from micropay.client.payer import Budget, L402Client, NodeWallet
from micropay.client.sessions import PaymentSession
from micropay.store.sessions import RefundStatus, SessionStatus

from ..conftest import make_config, serve_app, start_sidecar

UNIT_MSAT = 2000
DEPOSIT_UNITS = 5          # /gen's deposit
ONE_UNITS = 20             # /one's: `session = true`, the default


async def start_upstream():
    seen = {"gen": [], "one": 0, "headers": []}

    async def gen(request):
        n = int(request.query.get("n", "8"))
        seen["headers"].append(dict(request.headers))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        sent = []
        for i in range(n):
            await resp.write(f"data: {json.dumps({'i': i})}\n\n".encode())
            sent.append(i)
            seen["gen"] = sent
            await asyncio.sleep(0)
        await resp.write(b": keep-alive comment\n\ndata: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def one(request):
        seen["one"] += 1
        seen["headers"].append(dict(request.headers))
        return web.json_response({"n": seen["one"]})

    app = web.Application()
    app.router.add_get("/gen", gen)
    app.router.add_get("/one", one)
    runner, url = await serve_app(app)
    return runner, url, seen


def routes(up_url: str, *, hold_s: int = 5, idle_s: int = 300) -> str:
    return f"""
service = "llm"
upstream = "{up_url}"
[[routes]]
method = "GET"
path = "/gen"
price_msat = {UNIT_MSAT}
description = "tokens"
[routes.session]
deposit_units = {DEPOSIT_UNITS}
hold_s = {hold_s}
idle_timeout_s = {idle_s}
unit_type = "chunk"
[[routes]]
method = "GET"
path = "/one"
price_msat = {UNIT_MSAT}
session = true
"""


@pytest.fixture
async def env(tmp_path):
    up_runner, up_url, seen = await start_upstream()
    sc = await start_sidecar(make_config(tmp_path, routes(up_url)))
    sc.seen = seen
    yield sc
    await sc.runner.cleanup()
    await up_runner.cleanup()


def client_for(sc, **budget) -> L402Client:
    return L402Client(NodeWallet(sc.payer), Budget(**{"max_per_request_msat": 10_000,
                                                      "max_per_host_per_day_msat": 10_000_000,
                                                      "max_total_msat": 10_000_000, **budget}))


async def fetch(url, auth=None):
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Authorization": auth} if auth else {}) as r:
            return r.status, r.headers.copy(), await r.read()


def session_offer(headers) -> pa.Challenge:
    found = [c for c in pa.parse_challenges(headers.getall("WWW-Authenticate", [])) if c.intent == "session"]
    assert len(found) == 1, headers.getall("WWW-Authenticate", [])
    return found[0]


async def deposit(sc, path="/one"):
    """A session challenge for `path`, its deposit paid by the payer; (challenge, preimage)."""
    status, headers, _ = await fetch(sc.url + path)
    assert status == 402
    ch = session_offer(headers)
    paid = await sc.payer.pay(pa.decode_request(ch)["depositInvoice"])
    return ch, paid.preimage


async def return_invoice(sc, amount_msat=None):
    # a fresh label each time (the node answers a label it knows with that invoice again)
    return (await sc.payer.create_invoice(amount_msat, f"ret-{os.urandom(8).hex()}-{amount_msat}", "refund",
                                          86400)).bolt11


async def opened(sc, path="/one"):
    """Open a session with a real request; (challenge, preimage, session id, bearer auth)."""
    ch, pre = await deposit(sc, path)
    auth = pa.format_session_credential(ch, {"action": "open", "preimage": pre,
                                             "returnInvoice": await return_invoice(sc)})
    status, headers, body = await fetch(sc.url + path, auth)
    assert status == 200, body
    sid = pa.decode_request(ch)["paymentHash"]
    bearer = pa.format_session_credential(ch, {"action": "bearer", "sessionId": sid, "preimage": pre})
    return ch, pre, sid, bearer


async def settle(sc):
    """Wait until the units the sidecar reserved but did not serve are back in the store
    (a busy session reserves more than one unit at a time: micropay/payment/sessions.py)."""
    ledger = sc.rt.gate.sessions
    await asyncio.sleep(ledger.lease_s + 0.05)
    await ledger.flush_leases()


def problem(body: bytes) -> dict:
    return json.loads(body)


# -- the challenge -------------------------------------------------------------------

async def test_a_session_route_offers_a_session_challenge_with_a_deposit_invoice(env):
    status, headers, body = await fetch(env.url + "/gen")
    assert status == 402 and headers["Cache-Control"] == "no-store"
    offers = headers.getall("WWW-Authenticate")
    assert len(offers) == 1 and offers[0].startswith("Payment ")     # no L402 for a session route
    ch = session_offer(headers)
    assert (ch.method, ch.intent, ch.realm) == ("lightning", "session", "llm")
    req = pa.decode_request(ch)
    assert req["amount"] == "2" and req["currency"] == "sat" and req["unitType"] == "chunk"
    assert req["depositAmount"] == str(UNIT_MSAT * DEPOSIT_UNITS // 1000) and req["idleTimeout"] == "300"
    inv = await env.payer.decode(req["depositInvoice"])
    assert inv.amount_msat == UNIT_MSAT * DEPOSIT_UNITS and inv.payment_hash == req["paymentHash"]
    assert pa.parse_rfc3339(ch.expires) <= inv.expires_at
    assert pa.unb64url(ch.request) == pa.jcs(req)                    # JCS, base64url without padding
    doc = problem(body)
    assert doc["deposit_msat"] == UNIT_MSAT * DEPOSIT_UNITS and "macaroon" not in doc


# -- a whole session, with the client ----------------------------------------------------

async def test_open_stream_top_up_twice_and_close_with_the_refund_at_the_payer(env):
    before = env.payer.balance_msat
    events = []
    async with PaymentSession(client_for(env), NodeWallet(env.payer), env.url + "/gen?n=12") as s:
        async for ev in s.stream():
            events.append(ev.json()["i"])
        assert s.top_ups == 2          # 12 events, 5 units a deposit: two top-ups mid-stream
    assert events == list(range(12))
    assert env.seen["gen"] == list(range(12))
    closed = s.closed
    assert closed is not None and closed["status"] == "closed" and closed["refundStatus"] == "succeeded"
    deposited = 3 * UNIT_MSAT * DEPOSIT_UNITS
    assert closed["refundSats"] * 1000 == deposited - 12 * UNIT_MSAT
    # what left the payer's wallet: the three deposits less the refund, exactly 12 units
    assert before - env.payer.balance_msat == 12 * UNIT_MSAT
    assert s.receipts[-1]["units"] == 12 and s.receipts[-1]["spent"] == 12 * UNIT_MSAT // 1000
    rec = await env.rt.gate.sessions.repo.get(s.session_id)
    assert rec.status == SessionStatus.CLOSED and rec.refund_status == RefundStatus.SUCCEEDED
    assert rec.spent_msat == 12 * UNIT_MSAT and rec.deposit_msat == deposited
    # the upstream never saw a credential, and got the session's deposit hash
    assert all("Authorization" not in h for h in env.seen["headers"])
    assert env.seen["headers"][0]["X-L402-Payment-Hash"] == s.session_id


async def test_the_plugins_fetch_reads_a_stream_on_a_session_and_closes_it(env, tmp_path):
    """micropay-fetch's session mode (the plugin's code, on the sandbox node): the events,
    two top-ups paid within budget, the session closed and the rest refunded to the node."""
    from micropay.plugin.fetch import fetch as plugin_fetch
    before = env.payer.balance_msat
    got = await plugin_fetch(env.payer, tmp_path, max_msat_default=10_000, day_budget_msat=100_000,
                             url=env.url + "/gen?n=12", session=True)
    assert [json.loads(e["data"])["i"] for e in got["events"]] == list(range(12)) and not got["truncated"]
    deposited = 3 * UNIT_MSAT * DEPOSIT_UNITS
    assert (got["top_ups"], got["amount_msat"], got["unit_msat"]) == (2, deposited, UNIT_MSAT)
    assert got["refund_status"] == "succeeded" and got["refund_msat"] == deposited - 12 * UNIT_MSAT
    assert before - env.payer.balance_msat == 12 * UNIT_MSAT
    rec = await env.rt.gate.sessions.repo.get(got["session_id"])
    assert rec.status == SessionStatus.CLOSED and rec.spent_msat == 12 * UNIT_MSAT
    # a unit price over the per-request budget: nothing paid, nothing opened
    from micropay.core.errors import BudgetExceeded
    with pytest.raises(BudgetExceeded):
        await plugin_fetch(env.payer, tmp_path, max_msat_default=UNIT_MSAT - 1, day_budget_msat=100_000,
                           url=env.url + "/gen?n=1", session=True)
    assert before - env.payer.balance_msat == 12 * UNIT_MSAT


async def test_bearer_requests_spend_one_unit_each_then_get_a_fresh_challenge(env):
    ch, pre, sid, bearer = await opened(env)
    served = 1                                   # the open request was the first unit
    while True:
        status, headers, body = await fetch(env.url + "/one", bearer)
        if status != 200:
            break
        served += 1
        receipt = pa.decode_object(headers["Payment-Receipt"])
        assert receipt["reference"] == sid and receipt["status"] == "success"
    assert served == ONE_UNITS and env.seen["one"] == ONE_UNITS
    assert status == 402
    doc = problem(body)
    assert doc["type"] == "https://paymentauth.org/problems/lightning/insufficient-balance"
    assert session_offer(headers).intent == "session"          # a fresh challenge to top up with
    # a top-up gives exactly one more deposit's units
    ch2, pre2 = await deposit(env)
    top = pa.format_session_credential(ch2, {"action": "topUp", "sessionId": sid, "topUpPreimage": pre2})
    status, headers, body = await fetch(env.url + "/one", top)
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert pa.decode_object(headers["Payment-Receipt"])["reference"] == sid
    assert env.seen["one"] == ONE_UNITS                    # a top-up serves nothing
    # the same top-up again: the first answer, and no second credit
    status, _, body = await fetch(env.url + "/one", top)
    assert status == 200 and json.loads(body) == {"status": "ok"}
    ok = [(await fetch(env.url + "/one", bearer))[0] for _ in range(ONE_UNITS + 2)]
    assert ok.count(200) == ONE_UNITS


async def test_close_refunds_once_and_then_every_action_is_refused_with_the_refund_named(env):
    """The draft: servers MUST reject any action on a closed session. A repeated close
    (the same credential, or under another challenge) is refused too, and its problem
    names the refund, so a client whose close answer was lost still learns it."""
    ch, pre, sid, bearer = await opened(env)
    await fetch(env.url + "/one", bearer)        # 2 units spent
    before = env.payer.balance_msat
    close = pa.format_session_credential(ch, {"action": "close", "sessionId": sid, "preimage": pre})
    status, headers, body = await fetch(env.url + "/one", close)
    assert status == 200
    expect = {"status": "closed", "refundSats": (ONE_UNITS - 2) * UNIT_MSAT // 1000,
              "refundStatus": "succeeded"}
    assert json.loads(body) == expect
    receipt = pa.decode_object(headers["Payment-Receipt"])
    assert receipt["refundSats"] == expect["refundSats"] and receipt["refundStatus"] == "succeeded"
    assert env.payer.balance_msat - before == (ONE_UNITS - 2) * UNIT_MSAT
    ch2, _ = await deposit(env)
    other = pa.format_session_credential(ch2, {"action": "close", "sessionId": sid, "preimage": pre})
    before = env.payer.balance_msat
    for again in (close, other, bearer):
        status, headers, body = await fetch(env.url + "/one", again)
        assert status == 402 and problem(body)["type"].endswith("/session-closed"), body
        assert problem(body)["refundSats"] == expect["refundSats"] and problem(body)["refundStatus"] == "succeeded"
        assert session_offer(headers).id not in (ch.id, ch2.id)         # a fresh challenge
    assert env.payer.balance_msat == before                                  # refunded once


async def test_concurrent_closes_refund_once_one_answer_and_the_rest_refused_alike(env):
    ch, pre, sid, bearer = await opened(env)
    before = env.payer.balance_msat
    close = pa.format_session_credential(ch, {"action": "close", "sessionId": sid, "preimage": pre})
    answers = await asyncio.gather(*(fetch(env.url + "/one", close) for _ in range(5)))
    statuses = sorted(a[0] for a in answers)
    assert statuses == [200, 402, 402, 402, 402], statuses
    for status, _, body in answers:
        if status == 402:
            assert problem(body)["type"].endswith("/session-closed")
    assert env.payer.balance_msat - before == (ONE_UNITS - 1) * UNIT_MSAT


async def test_a_close_with_nothing_left_skips_the_refund(env):
    ch, pre, sid, bearer = await opened(env)
    for _ in range(ONE_UNITS - 1):
        assert (await fetch(env.url + "/one", bearer))[0] == 200
    status, _, body = await fetch(env.url + "/one", pa.format_session_credential(
        ch, {"action": "close", "sessionId": sid, "preimage": pre}))
    assert status == 200 and json.loads(body) == {"status": "closed", "refundSats": 0, "refundStatus": "skipped"}


async def test_a_replayed_open_is_refused_and_spends_nothing(env):
    """The draft's Open Verification: a consumed challenge is rejected (docs/protocol.md
    says why this, and not the idempotent replay, is our answer)."""
    ch, pre = await deposit(env)
    auth = pa.format_session_credential(ch, {"action": "open", "preimage": pre,
                                             "returnInvoice": await return_invoice(env)})
    assert (await fetch(env.url + "/one", auth))[0] == 200
    served = env.seen["one"]
    status, headers, body = await fetch(env.url + "/one", auth)
    assert status == 402 and problem(body)["type"].endswith("/unknown-challenge")
    assert "bearer" in problem(body)["detail"]
    assert env.seen["one"] == served                              # the upstream saw nothing
    await settle(env)
    rec = await env.rt.gate.sessions.repo.get(pa.decode_request(ch)["paymentHash"])
    assert rec.deposit_msat == ONE_UNITS * UNIT_MSAT and rec.spent_msat == 1 * UNIT_MSAT


async def test_one_deposit_opens_one_session_or_tops_up_once(env):
    ch0, pre0, sid, _ = await opened(env)
    ch, pre = await deposit(env)
    top = pa.format_session_credential(ch, {"action": "topUp", "sessionId": sid, "topUpPreimage": pre})
    assert (await fetch(env.url + "/one", top))[0] == 200
    # the same deposit used to open a new session: refused, it was used
    reopen = pa.format_session_credential(ch, {"action": "open", "preimage": pre,
                                               "returnInvoice": await return_invoice(env)})
    status, _, body = await fetch(env.url + "/one", reopen)
    assert status == 402 and problem(body)["type"].endswith("/unknown-challenge")


# -- bad credentials --------------------------------------------------------------------

async def test_bad_session_credentials_get_a_402_with_the_drafts_problem_type(env):
    ch, pre = await deposit(env)
    sid = pa.decode_request(ch)["paymentHash"]
    ret = await return_invoice(env)
    cases = {
        "invalid-preimage": {"action": "open", "preimage": "00" * 32, "returnInvoice": ret},
        "invalid-return-invoice": {"action": "open", "preimage": pre,
                                   "returnInvoice": await return_invoice(env, 5000)},
        "malformed-credential": {"action": "open", "preimage": pre},
        "session-not-found": {"action": "bearer", "sessionId": pa.hashlib.sha256(b"x" * 32).hexdigest(),
                              "preimage": (b"x" * 32).hex()},
    }
    for kind, payload in cases.items():
        status, headers, body = await fetch(env.url + "/one", pa.format_session_credential(ch, payload))
        assert status == 402, kind
        assert problem(body)["type"] == f"https://paymentauth.org/problems/lightning/{kind}", (kind, body)
        assert session_offer(headers)                            # a fresh challenge each time
    for junk in ("Payment", "Payment !!!", "Payment " + pa.b64url(b"[]"),
                 pa.format_session_credential(ch, {"action": "dance", "preimage": pre})):
        status, _, body = await fetch(env.url + "/one", junk)
        assert status == 402 and problem(body)["type"].endswith("/malformed-credential"), junk
    # an altered challenge (the unit price lowered): not ours
    forged = pa.Challenge(ch.id, ch.realm, ch.method, ch.intent, pa.encode_object(
        dict(pa.decode_request(ch), amount="1")), ch.expires, ch.opaque)
    status, _, body = await fetch(env.url + "/one", pa.format_session_credential(
        forged, {"action": "open", "preimage": pre, "returnInvoice": ret}))
    assert status == 402 and problem(body)["type"].endswith("/unknown-challenge")
    # a challenge for /gen presented at /one
    ch_gen, pre_gen = await deposit(env, "/gen")
    status, _, body = await fetch(env.url + "/one", pa.format_session_credential(
        ch_gen, {"action": "open", "preimage": pre_gen, "returnInvoice": ret}))
    assert status == 402 and problem(body)["type"].endswith("/unknown-challenge")
    # a charge credential on a session route
    charge = pa.format_credential(ch, pre)
    status, _, body = await fetch(env.url + "/one", charge)
    assert status == 402
    # nothing of these opened a session
    assert await env.rt.gate.sessions.repo.get(sid) is None


# -- held streams ---------------------------------------------------------------------------

async def test_a_stream_without_a_top_up_ends_with_session_timeout(tmp_path):
    up_runner, up_url, seen = await start_upstream()
    sc = await start_sidecar(make_config(tmp_path, routes(up_url, hold_s=1)))
    try:
        ch, pre = await deposit(sc, "/gen")
        auth = pa.format_session_credential(ch, {"action": "open", "preimage": pre,
                                                 "returnInvoice": await return_invoice(sc)})
        status, _, body = await fetch(sc.url + "/gen?n=9", auth)
        assert status == 200
        text = body.decode()
        assert text.count('data: {"i"') == DEPOSIT_UNITS
        assert "event: payment-need-topup" in text and "event: session-timeout" in text
        need = text.split("event: payment-need-topup\ndata: ")[1].split("\n")[0]
        assert json.loads(need) == {"sessionId": pa.decode_request(ch)["paymentHash"],
                                    "balanceSpent": DEPOSIT_UNITS * UNIT_MSAT // 1000,
                                    "balanceRequired": UNIT_MSAT // 1000}
        assert "[DONE]" not in text
    finally:
        await sc.runner.cleanup()
        await up_runner.cleanup()


# -- the server's own close -------------------------------------------------------------------

async def test_an_idle_session_is_closed_by_the_server_and_refunded(tmp_path):
    up_runner, up_url, seen = await start_upstream()
    sc = await start_sidecar(make_config(tmp_path, routes(up_url, idle_s=1)))
    try:
        ch, pre, sid, bearer = await opened(sc, "/gen?n=1")       # /gen's idle timeout: 1 s
        before = sc.payer.balance_msat
        assert await sc.rt.gate.sessions.close_idle() == 0      # just used
        await asyncio.sleep(2.1)
        assert await sc.rt.gate.sessions.close_idle() == 1
        assert sc.payer.balance_msat - before == (DEPOSIT_UNITS - 1) * UNIT_MSAT
        status, _, body = await fetch(sc.url + "/gen?n=1", bearer)
        assert status == 402 and problem(body)["type"].endswith("/session-closed")
    finally:
        await sc.runner.cleanup()
        await up_runner.cleanup()


async def test_balances_survive_a_sidecar_restart(tmp_path):
    up_runner, up_url, seen = await start_upstream()
    cfg = make_config(tmp_path, routes(up_url))
    sc = await start_sidecar(cfg)
    try:
        ch, pre, sid, bearer = await opened(sc)
        assert (await fetch(sc.url + "/one", bearer))[0] == 200
        net = sc.rt.sandbox
        await sc.runner.cleanup()
        sc = await start_sidecar(cfg, sandbox=net, node=net.nodes[(await sc.rt.node.node_id())])
        served = 0
        while (await fetch(sc.url + "/one", bearer))[0] == 200:
            served += 1
        assert served == ONE_UNITS - 2
    finally:
        await sc.runner.cleanup()
        await up_runner.cleanup()


# -- across replicas -------------------------------------------------------------------------

def test_two_sidecars_on_postgresql_serve_exactly_the_deposit(tmp_path):
    from ..conftest import sidecars_sharing_postgres
    body = ('service = "shop"\n[[routes]]\nmethod = "GET"\npath = "/api/joke"\nprice_msat = 1000\n'
            '[routes.session]\ndeposit_units = 40\n')
    with sidecars_sharing_postgres(tmp_path, body) as servers:
        asyncio.run(_spend_across(servers))


async def _spend_across(servers):
    a, b = servers
    async with aiohttp.ClientSession() as s:
        async with s.get(a.url + "/api/joke") as r:
            ch = session_offer(r.headers)
        async with s.post(a.url + "/sandbox/wallets/w/pay",
                          json={"bolt11": pa.decode_request(ch)["depositInvoice"]}) as r:
            preimage = (await r.json())["preimage"]
        async with s.post(a.url + "/sandbox/wallets/w/invoice", json={}) as r:
            ret = (await r.json())["bolt11"]
        sid = pa.decode_request(ch)["paymentHash"]
        opening = pa.format_session_credential(ch, {"action": "open", "preimage": preimage, "returnInvoice": ret})
        async with s.get(b.url + "/api/joke", headers={"Authorization": opening}) as r:
            assert r.status == 200
        bearer = {"Authorization": pa.format_session_credential(
            ch, {"action": "bearer", "sessionId": sid, "preimage": preimage})}

        async def one(i):
            async with s.get((a, b)[i % 2].url + "/api/joke", headers=bearer) as r:
                body = await r.read()
                # past the deposit: a 402 with a fresh challenge, or 429 once this client
                # holds too many unpaid ones (the challenger's admission limit)
                assert r.status == 200 or json.loads(body)["error"] in ("payment_insufficient_balance",
                                                                        "rate_limited"), body
                return r.status
        served = 1
        for _ in range(4):                      # bursts; between them, unserved leases come back
            statuses = await asyncio.gather(*(one(i) for i in range(100)))
            served += statuses.count(200)
            assert served <= 40                  # never more than the deposit, on both together
            await asyncio.sleep(1.6)
        assert served == 40                      # and nothing of it lost


# -- config and discovery ---------------------------------------------------------------------

@pytest.mark.parametrize("route, problem_text", [
    ('price_msat = 1500\nsession = true', "whole number of satoshis"),
    ('price_msat = 1000\ncredits = 5\nsession = true', "priced per unit"),
    ('price_msat = 1000\nschemes = ["l402"]\nsession = true', "session intent only"),
    ('price_msat = 1000\nsession = "yes"', "must be true or a table"),
    ('price_msat = 1000\n[routes.session]\ndeposit_units = 0', "deposit_units"),
    ('price_msat = 1000\n[routes.session]\nrefund = true', "unknown key"),
])
def test_bad_session_routes_are_refused_with_the_key_named(route, problem_text):
    import tomllib

    from micropay.seller.configfile import parse_config
    from micropay.core.errors import ConfigError
    with pytest.raises(ConfigError, match=problem_text):
        parse_config(tomllib.loads(f'[[routes]]\npath = "/gen"\n{route}\n'), "t.toml")


async def test_openapi_offers_the_session_intent(env):
    async with aiohttp.ClientSession() as s, s.get(env.url + "/openapi.json") as r:
        doc = await r.json()
    (offer,) = doc["paths"]["/gen"]["get"]["x-payment-info"]["offers"]
    assert offer["intent"] == "session" and offer["amount"] == "2" and offer["depositAmount"] == "10"
    assert offer["unitType"] == "chunk" and offer["idleTimeout"] == "300"
    async with aiohttp.ClientSession() as s, s.get(env.url + "/.well-known/l402.json") as r:
        routes_doc = {x["path"]: x for x in (await r.json())["routes"]}
    assert routes_doc["/gen"]["schemes"] == ["Payment"]


async def test_an_unreachable_upstream_gives_the_unit_back(tmp_path):
    sc = await start_sidecar(make_config(tmp_path, routes("http://127.0.0.1:9")))
    try:
        ch, pre = await deposit(sc)
        auth = pa.format_session_credential(ch, {"action": "open", "preimage": pre,
                                                 "returnInvoice": await return_invoice(sc)})
        status, _, body = await fetch(sc.url + "/one", auth)
        assert status == 502 and json.loads(body)["error"] == "upstream_unavailable"
        await settle(sc)
        rec = await sc.rt.gate.sessions.repo.get(pa.decode_request(ch)["paymentHash"])
        assert rec.status == SessionStatus.OPEN and rec.spent_msat == 0
    finally:
        await sc.runner.cleanup()


async def test_micropay_get_session_streams_tops_up_and_closes(env, tmp_path):
    import sys
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "micropay.cli", "get", "--session", env.url + "/gen?n=12",
        "--cache", str(tmp_path / "client.json"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert [json.loads(line)["i"] for line in out.decode().splitlines()] == list(range(12))
    refund_sats = (3 * DEPOSIT_UNITS * UNIT_MSAT - 12 * UNIT_MSAT) // 1000
    assert "the server asks for a top-up" in err.decode()
    assert f"closed, refund {refund_sats} sat succeeded" in err.decode()


def test_raw_request_lines_on_a_session_route_reach_the_upstream_canonical_and_only_when_paid(tmp_path):
    """Odd spellings of a session route, sent byte for byte: unpaid they never reach the
    upstream; with a bearer credential each costs a unit (the bearer fast path is keyed
    by the raw target, so a new spelling goes through the canonical check) and the
    upstream receives the canonical path, without the credential."""
    from ..rawhttp import LoopThread, RecordingUpstream, raw_request
    lt = LoopThread()
    up = lt.run(RecordingUpstream().start())
    toml = (f'service = "raw"\nupstream = "{up.url}"\n[[routes]]\nmethod = "GET"\npath = "/gen"\n'
            'price_msat = 1000\n[routes.session]\ndeposit_units = 3\n')
    sc = lt.run(start_sidecar(make_config(tmp_path, toml)))
    try:
        for target in ("/x/../gen", "//gen", "/g%65n", "/gen%3F", "/./gen"):
            status, _, _ = raw_request(sc.port, "GET", target)
            assert status in (400, 402), target
        assert up.seen == []
        ch, pre, sid, bearer = lt.run(opened(sc, "/gen"))            # unit 1, upstream saw /gen
        auth = {"Authorization": bearer}
        assert raw_request(sc.port, "GET", "/gen", auth)[0] == 200   # unit 2
        assert raw_request(sc.port, "GET", "/x/../gen?a=b", auth)[0] == 200   # unit 3
        assert [s.raw_path for s in up.seen] == ["/gen", "/gen", "/gen?a=b"]
        assert all("Authorization" not in s.headers for s in up.seen)
        for target in ("/gen", "//gen", "/x/%2e%2e/gen"):            # the deposit is spent
            status, _, body = raw_request(sc.port, "GET", target, auth)
            assert status in (400, 402), (target, body)
        assert len(up.seen) == 3
    finally:
        lt.run(sc.runner.cleanup())
        lt.run(up.stop())
        lt.stop()
