"""The sidecar's settings, and the parsing of its own part of the TOML file.

The whole file (these settings and the features' sections, such as the purchases API's
catalog) is read by configfile.py. Every setting can also be given on the command line
(`micropay serve --listen ...`); the plugin uses the same names with the `micropay-`
prefix.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import ConfigError
from ..core.inputs import decimal, is_http_url
from .pricing import Pricing, RouteRule, _Table, parse_route

if TYPE_CHECKING:
    from ..games.config import GamesConfig
    from ..creators.config import CreatorsConfig

BACKENDS = ("sandbox", "cln", "fleet")
FLEET_NETWORKS = ("bitcoin", "testnet", "testnet4", "signet", "regtest")
FLEET_KEYS = {"network", "heartbeat_timeout_s", "pool_depth", "pool_expiry_s", "ask_timeout_s", "reserve"}


@dataclass(frozen=True)
class FleetOptions:
    """[backend] with kind = "fleet": invoices come from the node agents' pools in the
    store; this sidecar opens no connection to any node (docs/scaling.md)."""
    network: str = "regtest"         # the nodes' network, as invoices name it
    heartbeat_timeout_s: int = 15    # a node whose agent has not beaten for this long gets no claims
    pool_depth: int = 50             # unclaimed invoices kept per price and node
    pool_expiry_s: int = 3600        # expiry of pooled invoices
    ask_timeout_s: float = 2.0       # longest wait for an invoice made on demand (then 503)
    reserve: int = 32                # pooled invoices this process claims at once per price (0: one per 402)


@dataclass(frozen=True)
class ChallengeLimits:
    expiry_s: int = 600                # invoice + pending challenge lifetime
    per_client_per_minute: int = 30    # new invoices one client may cause per minute
    max_pending: int = 10_000          # unpaid, unexpired challenges across all clients
    max_pending_per_client: int = 50

    @property
    def client_share(self) -> int:
        """Most unpaid challenges one client may hold: max_pending_per_client, and never
        more than a tenth of max_pending, so no single source can fill the store-wide bound."""
        return min(self.max_pending_per_client, max(1, self.max_pending // 10))


@dataclass(frozen=True)
class Config:
    source: str = "<defaults>"
    service: str = "micropay"
    listen: str = "127.0.0.1:8402"
    data_dir: Path = Path(".micropay")
    upstream: str | None = None
    backend: str = "sandbox"
    rpc_file: Path | None = None
    fleet: FleetOptions | None = None   # with backend "fleet"
    store_url: str | None = None      # default: sqlite in data_dir
    trust_forwarded_for: bool = False  # take the client address from X-Forwarded-For
    forwarded_for_hops: int = 1        # how many proxies of ours append to X-Forwarded-For
    demo: bool = False                 # serve the built-in demo API
    openapi: bool = True               # serve /openapi.json describing the priced routes
    header_timeout_s: float = 15.0     # a connection's request headers must arrive within this
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after this
    max_request_head_bytes: int = 64 * 1024   # a request line and headers together (431 above)
    body_timeout_s: float = 30.0       # a request body read by the gate or the proxy arrives within this
    max_body_bytes: int = 64 * 1024 ** 2   # largest request body the proxy forwards (413 above)
    body_min_rate_bytes_s: int = 64 * 1024  # a streamed body (over 1 MiB) arrives at least this fast on average
    max_connections: int = 0           # open client connections; 0: from the open-files limit
    max_connections_per_client: int = 256   # open connections of one client address
    upstream_connections: int = 256    # the reverse proxy's connection pool
    upstream_connections_per_client: int = 32   # of that pool, what one client may hold
    metrics_public: bool = False       # /metrics without the bearer token (it shows revenue)
    metrics_token_file: Path | None = None   # default <data_dir>/metrics.token
    limits: ChallengeLimits = field(default_factory=ChallengeLimits)
    routes: tuple[RouteRule, ...] = ()
    games: "GamesConfig | None" = None   # the purchases API's sections (configfile.py fills it in)
    creators: "CreatorsConfig | None" = None   # Lightning Addresses ([[addresses]], [creators])

    @property
    def pricing(self) -> Pricing:
        return Pricing(list(self.routes))

    @property
    def effective_metrics_token_file(self) -> Path:
        return self.data_dir / (self.metrics_token_file or "metrics.token")

    @property
    def effective_store_url(self) -> str:
        return self.store_url or f"sqlite:///{self.data_dir / 'micropay.sqlite3'}"

    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not 0 < (decimal(port, 5) or 0) < 65536:
            raise ConfigError(f"{self.source}: listen must be host:port, got {self.listen!r}")
        return host.strip("[]") or "127.0.0.1", int(port)

    def unserved_routes(self) -> list[str]:
        """Problems for `micropay serve`: routes it has nothing to answer with (no upstream,
        no demo). An app embedding the gate serves its routes itself: for it, none."""
        if self.demo or self.upstream is not None:
            return []
        return [f"{self.source}: routes[{i}].upstream: no upstream for this route (set routes[{i}].upstream or "
                "a top-level upstream; an app that embeds the gate serves its routes itself)"
                for i, r in enumerate(self.routes) if r.upstream is None]

    def with_overrides(self, **overrides: Any) -> "Config":
        out = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        if out.backend == "fleet" and out.rpc_file is not None:
            raise ConfigError("a sidecar in fleet mode opens no node's socket: --rpc-file/--lightning-dir "
                              "do not go with the fleet backend")
        if out.backend == "fleet" and out.fleet is None:
            out = replace(out, fleet=FleetOptions())
        return out


CORE_KEYS = frozenset({"service", "listen", "data_dir", "upstream", "trust_forwarded_for", "forwarded_for_hops",
                       "demo", "header_timeout_s", "keepalive_timeout_s", "max_request_head_bytes", "body_timeout_s", "max_body_bytes", "max_connections",
                       "max_connections_per_client", "upstream_connections", "upstream_connections_per_client",
                       "body_min_rate_bytes_s",
                       "metrics", "backend", "store", "challenges", "routes",
                       "openapi"})


def parse_core(doc: dict[str, Any], source: str, other_keys: frozenset[str] = frozenset()) -> Config:
    """The sidecar's own settings. `other_keys`: the top-level keys other sections own
    (anything else is an unknown key)."""
    top = _Table(doc, source)
    top.check_keys(CORE_KEYS | other_keys)
    service = top.get("service", str, "micropay")
    if not service or not service.replace("-", "").replace("_", "").isalnum():
        raise top.fail("service", "must be letters, digits, '-' or '_'")

    backend = _Table(top.get("backend", dict, {}), f"{source}: backend")
    backend.check_keys({"kind", "rpc_file"} | FLEET_KEYS)
    kind = backend.get("kind", str, "sandbox")
    if kind not in BACKENDS:
        raise backend.fail("kind", f"must be one of {', '.join(BACKENDS)}, got {kind!r}")
    rpc_file = backend.get("rpc_file", str)
    if kind == "cln" and not rpc_file:
        raise backend.fail("rpc_file", "is required when kind = \"cln\"")
    if kind == "fleet" and rpc_file:
        raise backend.fail("rpc_file", "a sidecar in fleet mode opens no node's socket; leave rpc_file out")
    if kind != "fleet":
        for key in sorted(FLEET_KEYS & set(backend.data)):
            raise backend.fail(key, "applies only with kind = \"fleet\"")
    fleet = None
    if kind == "fleet":
        network = backend.get("network", str, "regtest")
        if network not in FLEET_NETWORKS:
            raise backend.fail("network", f"must be bitcoin, testnet, testnet4, signet or regtest, got {network!r}")
        fleet = FleetOptions(
            network=network,
            heartbeat_timeout_s=backend.positive_int("heartbeat_timeout_s", 15, maximum=3600) or 15,
            pool_depth=backend.positive_int("pool_depth", 50, allow_zero=True, maximum=100_000) or 0,
            pool_expiry_s=backend.positive_int("pool_expiry_s", 3600, maximum=7 * 86400) or 3600,
            ask_timeout_s=float(backend.positive_int("ask_timeout_s", 2, maximum=60) or 2),
            reserve=backend.positive_int("reserve", 32, allow_zero=True, maximum=1000) or 0)
        if fleet.pool_expiry_s <= 180:
            raise backend.fail("pool_expiry_s", "must be above 180 (agents drop invoices with under 120 s left)")

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
    metrics = _Table(top.get("metrics", dict, {}), f"{source}: metrics")
    metrics.check_keys({"public", "token_file"})
    token_file = metrics.get("token_file", str)
    raw_routes = top.get("routes", list, [])
    base_dir = Path(source).parent if source and not source.startswith("<") else None
    routes = tuple(parse_route(r, f"{source}: routes[{i}]", base_dir) for i, r in enumerate(raw_routes))
    upstream = top.get("upstream", str)
    if upstream is not None and not is_http_url(upstream):
        raise top.fail("upstream", f"must be an http:// or https:// URL with a host, got {upstream!r}")
    listen = top.get("listen", str, "127.0.0.1:8402")
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not 0 < (decimal(port, 5) or 0) < 65536:
        raise top.fail("listen", f"must be host:port (e.g. 127.0.0.1:8402), got {listen!r}")
    demo = top.get("demo", bool, False)
    upstream_pool = top.positive_int("upstream_connections", 256, maximum=100_000) or 256
    upstream_share = top.positive_int("upstream_connections_per_client", 32, maximum=100_000) or 32
    if upstream_share > upstream_pool:
        raise top.fail("upstream_connections_per_client",
                       f"must be at most upstream_connections ({upstream_pool}), got {upstream_share}")
    head_bytes = top.positive_int("max_request_head_bytes", Config.max_request_head_bytes, maximum=1024 ** 2)
    if head_bytes is not None and head_bytes < 1024:
        raise top.fail("max_request_head_bytes", f"must be an integer in [1024, {1024 ** 2}], got {head_bytes}")
    return Config(
        source=source, service=service, listen=listen,
        data_dir=Path(top.get("data_dir", str, ".micropay")).expanduser(), upstream=upstream,
        backend=kind, rpc_file=Path(rpc_file).expanduser() if rpc_file else None, fleet=fleet,
        store_url=store_url, trust_forwarded_for=top.get("trust_forwarded_for", bool, False),
        forwarded_for_hops=top.positive_int("forwarded_for_hops", 1, maximum=32) or 1,
        header_timeout_s=top.positive_int("header_timeout_s", 15, maximum=3600) or 15,
        keepalive_timeout_s=top.positive_int("keepalive_timeout_s", 75, maximum=3600) or 75,
        max_request_head_bytes=head_bytes or Config.max_request_head_bytes,
        body_timeout_s=top.positive_int("body_timeout_s", 30, maximum=3600) or 30,
        max_body_bytes=top.positive_int("max_body_bytes", Config.max_body_bytes, maximum=2 ** 40)
        or Config.max_body_bytes,
        body_min_rate_bytes_s=top.positive_int("body_min_rate_bytes_s", Config.body_min_rate_bytes_s,
                                               maximum=2 ** 30) or Config.body_min_rate_bytes_s,
        max_connections=top.positive_int("max_connections", 0, allow_zero=True, maximum=10_000_000) or 0,
        max_connections_per_client=top.positive_int("max_connections_per_client", 256, maximum=10_000_000) or 256,
        upstream_connections=upstream_pool,
        upstream_connections_per_client=upstream_share,
        metrics_public=metrics.get("public", bool, False),
        metrics_token_file=Path(token_file).expanduser() if token_file else None,
        demo=demo, limits=limits, routes=routes, openapi=top.get("openapi", bool, True),
    )
