"""Inputs from the review that produced 500s or tracebacks: each gets a 400 problem body, or
(a bad L402 credential) a 402 with a fresh challenge."""
import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micropay.games.signing import WebhookVerificationError, sign, verify_webhook
from micropay.core.inputs import decimal, load_json
from micropay.core.errors import BadRequest
from micropay.l402.wire import format_authorization, parse_challenges
from micropay.l402.macaroon import Macaroon
from micropay.core.receipts import InvalidReceipt, ReceiptSigner, verify_receipt

from .games_util import GAMES_TOML, start_game_sidecar
from .sidecar.test_sidecar import get


@pytest.fixture
async def gs(tmp_path):
    g = await start_game_sidecar(tmp_path)
    yield g
    await g.close()


def purchase(**extra):
    return {"sku": "gems-100", "player_id": "p", "idempotency_key": "k", **extra}


@pytest.mark.parametrize("raw", [
    "[" * 30_000 + "]" * 30_000,                       # deeper than the parser's recursion
    '{"a":' * 100 + "1" + "}" * 100,                     # deeper than we accept
    json.dumps(purchase(metadata={"x": "\ud800"})),       # lone surrogate (JSON-escaped)
    json.dumps(purchase(metadata={"\udfff": 1})),
    '{"sku": "gems-100", "player_id": "p", "idempotency_key": "k", "metadata": {"x": NaN}}',
    '{"sku": "gems-100", "player_id": "p", "idempotency_key": "k", "metadata": {"x": Infinity}}',
    b'{"sku": "\xff"}',
])
async def test_bodies_that_crashed_the_parser_are_400(gs, raw):
    status, body, headers = await gs.call("POST", "/v1/purchases", raw)
    assert status == 400, body
    assert headers["Content-Type"].startswith("application/problem+json") and body["error"] == "bad_request"


async def test_paywall_purchase_with_1024_brackets_is_400(gs):
    import aiohttp
    async with aiohttp.ClientSession() as s:
        async with s.get(gs.url + "/paywall/article-1") as r:
            assert r.status == 200
        async with s.post(gs.url + "/paywall/article-1/purchase", data="[" * 1024) as r:
            assert r.status == 400 and (await r.json(content_type=None))["error"] == "bad_request"


@pytest.mark.parametrize("query", ["limit=%C2%B2", "limit=%D9%A3", "limit=-1", "limit=1e3"])
async def test_non_ascii_digits_in_query_integers_are_400(gs, query):
    status, body, _ = await gs.call("GET", f"/v1/purchases?{query}")
    assert status == 400 and "limit" in body["detail"]


async def test_non_ascii_last_event_id_is_400(gs):
    p = await gs.buy()
    for value in ("%C2%B2", "%E2%91%A0"):
        status, body, _ = await gs.call("GET", f"/v1/purchases/{p['id']}/events?last_event_id={value}")
        assert status == 400 and "Last-Event-ID" in body["detail"]


async def attenuated(sidecar, caveat: bytes) -> tuple[str, str]:
    """A paid token with `caveat` appended by its holder: (Authorization value, token id)."""
    status, headers, _ = await get(sidecar.url + "/api/fortune/1")
    ch = parse_challenges(headers.getall("WWW-Authenticate"))[0]
    paid = await sidecar.payer.pay(ch.invoice)
    mac = Macaroon.deserialize(ch.macaroon).add_first_party_caveat(caveat)
    return format_authorization(mac.serialize(), paid.preimage), mac.identifier[34:].hex()


@pytest.mark.parametrize("caveat", [b"credits=0", "credits=²".encode(), "test_valid_until=²".encode(),
                                    b"credits=-1", b"credits=99999999999999999999"])
async def test_holder_appended_caveats_that_crashed_are_refused_with_a_fresh_challenge(sidecar, caveat):
    """bLIP-26: a credential that fails verification gets a 402 and a new challenge."""
    auth, token_id = await attenuated(sidecar, caveat)
    status, headers, body = await get(sidecar.url + "/api/fortune/1", headers={"Authorization": auth})
    assert status == 402, body
    doc = json.loads(body)
    assert doc["error"] == "invalid_credential" and doc["invoice"] not in auth
    assert parse_challenges(headers.getall("WWW-Authenticate"))[0].invoice == doc["invoice"]
    assert await sidecar.rt.l402.credits_remaining(token_id) is None        # nothing spent


