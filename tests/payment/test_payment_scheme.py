"""The "Payment" scheme (MPP, Lightning charge) beside L402 on the sidecar, over HTTP on
127.0.0.1 with the sandbox backend: one invoice, either envelope, each payment once."""
import asyncio
import json

import aiohttp
import pytest

from micropay.payment import scheme as pa
from micropay.l402.wire import format_authorization, parse_challenges

from ..conftest import make_config, sidecars_sharing_postgres, start_sidecar
from ..client.test_client import CrashAfterPaying

ROUTES = """
service = "shop"
demo = true
[[routes]]
method = "GET"
path = "/api/joke"
price_msat = 1000
[[routes]]
method = "GET"
path = "/api/fortune/*"
price_msat = 5000
credits = 3
[[routes]]
method = "GET"
path = "/api/echo"
price_msat = 2000
schemes = ["payment"]
"""


@pytest.fixture
async def sc(tmp_path):
    sidecar = await start_sidecar(make_config(tmp_path, ROUTES))
    yield sidecar
    await sidecar.runner.cleanup()


async def fetch(url, headers=None):
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers=headers or {}) as r:
            return r.status, r.headers.copy(), await r.read()


def payment_offer(headers) -> str | None:
    return next((v for v in headers.getall("WWW-Authenticate", []) if v.startswith("Payment ")), None)


