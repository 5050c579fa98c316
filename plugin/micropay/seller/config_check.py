"""`micropay check-config`: every problem of a config file in one run, each as
`file:line: key: problem` (the line where the key, or its table, is written).

The file is parsed a piece at a time (each top-level setting and table, each route,
catalog item and webhook), so one mistake does not hide the next. Within a piece, the
key a problem names is set aside and the piece parsed again, so a route with a typo in
one key and a bad value in another gets both reported.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Callable

from .config import Config
from .configfile import parse_config
from ..core.errors import ConfigError
from ..creators.config import CREATORS_KEYS, parse_creators
from ..games.config import GAMES_KEYS, parse_games
from .pricing import _Table, parse_route
from .tomlpos import KEY_PATH, with_line

# Good values for required keys, put in place of a bad one so the rest of its table is checked.
_STAND_IN: dict[str, Any] = {"path": "/", "price_msat": 1, "sku": "x", "name": "x", "url": "http://127.0.0.1/",
                             "per_player_day_msat": 1, "per_day_msat": 1, "rpc_file": "lightning-rpc"}
_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")


def check_file(path: Path) -> tuple[list[str], list[str], Config | None]:
    """(problems, notes, the config if it has no problems)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return [f"{path}: cannot read config file: {exc.strerror}"], [], None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_POS.search(str(exc))
        where = f"{path}:{m.group(1)}" if m else str(path)
        return [f"{where}: invalid TOML: {_TOML_POS.sub('', str(exc)).strip()}"], [], None
    source = str(path)
    problems: list[str] = []

    def attempt(parse: Callable[[Any], Any], value: Any) -> None:
        """Parse one piece; report its problem, set the key it names aside, parse again."""
        dropped: set[str] = set()
        for _ in range(64):
            try:
                parse(value)
                return
            except ConfigError as err:
                field = _field_of(err.message, source)
                if field in dropped:
                    return      # only a consequence of a key already reported (now missing)
                problems.append(with_line(text, source, err.message))
                if not isinstance(value, dict) or field not in value:
                    return
                dropped.add(field)
                value = {k: v for k, v in value.items() if k != field}
                if field in _STAND_IN:      # a required key: a good value, to reach the keys after it
                    value[field] = _STAND_IN[field]

    games = {k: v for k, v in doc.items() if k in GAMES_KEYS}
    for key, value in doc.items():
        if key == "routes" and isinstance(value, list):
            for i, route in enumerate(value):
                attempt(lambda r, i=i: parse_route(r, f"{source}: routes[{i}]", path.parent), route)
        elif key in ("catalog", "webhooks") and isinstance(value, list):
            for i, item in enumerate(value):
                attempt(lambda it, key=key, i=i: parse_games(
                    _Table({key: [it]}, source), source, index_offset={key: i}), item)
        elif key in GAMES_KEYS:
            attempt(lambda v, key=key: parse_games(_Table({key: v}, source), source), value)
        elif key == "addresses" and isinstance(value, list):
            creators = doc.get("creators") if isinstance(doc.get("creators"), dict) else {}
            for i, item in enumerate(value):
                attempt(lambda it, i=i: parse_creators(
                    _Table({"addresses": [it], "creators": creators}, source), source, index_offset=i), item)
        elif key in CREATORS_KEYS:
            attempt(lambda v, key=key: parse_creators(_Table({key: v}, source), source), value)
        else:
            attempt(lambda v, key=key: parse_config({key: v, "demo": True}, source), value)
    if not problems and games:     # across items: duplicate skus, names
        attempt(lambda g: parse_games(_Table(g, source), source), games)
    creators = {k: v for k, v in doc.items() if k in CREATORS_KEYS}
    if not problems and creators:  # across addresses: duplicate names
        attempt(lambda c: parse_creators(_Table(c, source), source), creators)
    problems.sort(key=lambda p: _line_number(p, source))      # in file order
    config = None
    if not problems:
        try:
            config = parse_config(doc, source)
        except ConfigError as err:
            problems.append(with_line(text, source, err.message))
    notes = [with_line(text, source, n) for n in config.unserved_routes()] if config is not None else []
    return problems, notes, None if problems else config


def _line_number(problem: str, source: str) -> int:
    m = re.match(r"(\d+):", problem[len(source) + 1:]) if problem.startswith(f"{source}:") else None
    return int(m.group(1)) if m else 0


def _field_of(message: str, source: str) -> str | None:
    """The innermost key a problem names: 'price_msat' of '<source>: routes[1].price_msat: ...'."""
    m = KEY_PATH.match(message[len(source) + 2:]) if message.startswith(f"{source}: ") else None
    if m is None or "." not in m.group("key"):
        return None
    return m.group("key").rsplit(".", 1)[1]