def test_load_json_and_decimal():
    assert load_json(b'{"a": [1, "b"]}') == {"a": [1, "b"]}
    for bad in (b"NaN", b"[-Infinity]", b'"\\ud800"', b'{"a":' * 40 + b"1" + b"}" * 40, b"\xff", b"[1,"):
        with pytest.raises(BadRequest):
            load_json(bad)
    assert decimal("123") == 123 and decimal("²") is None and decimal("١٢") is None and decimal("") is None
    assert decimal("1" * 19) is None and decimal("+1") is None and decimal(" 1") is None


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300), st.none()),
       st.one_of(st.binary(max_size=50), st.text(max_size=50)))
def test_verify_webhook_raises_only_its_own_error(header, body):
    try:
        verify_webhook(body, header, "secret", now=1_800_000_000)
    except WebhookVerificationError:
        pass


@pytest.mark.parametrize("header", ["t=1800000000,v1=é", "t=1800000000,v1=" + "g" * 64, "t=²,v1=00",
                                    "t=1800000000,v1", "t=1800000000", "v1=" + "0" * 64, "t=" + "9" * 40,
                                    "t=1800000000,v1=" + "0" * 64 + "\udc80"])
def test_verify_webhook_malformed_headers(header):
    with pytest.raises(WebhookVerificationError):
        verify_webhook(b"{}", header, "secret", now=1_800_000_000)
    good = sign(b"{}", ["secret"], 1_800_000_000)
    assert verify_webhook(b"{}", good, "secret", now=1_800_000_000) == {}


def test_receipts_have_exactly_one_valid_spelling(tmp_path):
    signer = ReceiptSigner.load_or_create(tmp_path / "key")
    receipt = signer.sign({"v": 1, "type": "test", "n": 1})
    assert verify_receipt(receipt, signer.pubkey_hex)["n"] == 1
    payload, sig = receipt.split(".")
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    spellings = [
        receipt + "=",                                    # padding
        payload + "==." + sig,
        " " + receipt, receipt + "\n",                    # whitespace
        payload + "." + sig[:10] + "!" + sig[10:],        # a character outside the alphabet
        payload.replace("-", "+").replace("_", "/") + "." + sig if ("-" in payload or "_" in payload) else None,
        payload + "." + _other_trailing_bits(sig),        # the same bytes, another last character
        payload + "." + base64.urlsafe_b64encode(raw).decode(),
    ]
    for bad in filter(None, spellings):
        with pytest.raises(InvalidReceipt):
            verify_receipt(bad, signer.pubkey_hex)


def _other_trailing_bits(text: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(text[-1])
    return text[:-1] + alphabet[last ^ 1]   # a 64-byte signature leaves 2 unused bits in its last character


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.sampled_from(["NaN", "\ud800"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                 JSONISH.map(lambda v: json.dumps(v).encode()),
                 st.integers(1, 200).map(lambda n: b"[" * n + b"]" * n)))
def test_load_json_raises_only_bad_request(data):
    try:
        load_json(data)
    except BadRequest:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40),
                          st.tuples(st.sampled_from(["credits", "expiration", "fuzz_valid_until", "path", "method",
                                                     "services", "fuzz_capabilities", "other"]),
                                    st.text(max_size=20)).map(lambda kv: f"{kv[0]}={kv[1]}".encode("utf-8",
                                                                                                   "surrogatepass"))),
                max_size=5))
def test_caveat_parsing_raises_only_invalid_credential(caveats):
    from micropay.client.payer import _token_from
    from micropay.core.errors import InvalidCredential
    from micropay.l402.tokens import parse_caveats
    try:
        parse_caveats(tuple(caveats), "fuzz")
    except InvalidCredential:
        pass
    mac = Macaroon.mint(b"k" * 32, b"\x00\x00" + b"\x01" * 64, "micropay:x", tuple(caveats))
    _token_from("http://h", mac, mac.serialize(), "", "00" * 32)   # the client never crashes on them either


@pytest.fixture(scope="module")
def threaded_games(tmp_path_factory):
    from .rawhttp import LoopThread
    lt = LoopThread()
    toml = GAMES_TOML + '\n[[routes]]\npath = "/api/joke"\nprice_msat = 1000\nupstream = "http://127.0.0.1:9"\n'
    gs = lt.run(start_game_sidecar(tmp_path_factory.mktemp("fuzz"), toml))
    yield lt, gs
    lt.run(gs.close())
    lt.stop()


HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=120)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([("GET", "/api/joke"), ("POST", "/v1/purchases"), ("GET", "/v1/purchases?limit={q}"),
                        ("GET", "/v1/purchases/pur_x/events?token={q}"), ("POST", "/v1/payouts"),
                        ("GET", "/v1/events?last_event_id={q}"), ("POST", "/paywall/article-1/purchase"),
                        ("POST", "/sandbox/wallets/fuzz/pay"), ("GET", "/metrics")]),
       HEADER_TEXT, st.binary(max_size=300), st.sampled_from(["L402 ", "LSAT ", "Bearer ", "", "Bearer mpk_", "Payment ", "Payment eyJ"]))
