import tomllib

import pytest
from hypothesis import given, settings, strategies as st

from micropay.seller.configfile import demo_config, load_config, parse_config
from micropay.core.errors import ConfigError
from micropay.seller.pricing import RouteRule


def load(text, tmp_path):
    p = tmp_path / "mp.toml"
    p.write_text(text)
    return load_config(p), str(p)


def test_demo_config_is_valid():
    cfg = demo_config()
    assert cfg.backend == "sandbox" and len(cfg.routes) == 4      # joke, fortune, echo, story (a session)


@pytest.mark.parametrize("text,key", [
    ('upstream="http://x"\n[[routes]]\npath="/a"\nprice_msat=-5', "routes[0].price_msat"),
    ('upstream="http://x"\n[[routes]]\npath="/a"\nprice_msat="10"', "routes[0].price_msat"),
    ('upstream="http://x"\n[[routes]]\nprice_msat=10', "routes[0].path"),
    ('upstream="http://x"\n[[routes]]\npath="a"\nprice_msat=10', "routes[0].path"),
    ('upstream="http://x"\n[[routes]]\npath="/a/*/b"\nprice_msat=10', "routes[0].path"),
    ('upstream="http://x"\n[[routes]]\npath="/a"\nprice_msat=10\nmethod="FETCH"', "routes[0].method"),
    ('upstream="http://x"\n[[routes]]\npath="/a"\nprice_msat=10\ncredits=2\npass_s=5', "routes[0].credits"),
    ('upstream="http://x"\n[[routes]]\npath="/a"\nprice_msat=10\nprice_hook="nosuchmod:f"', "routes[0].price_hook"),
    ('upstream="http://x"\n[[routes]]\npath="/a"\nprice_msat=10\ncolour="red"', "routes[0].colour"),
    ('upstream="ftp://x"', "upstream"),
    ('listen="localhost"', "listen"),
    ('upstream="http://x"\n[[routes]]\npath="/x/{id"\nprice_msat=10', "routes[0].path"),
    ('[backend]\nkind="lnd"', "backend.kind"),
    ('[backend]\nkind="cln"', "backend.rpc_file"),
    ('[store]\nurl="mysql://x"', "store.url"),
    ('[challenges]\nexpiry_s=0', "challenges.expiry_s"),
    ('service="a b"', "service"),
    ('listen = [1]', "listen"),
    ('this is not toml', "invalid TOML"),
])
def test_bad_config_names_file_and_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        load(text, tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "mp.toml") in msg and key in msg


def test_routes_without_upstream_are_for_an_app_that_embeds_the_gate(tmp_path):
    cfg, _ = load('[[routes]]\npath="/a"\nprice_msat=10', tmp_path)
    assert cfg.routes[0].upstream is None
    assert cfg.unserved_routes() == [f"{tmp_path / 'mp.toml'}: routes[0].upstream: no upstream for this route "
                                     "(set routes[0].upstream or a top-level upstream; an app that embeds the "
                                     "gate serves its routes itself)"]


def test_check_config_reports_every_problem_with_its_line(tmp_path):
    from micropay.seller.config_check import check_file
    path = tmp_path / "bad.toml"
    path.write_text('listen = "localhost"\ncolour = 1\n[backend]\nkind = "lnd"\n[[routes]]\npath = "/x/{id"\n'
                    'price_msat = 10\n[[routes]]\npath = "/a"\nprice_msat = -5\n[[webhooks]]\nname = "w"\n'
                    'url = "http://"\n')
    problems, _, cfg = check_file(path)
    assert cfg is None and [p.split(": ")[0].rsplit(":", 1)[1] + " " + p.split(": ")[1] for p in problems] == [
        "1 listen", "2 colour", "4 backend.kind", "6 routes[0].path", "10 routes[1].price_msat", "13 webhooks[0].url"]
    assert all(p.startswith(f"{path}:") for p in problems)


def test_check_config_reports_every_problem_of_one_route(tmp_path):
    from micropay.seller.config_check import check_file
    path = tmp_path / "bad.toml"
    path.write_text('[[routes]]\nbogus = 1\npath = "x"\nprice_msat = -1\nmethod = "FETCH"\n'
                    '[[webhooks]]\nname = "bad name"\nurl = "ftp://x"\n')
    problems, _, cfg = check_file(path)
    lines = [p[len(str(path)) + 1:].split(": ")[:2] for p in problems]
    assert cfg is None and lines == [["2", "routes[0].bogus"], ["3", "routes[0].path"],
                                     ["4", "routes[0].price_msat"], ["5", "routes[0].method"],
                                     ["7", "webhooks[0].name"], ["8", "webhooks[0].url"]]
    assert not any("is required" in p for p in problems[:4])    # a bad path is not also "missing"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_routes_match_in_order_with_patterns():
    cfg = parse_config(tomllib.loads('''
upstream = "http://127.0.0.1:1"
[[routes]]
path = "/items/{id}"
method = "GET"
price_msat = 7
[[routes]]
path = "/api/*"
price_msat = 3
'''), "t")
    p = cfg.pricing
    assert p.match("GET", "/items/42").price_msat == 7
    assert p.match("POST", "/items/42") is None
    assert p.match("GET", "/items/42/x") is None
    assert p.match("DELETE", "/api/").price_msat == 3
    assert p.match("GET", "/apix") is None


def _double(request, rule):
    return rule.price_msat * 2


async def _bad(request, rule):
    return 0.5


async def test_price_hook(tmp_path):
    cfg, _ = load('upstream="http://x"\n[[routes]]\npath="/a"\nprice_msat=10\n'
                  'price_hook="tests.seller.test_config:_double"', tmp_path)
    assert await cfg.routes[0].price_for(None) == 20
    bad = RouteRule(path="/a", price_msat=1, price_hook=_bad)
    with pytest.raises(ValueError):
        await bad.price_for(None)


values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                      max_leaves=8)
keys = st.sampled_from(["service", "listen", "upstream", "routes", "backend", "store", "challenges",
                        "demo", "path", "price_msat", "x"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values | st.lists(st.dictionaries(keys, values, max_size=4), max_size=2),
                       max_size=5))
def test_config_parser_only_raises_config_error(doc):
    try:
        parse_config(doc, "fuzz.toml")
    except ConfigError as exc:
        assert "fuzz.toml" in str(exc)


def test_check_config_reports_every_problem_of_the_addresses(tmp_path):
    from micropay.seller.config_check import check_file
    path = tmp_path / "bad.toml"
    path.write_text('[creators]\npublic_url = "https://pay.example"\n'
                    '[[addresses]]\nname = "Alice"\ndescription = "d"\ncomment_allowed = 5000\n'
                    '[[addresses]]\nname = "bob"\ndescription = "d"\n'
                    'splits = [{ destination = "nobody", share = 1 }]\n'
                    '[[addresses]]\nname = "carol"\ndescription = "d"\n')
    problems, _, cfg = check_file(path)
    lines = [p[len(str(path)) + 1:].split(": ")[:2] for p in problems]
    assert cfg is None and lines == [["4", "addresses[0].name"], ["6", "addresses[0].comment_allowed"],
                                     ["10", "addresses[1].splits[0].destination"]], problems
    path.write_text('[[addresses]]\nname = "bob"\ndescription = "d"\n[[addresses]]\nname = "bob"\ndescription = "e"\n')
    problems, _, cfg = check_file(path)
    assert cfg is None and len(problems) == 1 and "duplicate address 'bob'" in problems[0]
