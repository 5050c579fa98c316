"""The gate's route table: a path resolved before is answered from the table (canonical
target, whether aiohttp routed it on that same path, the rule pricing it), and always
the same as resolving it anew. The table is bounded: long paths are never kept, a full
table is emptied."""
import json

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micropay.core.canonical import BadPath, canonical_target
from micropay.sidecar import Gate, create_runtime
from micropay.sidecar.routes import ROUTE_CACHE_SIZE, ROUTE_KEY_CHARS, request_target

from ..conftest import make_config

CONFIG = '''
service = "rt"
demo = true
[[routes]]
method = "GET"
path = "/api/premium"
price_msat = 1000
[[routes]]
path = "/api/admin/*"
price_msat = 2000
[[routes]]
method = ["POST", "PUT"]
path = "/api/write/*"
price_msat = 3000
'''


@pytest.fixture
async def gate(tmp_path):
    cfg = make_config(tmp_path, CONFIG)
    rt = await create_runtime(cfg)
    yield Gate(tokens=rt.tokens, node=rt.node, store=rt.store, receipts=rt.receipts, limits=cfg.limits,
               pricing=cfg.pricing)
    await rt.store.close()


def fresh(gate: Gate, method: str, raw: str):
    """What resolving the target costs without the table: canonical form, aiohttp's
    reading compared, the rules scanned."""
    request = make_mocked_request(method, raw)
    target = canonical_target(raw)
    return target, target.path == request.path, gate.pricing.match(method, target.path)


class PlainRequest(dict):
    """What resolve reads of a request, for a plain path (aiohttp's reading is the path)."""

    def __init__(self, method: str, raw: str) -> None:
        super().__init__()
        self.method, self.raw_path, self.path = method, raw, raw.partition("?")[0]


def resolved(gate: Gate, method: str, raw: str, plain: bool = False):
    request = PlainRequest(method, raw) if plain else make_mocked_request(method, raw)
    out = gate.routes.resolve(request)
    assert request_target(request) == out[0]          # kept on the request for the later steps
    return out


def outcome(f, *args):
    try:
        return f(*args)
    except BadPath as err:
        return ("refused", err.message)


PIECES = st.sampled_from(["api", "premium", "admin", "write", "x", "..", ".", "", "%2e", "%2e%2e", "%20", ";",
                          "a.b", "%41", "%2F", "~", "%7E", "%C3%A9", "%ff"])
QUERIES = st.sampled_from(["", "?", "?a=1", "?a=1&b=%2F", "?x#y", "?;.", "?q=%23"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["GET", "POST", "HEAD"]),
                          st.lists(PIECES, min_size=1, max_size=4).map(lambda p: "/" + "/".join(p)),
                          st.lists(QUERIES, min_size=1, max_size=3)), min_size=1, max_size=6))
def test_a_path_from_the_table_resolves_as_it_would_anew(gate, requests):
    # Each path is resolved with several queries (the table keys on the path alone), twice.
    for method, path, queries in requests:
        for query in queries + queries:
            raw = path + query
            expected = outcome(fresh, gate, method, raw)
            assert outcome(resolved, gate, method, raw) == expected, raw
            if expected[0] != "refused" and len(path) <= ROUTE_KEY_CHARS:
                assert (method, path) in gate.routes.entries


async def test_a_fragment_in_the_query_is_refused_for_a_path_in_the_table(gate):
    resolved(gate, "GET", "/api/premium?a=1")
    assert ("GET", "/api/premium") in gate.routes.entries
    with pytest.raises(BadPath):
        resolved(gate, "GET", "/api/premium?a=1#x")


