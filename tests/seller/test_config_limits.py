"""The limits of issue 18 in the config: defaults, and clear errors for bad values."""
import tomllib

import pytest

from micropay.seller.configfile import parse_config
from micropay.core.errors import ConfigError


def parse(text: str):
    return parse_config(tomllib.loads(text), "t.toml")


def test_defaults():
    cfg = parse("")
    assert (cfg.body_timeout_s, cfg.max_body_bytes, cfg.max_connections, cfg.max_connections_per_client,
            cfg.upstream_connections, cfg.upstream_connections_per_client) == (30, 64 * 1024 ** 2, 0, 256, 256, 32)


@pytest.mark.parametrize("text, message", [
    ("body_timeout_s = 0", "t.toml: body_timeout_s: must be an integer in [1, 3600], got 0"),
    ("max_body_bytes = -1", "t.toml: max_body_bytes: must be an integer in [1, 1099511627776], got -1"),
    ("max_connections = -5", "t.toml: max_connections: must be an integer in [0, 10000000], got -5"),
    ('max_connections_per_client = "many"', "t.toml: max_connections_per_client: expected int, got str"),
    ("upstream_connections = 4\nupstream_connections_per_client = 8",
     "t.toml: upstream_connections_per_client: must be at most upstream_connections (4), got 8"),
])
def test_bad_values_are_refused_naming_the_key(text, message):
    with pytest.raises(ConfigError) as err:
        parse(text)
    assert err.value.message == message