def echo_of(header: str) -> dict:
    """Parse our own challenge header back into its auth-params (quoted-string values)."""
    import re
    return {k: v.replace('\\"', '"') for k, v in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', header[8:])}


async def buy_payment(sc, path):
    """A 402 for `path`, its invoice paid by the payer node; returns (challenge echo, preimage, headers)."""
    status, headers, _ = await fetch(sc.url + path)
    assert status == 402
    offer = payment_offer(headers)
    assert offer is not None, headers.getall("WWW-Authenticate")
    echo = echo_of(offer)
    request = json.loads(pa.unb64url(echo["request"]))
    paid = await sc.payer.pay(request["methodDetails"]["invoice"])
    await settled(sc, request["methodDetails"]["paymentHash"])
    return echo, paid.preimage, headers


async def settled(sc, payment_hash):
    """Wait until the sidecar has seen the payment (its pending challenge is no longer
    handed out again to the same client)."""
    for _ in range(500):
        record = await sc.rt.l402.get_challenge(payment_hash)
        if record is not None and record.paid_at is not None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the sidecar never saw {payment_hash} paid")


def credential(echo, preimage):
    return "Payment " + pa.encode_object({"challenge": echo, "payload": {"preimage": preimage}})


async def test_one_402_offers_both_schemes_on_one_invoice(sc):
    status, headers, body = await fetch(sc.url + "/api/joke")
    assert status == 402 and headers["Cache-Control"] == "no-store"
    l402 = parse_challenges(headers.getall("WWW-Authenticate"))[0]
    echo = echo_of(payment_offer(headers))
    request = json.loads(pa.unb64url(echo["request"]))
    assert request["methodDetails"]["invoice"] == l402.invoice == json.loads(body)["invoice"]
    assert request["amount"] == "1" and request["currency"] == "sat"
    assert request["methodDetails"]["network"] == "regtest"
    assert (echo["realm"], echo["method"], echo["intent"]) == ("shop", "lightning", "charge")
    assert pa.parse_rfc3339(echo["expires"]) == json.loads(body)["expires_at"]


async def test_routes_that_a_charge_cannot_express_offer_l402_only(sc, tmp_path):
    status, headers, _ = await fetch(sc.url + "/api/fortune/1")           # a credits bundle
    assert status == 402 and payment_offer(headers) is None
    assert parse_challenges(headers.getall("WWW-Authenticate"))
    status, headers, _ = await fetch(sc.url + "/api/echo")                # configured Payment only
    assert [v.split(" ")[0] for v in headers.getall("WWW-Authenticate")] == ["Payment"]
    odd = await start_sidecar(make_config(tmp_path / "odd", ROUTES.replace("price_msat = 1000", "price_msat = 1500")))
    try:
        status, headers, _ = await fetch(odd.url + "/api/joke")           # 1.5 sat: no `amount` for it
        assert status == 402 and payment_offer(headers) is None
    finally:
        await odd.runner.cleanup()


async def test_discovery_says_which_schemes_each_route_offers(sc):
    status, _, body = await fetch(sc.url + "/.well-known/l402.json")
    offered = {r["path"]: r["schemes"] for r in json.loads(body)["routes"]}
    assert offered == {"/api/joke": ["L402", "Payment"], "/api/fortune/*": ["L402"], "/api/echo": ["Payment"]}


async def test_a_payment_credential_is_served_once_with_a_receipt(sc):
    echo, preimage, _ = await buy_payment(sc, "/api/joke")
    status, headers, body = await fetch(sc.url + "/api/joke", {"Authorization": credential(echo, preimage)})
    assert status == 200 and "joke" in json.loads(body)
    receipt = json.loads(pa.unb64url(headers["Payment-Receipt"]))
    assert receipt["status"] == "success" and receipt["method"] == "lightning"
    assert receipt["challengeId"] == echo["id"] and len(receipt["reference"]) == 64
    # replay: a 402 with a fresh challenge and the draft's problem type
    status, headers, body = await fetch(sc.url + "/api/joke", {"Authorization": credential(echo, preimage)})
    doc = json.loads(body)
    assert status == 402 and doc["type"] == "https://paymentauth.org/problems/lightning/unknown-challenge"
    assert "Payment-Receipt" not in headers and headers["Cache-Control"] == "no-store"
    fresh = echo_of(payment_offer(headers))
    assert fresh["id"] != echo["id"]


async def test_paying_once_buys_one_envelope_not_both(sc):
    echo, preimage, headers = await buy_payment(sc, "/api/joke")
    l402 = parse_challenges(headers.getall("WWW-Authenticate"))[0]
    status, _, _ = await fetch(sc.url + "/api/joke", {"Authorization": credential(echo, preimage)})
    assert status == 200
    status, _, body = await fetch(sc.url + "/api/joke",
                                  {"Authorization": format_authorization(l402.macaroon, preimage)})
    assert status == 402 and json.loads(body)["error"] == "credits_exhausted"
    # and the other way round: the L402 token first, then the Payment credential is used up
    echo, preimage, headers = await buy_payment(sc, "/api/joke")
    l402 = parse_challenges(headers.getall("WWW-Authenticate"))[0]
    status, _, _ = await fetch(sc.url + "/api/joke", {"Authorization": format_authorization(l402.macaroon, preimage)})
    assert status == 200
    status, _, body = await fetch(sc.url + "/api/joke", {"Authorization": credential(echo, preimage)})
    assert status == 402 and json.loads(body)["error"] == "payment_unknown_challenge"


async def test_a_credential_for_one_route_does_not_open_another(sc):
    echo, preimage, _ = await buy_payment(sc, "/api/echo")
    status, _, body = await fetch(sc.url + "/api/joke", {"Authorization": credential(echo, preimage)})
    assert status == 402 and "another route" in json.loads(body)["detail"]


async def test_a_preimage_with_another_challenge_is_refused(sc):
    _, preimage, _ = await buy_payment(sc, "/api/joke")
    status, headers, _ = await fetch(sc.url + "/api/joke")
    other = echo_of(payment_offer(headers))          # a second, unpaid challenge
    status, _, body = await fetch(sc.url + "/api/joke", {"Authorization": credential(other, preimage)})
    assert status == 402 and json.loads(body)["type"].endswith("/lightning/invalid-preimage")


@pytest.mark.parametrize("value", ["Payment", "Payment %%%", "Payment " + pa.b64url(b"{}"), "payment e30",
                                   "Payment " + "A" * 20000])
async def test_malformed_credentials_get_a_402_with_a_fresh_challenge(sc, value):
    status, headers, body = await fetch(sc.url + "/api/joke", {"Authorization": value})
    assert status == 402, body
    assert json.loads(body)["type"].endswith("/lightning/malformed-credential")
    assert payment_offer(headers) is not None


async def test_exactly_one_of_200_concurrent_replays_is_served(sc):
    echo, preimage, _ = await buy_payment(sc, "/api/joke")
    auth = {"Authorization": credential(echo, preimage)}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as s:
        async def one():
            async with s.get(sc.url + "/api/joke", headers=auth) as r:
                await r.read()
                return r.status
        statuses = await asyncio.gather(*(one() for _ in range(200)))
    # every replay is refused: with a fresh challenge (402) while the client's budget of
    # new invoices lasts (per_client_per_minute, 30 by default), then told to wait (429)
    assert statuses.count(200) == 1 and statuses.count(402) + statuses.count(429) == 199, statuses
    assert 25 <= statuses.count(402) <= 31, statuses


async def test_pympp_parses_our_challenge_and_its_credential_is_served(sc):
    """A client nobody here wrote: pympp's parser and serializer drive the charge."""
    mpp = pytest.importorskip("mpp", reason="pympp is not installed (pip install '.[test]')")
    status, headers, _ = await fetch(sc.url + "/api/joke")
    challenge = mpp.parse_www_authenticate(payment_offer(headers))
    assert challenge.method == "lightning" and challenge.intent == "charge"
    invoice = challenge.request["methodDetails"]["invoice"]
    paid = await sc.payer.pay(invoice)
    cred = mpp.Credential(challenge=challenge.to_echo(), payload={"preimage": paid.preimage})
    status, headers, body = await fetch(sc.url + "/api/joke", {"Authorization": cred.to_authorization()})
    assert status == 200, body
    receipt = mpp.parse_payment_receipt(headers["Payment-Receipt"])
    assert receipt.status == "success" and receipt.reference == challenge.request["methodDetails"]["paymentHash"]


def test_pympp_computes_the_same_challenge_id_from_the_same_secret():
    mpp = pytest.importorskip("mpp", reason="pympp is not installed (pip install '.[test]')")
    ours = pa.charge_challenge(pa.Binder([b"server-secret"], derive=False), realm="shop", bolt11="lnbcrt10n1x",
                               payment_hash="ab" * 32, price_msat=1000, expires_at=1_800_000_000,
                               description="d", opaque={"route": "GET /x", "token": "cd" * 32})
    theirs = mpp.Challenge.create(secret_key="server-secret", realm="shop", method="lightning", intent="charge",
                                  request=json.loads(pa.unb64url(ours.request)), expires=ours.expires,
                                  meta=json.loads(pa.unb64url(ours.opaque)))
    assert theirs.id == ours.id


@pytest.mark.postgres
def test_one_credential_is_served_once_by_two_sidecars_sharing_postgresql(tmp_path):
    with sidecars_sharing_postgres(tmp_path, 'service = "shop"\n[[routes]]\nmethod = "GET"\npath = "/api/joke"\n'
                                             'price_msat = 1000\n') as servers:
        asyncio.run(_replay_across(servers))


async def _replay_across(servers):
    a, b = servers
    async with aiohttp.ClientSession() as s:
        async with s.get(a.url + "/api/joke") as r:
            echo = echo_of(payment_offer(r.headers))
        invoice = json.loads(pa.unb64url(echo["request"]))["methodDetails"]["invoice"]
        async with s.post(a.url + "/sandbox/wallets/w/pay", json={"bolt11": invoice}) as r:
            preimage = (await r.json())["preimage"]
        auth = {"Authorization": credential(echo, preimage)}

        async def one(i):
            async with s.get((a, b)[i % 2].url + "/api/joke", headers=auth) as r:
                await r.read()
                return r.status
        statuses = await asyncio.gather(*(one(i) for i in range(200)))
    # every replay is refused: with a fresh challenge (402), or, once the client's budget
    # of new invoices is spent, told to wait (429)
    assert statuses.count(200) == 1 and statuses.count(402) + statuses.count(429) == 199, statuses


# -- the client pays either scheme ------------------------------------------------------

from micropay.client.payer import Budget, L402Client, NodeWallet, TokenCache  # noqa: E402
from micropay.core.errors import BudgetExceeded  # noqa: E402


def client(sc, tmp_path, **kw):
    return L402Client(NodeWallet(sc.payer), kw.pop("budget", Budget()), TokenCache(tmp_path / "client.json"), **kw)


async def test_the_client_pays_a_payment_only_route_and_reads_its_receipt(sc, tmp_path):
    balance = sc.payer.balance_msat
    r = await client(sc, tmp_path).get(sc.url + "/api/echo")
    assert r.status == 200 and r.paid_msat == 2000 and r.receipt_error is None
    assert r.receipt["status"] == "success" and r.receipt["reference"] == r.payment_hash
    assert sc.payer.balance_msat == balance - 2000
    r = await client(sc, tmp_path).get(sc.url + "/api/echo")        # single use: pays again
    assert r.status == 200 and r.paid_msat == 2000


async def test_the_client_prefers_l402_and_pays_payment_when_asked(sc, tmp_path):
    c = client(sc, tmp_path / "a")
    r = await c.get(sc.url + "/api/joke")
    assert r.status == 200 and r.receipt["type"] == "request"     # micropay's signed L402 receipt
    assert c.cache.state.tokens                                    # an L402 token was kept
    events = []
    p = client(sc, tmp_path / "b", prefer_payment=True, on_event=events.append)
    r = await p.get(sc.url + "/api/joke")
    assert r.status == 200 and r.receipt["method"] == "lightning" and not p.cache.state.tokens
    assert any("Payment charge" in e for e in events)


async def test_payment_charges_count_against_the_budgets(sc, tmp_path):
    with pytest.raises(BudgetExceeded):
        await client(sc, tmp_path, budget=Budget(max_per_request_msat=1000)).get(sc.url + "/api/echo")
    c = client(sc, tmp_path / "day", budget=Budget(max_per_host_per_day_msat=4500, max_fee_msat=0))
    assert (await c.get(sc.url + "/api/echo")).status == 200
    assert (await c.get(sc.url + "/api/echo")).status == 200
    with pytest.raises(BudgetExceeded):
        await c.get(sc.url + "/api/echo")


async def test_a_charge_paid_by_a_run_that_died_is_presented_by_the_next_not_paid_again(sc, tmp_path):
    balance = sc.payer.balance_msat
    crashing = L402Client(CrashAfterPaying(sc.payer), Budget(), TokenCache(tmp_path / "c.json"))
    with pytest.raises(KeyboardInterrupt):
        await crashing.get(sc.url + "/api/echo")
    assert sc.payer.balance_msat == balance - 2000
    events = []
    again = L402Client(NodeWallet(sc.payer), Budget(), TokenCache(tmp_path / "c.json"), on_event=events.append)
    r = await again.get(sc.url + "/api/echo")
    assert r.status == 200 and sc.payer.balance_msat == balance - 2000
    assert any("interrupted payment" in e for e in events)
    assert [(s.status, s.amount_msat) for s in again.cache.state.spends.values()] == [("paid", 2000)]


async def test_a_challenge_whose_invoice_disagrees_is_not_paid(sc, tmp_path, monkeypatch):
    from micropay.core.errors import InvoiceMismatch
    real = pa.ChargeForm.header

    def lying(form, binder, *args, **kw):         # a server that says 1 sat but invoices 2
        (ch,) = pa.parse_challenges([real(form, binder, *args, **kw)])
        doc = json.loads(pa.unb64url(ch.request))
        doc["amount"] = str(int(doc["amount"]) - 1)
        return pa.Challenge(ch.id, ch.realm, ch.method, ch.intent, pa.encode_object(doc), ch.expires,
                            ch.opaque).header()
    monkeypatch.setattr(pa.ChargeForm, "header", lying)
    balance = sc.payer.balance_msat
    with pytest.raises(InvoiceMismatch):
        await client(sc, tmp_path).get(sc.url + "/api/echo")
    assert sc.payer.balance_msat == balance


async def test_openapi_describes_the_priced_routes_with_payment_offers(sc):
    status, headers, body = await fetch(sc.url + "/openapi.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    doc = json.loads(body)
    assert doc["openapi"].startswith("3.1") and doc["info"]["title"] == "shop"
    joke = doc["paths"]["/api/joke"]["get"]
    assert joke["x-payment-info"] == {"offers": [{"intent": "charge", "method": "lightning", "currency": "sat",
                                                  "amount": "1", "description": "one request per payment"}]}
    assert "402" in joke["responses"]
    fortune = doc["paths"]["/api/fortune/{rest}"]
    assert "x-payment-info" not in fortune["get"] and fortune["parameters"][0]["name"] == "rest"
    assert doc["paths"]["/api/echo"]["get"]["x-payment-info"]["offers"][0]["amount"] == "2"
    # the offer matches what the 402 then says (the challenge stays authoritative)
    _, headers, _ = await fetch(sc.url + "/api/joke")
    (charge,) = pa.parse_challenges(headers.getall("WWW-Authenticate"))
    assert pa.decode_request(charge)["amount"] == joke["x-payment-info"]["offers"][0]["amount"]


async def test_openapi_can_be_left_to_the_upstream(tmp_path):
    sidecar = await start_sidecar(make_config(tmp_path, "openapi = false\n" + ROUTES))
    try:
        status, _, _ = await fetch(sidecar.url + "/openapi.json")
        assert status == 404
    finally:
        await sidecar.runner.cleanup()


async def test_with_the_purchases_api_one_openapi_document_holds_both(tmp_path):
    from ..games_util import GAMES_TOML, start_game_sidecar
    toml = GAMES_TOML.replace('service = "game"\n', 'service = "game"\ndemo = true\n', 1) + \
        '\n[[routes]]\nmethod = "GET"\npath = "/api/joke"\nprice_msat = 3000\n'
    gs = await start_game_sidecar(tmp_path, toml)
    try:
        status, _, body = await fetch(gs.sc.url + "/openapi.json")
        doc = json.loads(body)
        assert status == 200 and "/v1/purchases" in doc["paths"]
        assert doc["paths"]["/api/joke"]["get"]["x-payment-info"]["offers"][0]["amount"] == "3"
    finally:
        await gs.close()


async def test_micropay_fetch_pays_the_payment_scheme_when_asked_and_refuses_bad_params(sc, tmp_path):
    from micropay.core.errors import BadRequest
    from micropay.plugin.fetch import fetch as plugin_fetch
    limits = {"max_msat_default": 10_000, "day_budget_msat": 100_000}
    balance = sc.payer.balance_msat
    got = await plugin_fetch(sc.payer, tmp_path, url=sc.url + "/api/joke", prefer="payment", **limits)
    assert got["status"] == 200 and got["amount_msat"] == 1000 and got["receipt"]["method"] == "lightning"
    got = await plugin_fetch(sc.payer, tmp_path, url=sc.url + "/api/joke", **limits)       # L402 by default
    assert got["status"] == 200 and got["receipt"]["type"] == "request"
    assert sc.payer.balance_msat == balance - 2000
    for bad in ({"prefer": "mpp"}, {"prefer": 1}, {"session": "yes"}):
        with pytest.raises(BadRequest):
            await plugin_fetch(sc.payer, tmp_path, url=sc.url + "/api/joke", **limits, **bad)
    assert sc.payer.balance_msat == balance - 2000                 # a refused call paid nothing


# -- every 402 is a new challenge (issue 17, 4) ------------------------------------------

def invoice_of(echo):
    return json.loads(pa.unb64url(echo["request"]))["methodDetails"]["invoice"]


async def test_two_402s_in_a_row_to_one_client_carry_new_challenges_for_both_schemes(sc):
    """The core draft: challenges MUST NOT be cached or reused. The same client asking twice
    gets two invoices, two L402 tokens and two Payment challenge ids."""
    _, first, _ = await fetch(sc.url + "/api/joke")
    _, second, _ = await fetch(sc.url + "/api/joke")
    l1, l2 = parse_challenges(first.getall("WWW-Authenticate"))[0], parse_challenges(second.getall("WWW-Authenticate"))[0]
    p1, p2 = echo_of(payment_offer(first)), echo_of(payment_offer(second))
    assert l1.invoice != l2.invoice and l1.macaroon != l2.macaroon
    assert p1["id"] != p2["id"] and invoice_of(p1) != invoice_of(p2)
    assert (invoice_of(p1), invoice_of(p2)) == (l1.invoice, l2.invoice)     # one invoice per 402, both schemes


async def test_a_refused_or_consumed_credential_is_answered_with_a_fresh_challenge(sc):
    echo, preimage, _ = await buy_payment(sc, "/api/joke")
    auth = {"Authorization": credential(echo, preimage)}
    assert (await fetch(sc.url + "/api/joke", auth))[0] == 200
    seen_ids, seen_invoices = {echo["id"]}, {invoice_of(echo)}
    for _ in range(3):                                     # the consumed credential, replayed
        status, headers, body = await fetch(sc.url + "/api/joke", auth)
        assert status == 402 and json.loads(body)["error"] == "payment_unknown_challenge"
        offer = echo_of(payment_offer(headers))
        l402 = parse_challenges(headers.getall("WWW-Authenticate"))[0]
        assert offer["id"] not in seen_ids and invoice_of(offer) not in seen_invoices
        assert l402.invoice == invoice_of(offer) == json.loads(body)["invoice"]
        seen_ids.add(offer["id"])
        seen_invoices.add(invoice_of(offer))
    # the L402 token of the consumed invoice: spent, and answered with a new invoice too
    status, headers, body = await fetch(sc.url + "/api/joke", {"Authorization": format_authorization(
        json.loads(body)["macaroon"], "00" * 32)})
    assert status == 402 and json.loads(body)["error"] == "invalid_credential"
    assert invoice_of(echo_of(payment_offer(headers))) not in seen_invoices
    # a credential with a wrong preimage for a challenge never paid: not that challenge again
    status, headers, body = await fetch(sc.url + "/api/joke", {"Authorization": credential(offer, "ab" * 32)})
    assert status == 402 and json.loads(body)["error"] == "payment_invalid_preimage"
    again = echo_of(payment_offer(headers))
    assert again["id"] != offer["id"] and invoice_of(again) != invoice_of(offer)


async def test_a_paid_receipt_is_private_for_both_schemes(sc):
    """Core draft, Caching: a response carrying Payment-Receipt MUST say Cache-Control: private."""
    echo, preimage, headers = await buy_payment(sc, "/api/joke")
    status, headers, _ = await fetch(sc.url + "/api/joke", {"Authorization": credential(echo, preimage)})
    assert status == 200 and "Payment-Receipt" in headers and headers["Cache-Control"] == "private"
    status, headers, _ = await fetch(sc.url + "/api/joke")
    l402 = parse_challenges(headers.getall("WWW-Authenticate"))[0]
    auth = format_authorization(l402.macaroon, (await sc.payer.pay(l402.invoice)).preimage)
    status, headers, _ = await fetch(sc.url + "/api/joke", {"Authorization": auth})
    assert status == 200 and "Payment-Receipt" in headers and headers["Cache-Control"] == "private"


# -- the reverse proxy: receipts private, POST bodies bound by `digest` -------------------

PROXIED = """
service = "px"
upstream = "{up}"
[[routes]]
path = "/api/upload"
method = "POST"
price_msat = 3000
[[routes]]
path = "/api/stream"
price_msat = 2000
"""


@pytest.fixture
async def proxied(tmp_path):
    from ..sidecar.test_proxy import start_upstream
    up_runner, up_url, seen = await start_upstream()
    sidecar = await start_sidecar(make_config(tmp_path, PROXIED.format(up=up_url)))
    yield sidecar, seen
    await sidecar.runner.cleanup()
    await up_runner.cleanup()


def raw_post(sc, body, auth=None, path="/api/upload"):
    """A POST written byte for byte (tests/rawhttp.py), run off the event loop."""
    from ..rawhttp import raw_request
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    if auth:
        headers["Authorization"] = auth
    return asyncio.to_thread(raw_request, int(sc.url.rsplit(":", 1)[1]), "POST", path, headers, 10, body)


async def test_behind_the_proxy_a_post_credential_buys_its_own_body_only(proxied):
    """The core draft's `digest` (RFC 9530 Content-Digest, sha-256) binds a charge to the
    body of the request that got the 402: with another body the credential is refused
    and nothing is spent; with the same body it is served once, and the upstream
    receives that body whole (the gate read it to check the digest) and no credential."""
    import base64
    import hashlib
    sc, seen = proxied
    body, other = b'{"order": 7, "qty": 1}', b'{"order": 7, "qty": 1000}'
    status, headers, _ = await raw_post(sc, body)
    assert status == 402
    (charge,) = pa.parse_challenges([headers["WWW-Authenticate"]])      # the last one: Payment
    assert charge.digest == "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"
    request = pa.decode_request(charge)
    paid = await sc.payer.pay(request["methodDetails"]["invoice"])
    auth = pa.format_credential(charge, paid.preimage)
    status, headers, answer = await raw_post(sc, other, auth)               # another body: refused
    doc = json.loads(answer)
    assert status == 402 and doc["error"] == "payment_unknown_challenge" and "body" in doc["detail"]
    assert "headers" not in seen                                            # the upstream saw nothing
    status, headers, answer = await raw_post(sc, body, auth)                # the same body: served
    assert status == 200, answer
    assert json.loads(answer) == {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    assert headers["Cache-Control"] == "private"                            # it carries a receipt
    assert json.loads(pa.unb64url(headers["Payment-Receipt"]))["status"] == "success"
    h = seen["headers"]
    assert "Authorization" not in h                                         # the preimage stays here
    assert h["X-L402-Payment-Hash"] == request["methodDetails"]["paymentHash"] and len(h["X-L402-Token-Id"]) == 64
    status, _, answer = await raw_post(sc, body, auth)                      # and once only
    assert status == 402 and json.loads(answer)["error"] == "payment_unknown_challenge"


async def test_a_challenge_for_one_body_does_not_buy_an_empty_or_chunked_other(proxied):
    sc, seen = proxied
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/api/upload", data=b"") as r:           # an empty body is bound too
            (charge,) = pa.parse_challenges(r.headers.getall("WWW-Authenticate"))
        paid = await sc.payer.pay(pa.decode_request(charge)["methodDetails"]["invoice"])
        auth = {"Authorization": pa.format_credential(charge, paid.preimage)}

        async def chunks():
            yield b"not "
            yield b"empty"
        async with s.post(sc.url + "/api/upload", data=chunks(), headers=auth) as r:
            assert r.status == 402 and "body" in (await r.json(content_type=None))["detail"]
        async with s.post(sc.url + "/api/upload", data=b"", headers=auth) as r:
            assert r.status == 200 and (await r.json())["bytes"] == 0


async def test_a_body_too_large_to_bind_is_offered_l402_and_streams_through(proxied):
    """Bodies over 1 MiB are not read to bind them: the 402 offers L402 only (whose
    credential does not bind the body), and that credential streams the body upstream; a
    Payment credential with such a body is refused with 413."""
    import hashlib
    sc, seen = proxied
    big = bytes(range(256)) * 8192                                          # 2 MiB
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + "/api/upload", data=big) as r:
            assert r.status == 402 and payment_offer(r.headers) is None
            l402 = parse_challenges(r.headers.getall("WWW-Authenticate"))[0]
        async with s.post(sc.url + "/api/upload", data=b"small") as r:
            (charge,) = pa.parse_challenges(r.headers.getall("WWW-Authenticate"))
        auth = format_authorization(l402.macaroon, (await sc.payer.pay(l402.invoice)).preimage)
        async with s.post(sc.url + "/api/upload", data=big, headers={"Authorization": auth}) as r:
            assert r.status == 200 and r.headers["Cache-Control"] == "private"
            assert await r.json() == {"sha256": hashlib.sha256(big).hexdigest(), "bytes": len(big)}
        paid = await sc.payer.pay(pa.decode_request(charge)["methodDetails"]["invoice"])
        async with s.post(sc.url + "/api/upload", data=big,
                          headers={"Authorization": pa.format_credential(charge, paid.preimage)}) as r:
            assert r.status == 413 and (await r.json(content_type=None))["error"] == "request_body_too_large"


async def test_behind_the_proxy_an_upstream_cache_control_is_made_private(proxied):
    """The upstream's own `public, max-age` would let a shared cache keep a paid answer
    and its receipt: the proxy makes it private and keeps the rest."""
    sc, seen = proxied
    echo, preimage, _ = await buy_payment(sc, "/api/stream")
    async with aiohttp.ClientSession() as s:
        async with s.get(sc.url + "/api/stream", headers={"Authorization": credential(echo, preimage)}) as r:
            assert r.status == 200 and "Payment-Receipt" in r.headers
            assert r.headers["Cache-Control"] == "private, max-age=60"       # upstream said public
            assert (await r.read()).startswith(b"chunk0")
