"""The canonical request target: what the gate prices and the proxy forwards."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from micropay.core.canonical import BadPath, canonical_target
from micropay.core.patterns import method_allowed, path_matches


@pytest.mark.parametrize("raw,path,forwarded", [
    ("/api/joke", "/api/joke", "/api/joke"),
    ("/api/x/../joke", "/api/joke", "/api/joke"),
    ("/api/./joke", "/api/joke", "/api/joke"),
    ("/api/%2e/joke", "/api/joke", "/api/joke"),
    ("/api/x/%2E%2e/joke", "/api/joke", "/api/joke"),
    ("//premium/1", "/premium/1", "/premium/1"),
    ("/./premium/1", "/premium/1", "/premium/1"),
    ("/../../premium/1", "/premium/1", "/premium/1"),
    ("/a/b/..", "/a/", "/a/"),
    ("/a//b//", "/a/b/", "/a/b/"),
    ("/", "/", "/"),
    ("/caf%C3%A9/%41", "/café/A", "/caf%C3%A9/A"),
    ("/café", "/café", "/caf%C3%A9"),
    ("/a%20b/c,d=e", "/a b/c,d=e", "/a%20b/c,d=e"),
    ("/a/.hidden/x.json", "/a/.hidden/x.json", "/a/.hidden/x.json"),
    ("/.well-known/l402.json", "/.well-known/l402.json", "/.well-known/l402.json"),
])
def test_canonical_forms(raw, path, forwarded):
    t = canonical_target(raw)
    assert (t.path, t.raw_path, t.query) == (path, forwarded, None)


def test_query_is_kept_exactly_as_sent():
    assert canonical_target("/x/../a?b=%2e%2e&c=/d").path_qs == "/a?b=%2e%2e&c=/d"
    assert canonical_target("/a?").path_qs == "/a?"
    assert canonical_target("/a").path_qs == "/a"


@pytest.mark.parametrize("raw", [
    "/api/x/..%2Fjoke", "/api/x/..%2fjoke", "/api/joke%3F", "/api/joke%3Fx=1", "/api/joke%23",
    "/api/joke%09", "/a%00b", "/a%7F", "/a%5cb", "/a\\b", "/a#b", "/a?b#c", "/a%zz", "/a%4", "/a%",
    "/%ff", "/%C3", "*", "http://evil/x", "api/joke", "", "/a\tb", "/a\x7f", "/caf\udcc3",
])
def test_ambiguous_targets_are_refused(raw):
    with pytest.raises(BadPath) as err:
        canonical_target(raw)
    assert err.value.http_status == 400 and err.value.code == "bad_path"


SEGMENTS = st.sampled_from(["api", "joke", "premium", "1", "", ".", "..", "%2e", "%2E%2e", ".%2e",
                            "%61pi", "j%6Fke", "x", "a%20b", "%C3%A9", "p=1", "~u", ".x"])


@given(st.lists(SEGMENTS, max_size=8), st.booleans())
def test_canonical_form_is_a_fixed_point(segments, trailing):
    raw = "/" + "/".join(segments) + ("/" if trailing else "")
    t = canonical_target(raw)
    again = canonical_target(t.raw_path)
    assert again.path == t.path and again.raw_path == t.raw_path
    assert "//" not in t.path and "/./" not in t.path + "/" and "/../" not in t.path + "/"


def test_trailing_slash_is_priced_like_the_path_and_head_like_get():
    assert path_matches("/api/joke", "/api/joke/") and path_matches("/items/{id}", "/items/7/")
    assert not path_matches("/api/joke", "/api/joke//") and not path_matches("/api/", "/api")
    assert method_allowed(frozenset({"GET"}), "HEAD") and not method_allowed(frozenset({"POST"}), "HEAD")
