"""The gate's route table: a path resolved before is answered from the table (canonical
target, whether aiohttp routed it on that same path, the rule pricing it), and always
the same as resolving it anew. The table is bounded: long paths are never kept, a full
table is emptied."""
import pytest
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
