"""Path spellings that common upstreams read as another path are refused (400 bad_path).

Tomcat, Jetty and Spring strip ';' path parameters from every segment ('/api;/admin/x'
is served as '/api/admin/x', '/x/..;/premium' as '/premium'); Windows servers (IIS)
drop a segment's trailing dots and spaces; Spring's suffix match serves '/premium.' as
'/premium'. The gate cannot know which of these its upstream does, so it serves none of
these spellings: a request that spells a path so is refused before pricing, and nothing
reaches the upstream. Raw request lines through the reverse proxy, a recording upstream.
"""
import posixpath
import re
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micropay.core.canonical import BadPath, canonical_target

from ..conftest import make_config, start_sidecar
from ..rawhttp import LoopThread, RecordingUpstream, raw_request

ROUTES = '''
service = "sp"
upstream = "{up}"
[challenges]
per_client_per_minute = 100000
[[routes]]
method = "GET"
path = "/api/premium"
price_msat = 1000
[[routes]]
method = "GET"
path = "/api/cheap"
price_msat = 1000
[[routes]]
path = "/api/admin/*"
price_msat = 2000
'''

SPELLINGS = [
    "/api;/admin/x", "/api;x=1/admin/x", "/api/cheap;jsessionid=1", "/api/cheap;", "/api/premium;",
    "/api/premium%3B", "/api/premium%3bx", "/api/x/..;/premium", "/api/x/..%3B/premium", "/x/..;/api/premium",
    "/api/premium%20", "/api/premium.", "/api/premium%2e", "/api/premium..", "/api/premium./",
    "/api/premium.%20", "/api/premium%20.", "/api./premium", "/api%20/premium", "/api/premium%C2%A0",
    "/api/premium%E3%80%80", "/api/admin./x", "/api/admin%20/x", "/api/admin;/x",
]


@pytest.mark.parametrize("raw", SPELLINGS)
def test_the_canonical_form_refuses_spellings_read_as_another_path(raw):
    with pytest.raises(BadPath) as err:
        canonical_target(raw)
    assert err.value.http_status == 400 and err.value.code == "bad_path"


@pytest.mark.parametrize("raw,path", [
    ("/api/x.json", "/api/x.json"), ("/a/.well-known/x", "/a/.well-known/x"), ("/a/b.c/d", "/a/b.c/d"),
    ("/a%20b/c", "/a b/c"), ("/a/b/.", "/a/b/"), ("/a/b/c/..", "/a/b/"), ("/x/%2e%2e/api/premium", "/api/premium"),
    ("/a?x=1;y=2.", "/a"),                                 # the query is not the path: ';' and '.' are fine there
])
def test_ordinary_spellings_still_have_one_canonical_form(raw, path):
    assert canonical_target(raw).path == path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    lt = LoopThread()
    up = lt.run(RecordingUpstream().start())
    sc = lt.run(start_sidecar(make_config(tmp_path_factory.mktemp("sp"), ROUTES.format(up=up.url))))
    yield lt, up, sc
    lt.run(sc.runner.cleanup())
    lt.run(up.stop())
    lt.stop()


@pytest.mark.parametrize("target", SPELLINGS)
def test_spellings_never_reach_the_upstream(stack, target):
    lt, up, sc = stack
    before = len(up.seen)
    status, headers, body = raw_request(sc.port, "GET", target)
    assert status == 400, (target, status, body)
    assert headers["Content-Type"].startswith("application/problem+json") and b'"bad_path"' in body
    assert up.seen[before:] == []


@pytest.mark.parametrize("target", ["/API/premium", "/api/Premium", "/API/PREMIUM", "/aPi/pReMiUm/"])
def test_other_cases_of_a_priced_path_are_priced_not_forwarded_unpaid(stack, target):
    """Express (by default), ASP.NET and IIS serve /API/PREMIUM as /api/premium: the
    outside review got premium content unpaid from Express that way."""
    lt, up, sc = stack
    before = len(up.seen)
    status, _, body = raw_request(sc.port, "GET", target)
    assert status == 402, (target, status, body)
    assert up.seen[before:] == []


def test_the_free_paths_around_them_are_still_forwarded(stack):
    lt, up, sc = stack
    for target, forwarded in [("/api/premium.json", "/api/premium.json"), ("/free/a.b/c", "/free/a.b/c"),
                              ("/free/x?a=1;b=2.", "/free/x?a=1;b=2.")]:
        status, _, body = raw_request(sc.port, "GET", target)
        assert status == 200, (target, body)
        assert up.seen[-1].raw_path == forwarded


def lenient_reading(raw_path: str) -> str:
    """How Tomcat/Spring/IIS-like upstreams could read a path they receive: ';' parameters
    dropped from each segment, escapes decoded, trailing dots and whitespace dropped from
    each segment, dot segments resolved, slashes collapsed."""
    path = raw_path.split("?", 1)[0]
    segments = [unquote(seg.split(";", 1)[0]) for seg in path.split("/")]
    segments = [s if s in (".", "..") else s.rstrip(". \t\u00a0\u3000") for s in segments]
    return posixpath.normpath(re.sub("/+", "/", "/" + "/".join(segments)))


def priced(sc, path: str) -> bool:
    return any(rule.matches("GET", p) for rule in sc.rt.config.routes for p in (path, path.rstrip("/") or "/"))


PIECES = st.sampled_from(["api", "premium", "cheap", "admin", "x", "..", ".", ";", ";a=1", "%3B", ".", "%2e",
                          "%20", "%C2%A0", "..;", "", "%2e%2e"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(PIECES, min_size=1, max_size=3).map("".join), min_size=1, max_size=5))
def test_no_spelling_of_a_priced_path_reaches_the_upstream_unpaid(stack, segments):
    lt, up, sc = stack
    target = "/" + "/".join(segments)
    before = len(up.seen)
    status, _, body = raw_request(sc.port, "GET", target)
    assert status in (200, 400, 402), (target, status, body)
    for seen in up.seen[before:]:
        assert not priced(sc, lenient_reading(seen.raw_path)), (target, seen.raw_path)
