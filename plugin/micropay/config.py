"""The sidecar's TOML configuration. A bad file fails at start-up naming file and key.

Every setting can also be given on the command line (`micropay serve --listen ...`);
the plugin uses the same names with the `micropay-` prefix.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .games.config import GAMES_KEYS, GamesConfig, parse_games
from .pricing import Pricing, RouteRule, _Table, parse_route

BACKENDS = ("sandbox", "cln")


@dataclass(frozen=True)
class ChallengeLimits:
    expiry_s: int = 600                # invoice + pending challenge lifetime
    per_client_per_minute: int = 30    # new invoices one client may cause per minute
    max_pending: int = 10_000          # unpaid, unexpired challenges across all clients
    max_pending_per_client: int = 50


@dataclass(frozen=True)
class Config:
    source: str = "<defaults>"
    service: str = "micropay"
    listen: str = "127.0.0.1:8402"
    data_dir: Path = Path(".micropay")
    upstream: str | None = None
    backend: str = "sandbox"
    rpc_file: Path | None = None
    store_url: str | None = None      # default: sqlite in data_dir
    trust_forwarded_for: bool = False  # take the client address from X-Forwarded-For
    demo: bool = False                 # serve the built-in demo API
    limits: ChallengeLimits = field(default_factory=ChallengeLimits)
    routes: tuple[RouteRule, ...] = ()
    games: GamesConfig = field(default_factory=GamesConfig)

    @property
    def pricing(self) -> Pricing:
        return Pricing(list(self.routes))

    @property
    def effective_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.data_dir / 'micropay.sqlite3'}"

    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{self.source}: listen must be host:port, got {self.listen!r}")
        return host.strip("[]") or "127.0.0.1", int(port)

    def with_overrides(self, **overrides: Any) -> "Config":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


_TOP_KEYS = {"service", "listen", "data_dir", "upstream", "trust_forwarded_for", "demo",
             "backend", "store", "challenges", "routes"} | GAMES_KEYS


def parse_config(doc: dict[str, Any], source: str) -> Config:
    top = _Table(doc, source)
    top.check_keys(_TOP_KEYS)
    service = top.get("service", str, "micropay")
    if not service or not service.replace("-", "").replace("_", "").isalnum():
        raise top.fail("service", "must be letters, digits, '-' or '_'")

    backend = _Table(top.get("backend", dict, {}), f"{source}: backend")
    backend.check_keys({"kind", "rpc_file"})
    kind = backend.get("kind", str, "sandbox")
    if kind not in BACKENDS:
        raise backend.fail("kind", f"must be one of {', '.join(BACKENDS)}, got {kind!r}")
    rpc_file = backend.get("rpc_file", str)
    if kind == "cln" and not rpc_file:
        raise backend.fail("rpc_file", "is required when kind = \"cln\"")

    store = _Table(top.get("store", dict, {}), f"{source}: store")
    store.check_keys({"url"})
    store_url = store.get("url", str)
    if store_url and not store_url.startswith(("sqlite://", "postgresql://", "postgres://")):
        raise store.fail("url", "must start with sqlite:// or postgresql://")

    ch = _Table(top.get("challenges", dict, {}), f"{source}: challenges")
    ch.check_keys({"expiry_s", "per_client_per_minute", "max_pending", "max_pending_per_client"})
    d = ChallengeLimits()
    limits = ChallengeLimits(
        expiry_s=ch.positive_int("expiry_s", d.expiry_s, maximum=86400) or d.expiry_s,
        per_client_per_minute=ch.positive_int("per_client_per_minute", d.per_client_per_minute,
                                              maximum=100_000) or d.per_client_per_minute,
        max_pending=ch.positive_int("max_pending", d.max_pending, maximum=10_000_000) or d.max_pending,
        max_pending_per_client=ch.positive_int("max_pending_per_client", d.max_pending_per_client,
                                               maximum=100_000) or d.max_pending_per_client,
    )
    raw_routes = top.get("routes", list, [])
    routes = tuple(parse_route(r, f"{source}: routes[{i}]") for i, r in enumerate(raw_routes))
    upstream = top.get("upstream", str)
    demo = top.get("demo", bool, False)
    for i, r in enumerate(routes):
        if r.upstream is None and upstream is None and not demo:
            raise ConfigError(f"{source}: routes[{i}].upstream: no upstream for this route "
                              f"(set routes[{i}].upstream or a top-level upstream)")
    return Config(
        source=source, service=service, listen=top.get("listen", str, "127.0.0.1:8402"),
        data_dir=Path(top.get("data_dir", str, ".micropay")).expanduser(), upstream=upstream,
        backend=kind, rpc_file=Path(rpc_file).expanduser() if rpc_file else None,
        store_url=store_url, trust_forwarded_for=top.get("trust_forwarded_for", bool, False),
        demo=demo, limits=limits, routes=routes, games=parse_games(top, source),
    )


def load_config(path: Path) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse_config(doc, str(path))


def demo_config() -> Config:
    text = resources.files("micropay").joinpath("demo.toml").read_text(encoding="utf-8")
    return parse_config(tomllib.loads(text), "<built-in demo config>")