def test_fuzzed_requests_never_get_a_5xx(threaded_games, endpoint, text, body, scheme):
    from urllib.parse import quote
    from .rawhttp import raw_request
    lt, gs = threaded_games
    method, path = endpoint
    path = path.format(q=quote(text, safe=""))
    headers = {"Authorization": scheme + text, "Last-Event-ID": text[:30], "Cookie": f"micropay_reader={text[:40]}",
               "Content-Type": "application/json"}
    status, _, resp = raw_request(gs.sc.port, method, path, headers if method == "GET" else
                                  dict(headers, **{"Content-Length": str(len(body))}), body=body, timeout=10)
    assert status < 500 or (status == 502 and b"upstream" in resp), (method, path, status, resp[:200])


# -- non-UTF-8 header bytes and lone surrogates, in every header of every route ----------

UP_TOML = '''
[challenges]
per_client_per_minute = 100000
max_pending = 10000000
max_pending_per_client = 100000
[[routes]]
method = "GET"
path = "/api/charge"
price_msat = 1000
[[routes]]
method = "GET"
path = "/api/session"
price_msat = 2000
session = true
'''

# Every header the sidecar, the gate, the proxy, the purchases API or aiohttp itself reads,
# and one it does not.
HEADERS = ["Authorization", "Cookie", "Last-Event-ID", "Content-Type", "X-Forwarded-For", "X-Forwarded-Host",
           "X-Forwarded-Proto", "Forwarded", "Host", "Accept", "Accept-Encoding", "Accept-Language", "Origin",
           "Referer", "User-Agent", "If-None-Match", "If-Modified-Since", "Range", "Idempotency-Key",
           "Content-Encoding", "Connection", "Upgrade", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
           "Payment-Stream-Id", "X-Payment-Stream", "Content-Digest", "Expect", "X-Fuzz"]
# Not UTF-8: a lone continuation byte, a truncated sequence, a UTF-8-encoded surrogate
# (CESU), an overlong '/', and the bytes from the review.
BAD_BYTES = b"\xff\xfe \x80 caf\xc3 \xed\xa0\x80 \xc0\xaf"
AUTH_VALUES = [b"Bearer \xff\xfe", b"Bearer mpk_\xff", b"L402 \xff\xfe:\xff", b"LSAT \xc3",
               b"Payment \xff\xfe", b"Payment eyJ\xed\xa0\x80", b"\xff\xfe", b"Bearer " + BAD_BYTES]


def send_raw(port: int, method: str, target: str, headers: list[tuple[str, bytes]], body: bytes = b"",
             timeout: float = 10) -> tuple[int, bytes]:
    """One request with header values as raw bytes (http.client's putheader sends bytes
    as they are; a str it would encode as latin-1). A Host among them replaces the one
    http.client would add."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_host=any(k.lower() == "host" for k, _ in headers),
                        skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if method in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body if method in ("POST", "PUT", "PATCH") else None)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def hostile_stack(tmp_path_factory):
    from .rawhttp import LoopThread, RecordingUpstream
    lt = LoopThread()
    up = lt.run(RecordingUpstream().start())
    toml = f'upstream = "{up.url}"\ndemo = true\n' + GAMES_TOML + UP_TOML
    gs = lt.run(start_game_sidecar(tmp_path_factory.mktemp("hostile"), toml))
    yield lt, gs, up
    lt.run(gs.close())
    lt.run(up.stop())
    lt.stop()


def every_route(app) -> list[tuple[str, str]]:
    """(method, path) for every route the sidecar serves, path parameters filled in."""
    import re
    found = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else "/"
        path = re.sub(r"\{tail[^}]*\}", "free/x", path)
        path = re.sub(r"\{[^}]*\}", "x1", path)
        methods = ["GET", "POST"] if route.method == "*" else [route.method]
        found.update((m, path) for m in methods if m != "HEAD")
    found.update({("GET", "/api/charge"), ("GET", "/api/session")})     # priced routes of the proxy
    return sorted(found)


def test_every_route_is_fuzzed(hostile_stack):
    lt, gs, up = hostile_stack
    routes = every_route(gs.sc.runner.app)
    paths = {p for _, p in routes}
    assert {"/metrics", "/v1/purchases", "/sandbox/wallets/x1/invoice", "/api/charge", "/api/session",
            "/free/x", "/healthz", "/.well-known/l402.json"} <= paths, paths


def assert_no_5xx(port, method, path, headers, body=b"{}"):
    status, resp = send_raw(port, method, path, headers, body)
    assert status < 500, (method, path, headers, status, resp[:300])
    return status


def test_non_utf8_bytes_in_every_header_of_every_route_never_get_a_5xx(hostile_stack):
    lt, gs, up = hostile_stack
    port = gs.sc.port
    for method, path in every_route(gs.sc.runner.app):
        for name in HEADERS:
            assert_no_5xx(port, method, path, [(name, BAD_BYTES)])
        for value in AUTH_VALUES:
            assert_no_5xx(port, method, path, [("Authorization", value)])
        assert_no_5xx(port, method, path, [(name, BAD_BYTES) for name in HEADERS if name != "Host"])


def test_metrics_with_a_non_utf8_bearer_token_is_401(hostile_stack):
    """The review's input: raw bytes 'Authorization: Bearer \\xff\\xfe' gave a 500."""
    lt, gs, up = hostile_stack
    status, body = send_raw(gs.sc.port, "GET", "/metrics", [("Authorization", b"Bearer \xff\xfe")])
    assert status == 401 and b"unauthorized" in body, body
    token = gs.rt.metrics_token
    status, _ = send_raw(gs.sc.port, "GET", "/metrics", [("Authorization", b"Bearer " + token)])
    assert status == 200


