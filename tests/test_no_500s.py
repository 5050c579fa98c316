"""Inputs from the review that produced 500s or tracebacks: each gets a 400 problem body, or
(a bad L402 credential) a 402 with a fresh challenge."""
import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micropay.games.signing import WebhookVerificationError, sign, verify_webhook
from micropay.inputs import decimal, load_json
from micropay.errors import BadRequest
from micropay.l402 import format_authorization, parse_challenges
from micropay.macaroon import Macaroon
from micropay.receipts import InvalidReceipt, ReceiptSigner, verify_receipt

from .games_util import GAMES_TOML, start_game_sidecar
from .test_sidecar import get


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
    from micropay.client import _token_from
    from micropay.errors import InvalidCredential
    from micropay.tokens import parse_caveats
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
