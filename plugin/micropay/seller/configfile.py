"""Reading a config file: the sidecar's settings (config.py) and the sections features
own (the purchases API's catalog, webhooks, payouts: games/config.py), each parsed by
its owner. A bad file fails at start-up naming file, line and key.
"""
from __future__ import annotations

import tomllib
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from .config import Config, parse_core
from ..core.errors import ConfigError
from ..creators.config import CREATORS_KEYS, parse_creators
from ..games.config import GAMES_KEYS, parse_games
from .pricing import _Table
from .tomlpos import with_line


def parse_config(doc: dict[str, Any], source: str) -> Config:
    core = parse_core(doc, source, other_keys=frozenset(GAMES_KEYS | CREATORS_KEYS))
    creators = parse_creators(_Table(doc, source), source)
    games = replace(parse_games(_Table(doc, source), source), tips=creators.enabled)
    return replace(core, games=games, creators=creators if creators.enabled else None)


def load_config(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return parse_config(doc, str(path))
    except ConfigError as err:
        raise ConfigError(with_line(text, str(path), err.message)) from None


def demo_config() -> Config:
    text = resources.files("micropay.seller").joinpath("demo.toml").read_text(encoding="utf-8")
    return parse_config(tomllib.loads(text), "<built-in demo config>")