async def test_the_table_is_bounded(gate):
    for i in range(ROUTE_CACHE_SIZE + 300):
        target, _, rule = resolved(gate, "GET", f"/api/admin/{i}", plain=True)
        assert len(gate.routes.entries) <= ROUTE_CACHE_SIZE
        assert target.path == f"/api/admin/{i}" and rule is not None and rule.price_msat == 2000
    assert len(gate.routes.entries) == 300                      # emptied once, when full
    long_path = "/api/admin/" + "x" * ROUTE_KEY_CHARS
    for _ in range(2):
        target, _, rule = resolved(gate, "GET", long_path)
        assert target.path == long_path and rule.price_msat == 2000
    assert ("GET", long_path) not in gate.routes.entries
    # the method counts too (aiohttp's pure-Python parser takes any), and the path as re-encoded
    long_method = "X" * ROUTE_KEY_CHARS
    assert resolved(gate, long_method, "/api/admin/m", plain=True)[2].price_msat == 2000   # any method
    assert (long_method, "/api/admin/m") not in gate.routes.entries
    grows = "/api/admin/" + "\u20ac" * (ROUTE_KEY_CHARS // 4)       # raw UTF-8: 9 characters each re-encoded
    target, _, rule = resolved(gate, "GET", grows, plain=True)
    assert len(target.raw_path) > ROUTE_KEY_CHARS and rule.price_msat == 2000
    assert ("GET", grows) not in gate.routes.entries
    # after the table was emptied, an earlier path resolves as before
    assert resolved(gate, "GET", "/api/admin/0") == fresh(gate, "GET", "/api/admin/0")
    assert resolved(gate, "PUT", "/api/write/1")[2].price_msat == 3000
    assert resolved(gate, "GET", "/api/write/1")[2] is None


async def test_two_rules_on_one_path_each_offer_their_own_price(gate):
    """The Offer kept for a method and path is its rule's: another rule pricing the same
    path (a second gate layer, a decorator) gets its own, never the first one's price."""
    from micropay.lightning.bolt11codec import decode_invoice
    from micropay.payment import scheme as pa
    from micropay.seller.pricing import RouteRule
    cheap = RouteRule(path="/api/premium", price_msat=1000, methods=frozenset({"GET"}))
    dear = RouteRule(path="/api/premium", price_msat=5000, methods=frozenset({"GET"}))
    for rule in (cheap, dear, cheap, dear):
        response = await gate.challenge(make_mocked_request("GET", "/api/premium"), rule)
        body = json.loads(response.text)
        assert response.status == 402 and body["price_msat"] == rule.price_msat
        assert decode_invoice(body["invoice"]).amount_msat == rule.price_msat
        (charge,) = pa.parse_challenges(response.headers.getall("WWW-Authenticate"))
        assert pa.decode_request(charge)["amount"] == str(rule.price_msat // 1000)
        assert gate.routes.offers[("GET", "/api/premium")].rule is rule


async def test_an_offer_is_its_methods_own(gate):
    """A rule for any method: a POST after a GET on the same path says POST, in the body
    and in the invoice's description, not what the GET's 402 said."""
    from micropay.lightning.bolt11codec import decode_invoice
    rule = gate.pricing.match("GET", "/api/admin/x")
    assert rule is not None and rule.methods is None
    for method in ("GET", "POST", "GET"):
        response = await gate.challenge(make_mocked_request(method, "/api/admin/x"), rule)
        body = json.loads(response.text)
        assert body["resource"] == f"{method} /api/admin/x"
        assert decode_invoice(body["invoice"]).description == f"rt: {method} /api/admin/x"


async def test_the_offers_kept_are_bounded_like_the_table(gate):
    from micropay.seller.offer import Offer
    rule = gate.pricing.match("GET", "/api/admin/x")
    long = "/api/admin/" + "l" * ROUTE_KEY_CHARS
    response = await gate.challenge(make_mocked_request("GET", long), rule)
    assert response.status == 402 and json.loads(response.text)["price_msat"] == 2000
    assert ("GET", long) not in gate.routes.offers                  # never kept: too long
    # a path of few characters that is long re-encoded (UTF-8, percent-encoded) is not kept either
    wide = "/api/admin/" + "%F0%9F%98%80" * 60
    response = await gate.challenge(make_mocked_request("GET", wide), rule)
    assert response.status == 402 and len(request_target(make_mocked_request("GET", wide)).path) < ROUTE_KEY_CHARS
    assert not [key for key in gate.routes.offers if key[1].startswith("/api/admin/\U0001f600")]
    offer = Offer(rule, service="rt", method="GET", path="/api/admin/x", price_msat=rule.price_msat)
    for i in range(ROUTE_CACHE_SIZE + 10):
        gate.routes.keep_offer("GET", canonical_target(f"/api/admin/{i}"), offer)
        assert len(gate.routes.offers) <= ROUTE_CACHE_SIZE
    assert len(gate.routes.offers) == 10                             # emptied once full, then refilled


async def test_a_decorators_rules_are_bounded(tmp_path):
    """`require` keeps one rule per route pattern it priced; past MAX_REQUIRE_RULES
    patterns (a handler whose pattern is the request's own path) the dict is emptied."""
    from micropay.seller.config import ChallengeLimits
    from micropay.sidecar.gate import MAX_REQUIRE_RULES
    cfg = make_config(tmp_path, CONFIG)
    rt = await create_runtime(cfg)
    roomy = ChallengeLimits(per_client_per_minute=10 ** 6, max_pending=10 ** 7, max_pending_per_client=10 ** 6)
    gate = Gate(tokens=rt.tokens, node=rt.node, store=rt.store, receipts=rt.receipts, limits=roomy)

    async def handler(request):
        return web.Response(text="ok")
    guarded = gate.require(price_msat=1000, credits=1)(handler)
    try:
        for i in range(MAX_REQUIRE_RULES + 5):
            response = await guarded(make_mocked_request("GET", f"/free/{i}"))
            assert response.status == 402, response.text
            assert 1 <= len(guarded.rules) <= MAX_REQUIRE_RULES
        assert len(guarded.rules) == 5
    finally:
        await gate.challenger.close()
        await rt.store.close()
