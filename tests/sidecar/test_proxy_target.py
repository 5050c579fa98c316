"""What the upstream actually receives: raw request lines through the reverse proxy.

Requests are sent with http.client's putrequest, which does not normalise the target,
and a recording upstream shows what reached it. An upstream that decodes the path and
resolves dot segments itself must never be handed, unpaid, a path a priced route covers.
"""
import posixpath
import re
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micropay.l402.wire import format_authorization, parse_challenges

from ..conftest import make_config, start_sidecar
from ..rawhttp import LoopThread, RecordingUpstream, raw_request

ROUTES = '''
service = "px"
upstream = "{up}"
[challenges]
per_client_per_minute = 100000
[[routes]]
method = "GET"
path = "/api/joke"
price_msat = 1000
[[routes]]
path = "/premium/*"
price_msat = 2000
credits = 5
'''


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    lt = LoopThread()
    up = lt.run(RecordingUpstream().start())
    sc = lt.run(start_sidecar(make_config(tmp_path_factory.mktemp("px"), ROUTES.format(up=up.url))))
    yield lt, up, sc
    lt.run(sc.runner.cleanup())
    lt.run(up.stop())
    lt.stop()


def upstream_reading(raw_path: str) -> str:
    """How a lenient upstream could read a path it receives: decode every escape
    (%2F included), take '\\' for '/', cut at a decoded '?' or '#', drop control
    characters, resolve dot segments, collapse slashes."""
    path = unquote(raw_path.split("?", 1)[0]).replace("\\", "/")
    path = re.split(r"[?#]", path, maxsplit=1)[0]
    path = "".join(c for c in path if ord(c) >= 0x20 and ord(c) != 0x7F)
    return posixpath.normpath(re.sub("/+", "/", "/" + path))


def priced(sc, method: str, path: str) -> bool:
    return any(rule.matches(method, p) for rule in sc.rt.config.routes
               for p in (path, path.rstrip("/") or "/"))


ATTACKS = ["/api/x/../joke", "/api/./joke", "/api/%2e/joke", "/api/x/%2e%2e/joke", "/api/x/..%2Fjoke",
           "/api/joke%3F", "/api/joke%3Fx=1", "/api/joke%23", "/api/joke%09", "//premium/1", "/./premium/1",
           "/x/../premium/1", "/x/..%2Fpremium/1", "/x/%2e%2e/premium/1", "/api//joke", "/api/joke/",
           "/api/j%6Fke", "/x%5C..%5Cpremium/1", "/api/joke%00", "/premium%2F1"]


@pytest.mark.parametrize("target", ATTACKS)
def test_review_attacks_never_reach_the_upstream_unpaid(stack, target):
    lt, up, sc = stack
    before = len(up.seen)
    status, headers, body = raw_request(sc.port, "GET", target)
    assert status in (400, 402), (target, status, body)
    assert headers["Content-Type"].startswith("application/problem+json")
    assert up.seen[before:] == []


def test_head_on_a_get_priced_route_is_priced(stack):
    lt, up, sc = stack
    before = len(up.seen)
    status, _, _ = raw_request(sc.port, "HEAD", "/api/joke")
    assert status == 402 and up.seen[before:] == []


def test_the_upstream_receives_the_canonical_path_and_the_query_as_sent(stack):
    lt, up, sc = stack
    status, _, body = raw_request(sc.port, "GET", "/free/./a/..//b/%7Eme?q=%2e%2e&r=/x")
    assert status == 200, body
    assert up.seen[-1].raw_path == "/free/b/~me?q=%2e%2e&r=/x"


def test_a_paid_request_spelled_oddly_reaches_the_upstream_canonical(stack):
    lt, up, sc = stack
    status, headers, body = raw_request(sc.port, "GET", "/x/../premium/1")
    assert status == 402
    ch = parse_challenges([v for k, v in _all_headers(sc.port, "/x/../premium/1") if k == "WWW-Authenticate"])[0]
    paid = lt.run(sc.payer.pay(ch.invoice))
    auth = format_authorization(ch.macaroon, paid.preimage)
    status, headers, _ = raw_request(sc.port, "GET", "/x/%2e%2e/premium/1?a=b", {"Authorization": auth})
    assert status == 200 and headers["Payment-Credits-Remaining"] == "4"
    assert up.seen[-1].raw_path == "/premium/1?a=b"
    assert up.seen[-1].headers["X-L402-Token-Id"] == ch_token_id(ch)


def _all_headers(port, target):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        resp.read()
        return resp.getheaders()
    finally:
        conn.close()


def ch_token_id(ch) -> str:
    from micropay.l402.macaroon import Macaroon
    from micropay.l402.tokens import decode_identifier
    return decode_identifier(Macaroon.deserialize(ch.macaroon).identifier)[1].hex()


SEGMENT = st.sampled_from([
    "api", "joke", "premium", "1", "x", "", ".", "..", "%2e", "%2E%2e", ".%2E", "%2F", "%2f", "..%2F",
    "%3F", "%3Fx=1", "%23", "%09", "%00", "%5C", "%5c..%5c", "%25", "%252e%252e", "joke%3F", "j%6Fke",
    "%6A%6F%6B%65", "%70remium", ";x=1", "JOKE", "%C3%A9", "%", "%zz", "~"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["GET", "HEAD", "POST"]), st.lists(SEGMENT, min_size=1, max_size=7),
       st.sampled_from(["", "?", "?a=1", "?a=%2e%2e/joke"]))
def test_property_no_priced_path_reaches_the_upstream_unpaid(stack, method, segments, query):
    lt, up, sc = stack
    target = "/" + "/".join(segments) + query
    before = len(up.seen)
    status, _, _ = raw_request(sc.port, method, target)
    for seen in up.seen[before:]:
        reading = upstream_reading(seen.raw_path)
        assert not priced(sc, seen.method, reading), (target, seen.raw_path, reading)
        # what was forwarded is already canonical: nobody downstream can read it two ways
        decoded = unquote(seen.raw_path.split("?", 1)[0])
        assert (decoded.rstrip("/") or "/") == reading, (target, seen.raw_path)
    if up.seen[before:]:
        assert status == 200