def payment_with(echo: dict, payload: dict) -> bytes:
    """A Payment credential as JSON text with \\u escapes (json.dumps writes a lone
    surrogate as '\\ud800', which is valid JSON)."""
    from micropay.payment import scheme as pa
    return b"Payment " + pa.b64url(json.dumps({"challenge": echo, "payload": payload}).encode()).encode()


def offered_echo(port: int, path: str, intent: str) -> dict:
    from micropay.payment import scheme as pa
    from .rawhttp import raw_request
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        values = [v for k, v in resp.getheaders() if k.lower() == "www-authenticate"]
    finally:
        conn.close()
    return next(c for c in pa.parse_challenges(values) if c.intent == intent).echo()


@pytest.mark.parametrize("path,intent", [("/api/charge", "charge"), ("/api/session", "session")])
def test_lone_surrogates_in_a_payment_credential_are_malformed(hostile_stack, path, intent):
    """The review's input: a Payment credential echoing id "\\ud800" gave a 500 on a
    charge route (UnicodeEncodeError in Binder.verify). Any lone surrogate, in any field
    of the echo or the payload (keys too), is a malformed credential: 402 and a fresh
    challenge."""
    lt, gs, up = hostile_stack
    port = gs.sc.port
    echo = offered_echo(port, path, intent)
    payload = {"preimage": "00" * 32, "action": "bearer", "sessionId": "00" * 32, "returnInvoice": "lnbcrt1"}
    cases = [(dict(echo, id="\ud800"), payload)]
    cases += [(dict(echo, **{k: echo[k] + "\udfff"}), payload) for k in echo]
    cases += [(echo, dict(payload, **{k: "\ud800"})) for k in payload]
    cases += [(dict(echo, **{"\ud800": "x"}), payload), (echo, dict(payload, extra=["\ud83d"]))]
    before = len(up.seen)
    for e, p in cases:
        status, body = send_raw(port, "GET", path, [("Authorization", payment_with(e, p))])
        assert status == 402, (e, p, body)
        doc = json.loads(body)
        assert doc["error"] == "payment_credential_malformed", doc
    assert up.seen[before:] == []


def test_lone_surrogates_in_json_bodies_of_every_post_route_never_get_a_5xx(hostile_stack):
    lt, gs, up = hostile_stack
    bodies = [json.dumps({"x": "\ud800"}).encode(), json.dumps({"\udfff": 1}).encode(),
              json.dumps(purchase(player_id="\ud800")).encode(), json.dumps({"bolt11": "\ud800"}).encode(),
              json.dumps({"amount_msat": 1000, "description": "\udc80"}).encode(), b'"\\ud800"']
    for method, path in every_route(gs.sc.runner.app):
        if method != "POST":
            continue
        for body in bodies:
            for headers in ([("Content-Type", b"application/json")],
                            [("Content-Type", b"application/json"), ("Authorization", b"Bearer " + gs.key.encode())]):
                assert_no_5xx(gs.sc.port, method, path, headers, body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data(), st.sampled_from(HEADERS),
       st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
       st.sampled_from([b"", b"Bearer ", b"Bearer mpk_", b"L402 ", b"Payment ", b"Payment eyJ"]))
def test_fuzzed_header_bytes_never_get_a_5xx(hostile_stack, data, name, value, prefix):
    lt, gs, up = hostile_stack
    method, path = data.draw(st.sampled_from(every_route(gs.sc.runner.app)))
    headers = [(name, (prefix if name == "Authorization" else b"") + value)]
    assert_no_5xx(gs.sc.port, method, path, headers)
