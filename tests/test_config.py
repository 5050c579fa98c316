import tomllib

import pytest
from hypothesis import given, settings, strategies as st

from micropay.config import demo_config, load_config, parse_config
from micropay.errors import ConfigError
from micropay.pricing import RouteRule


def load(text, tmp_path):
    p = tmp_path / "mp.toml"
    p.write_text(text)
    return load_config(p), str(p)


def test_demo_config_is_valid():
    cfg = demo_config()
    assert cfg.backend == "sandbox" and len(cfg.routes) == 3


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
    ('[[routes]]\npath="/a"\nprice_msat=10', "routes[0].upstream"),
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
                  'price_hook="tests.test_config:_double"', tmp_path)
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
