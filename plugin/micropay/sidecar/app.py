"""Assembling the sidecar: ports, gate, proxy, discovery, metrics, background tasks (its
bounded HTTP server is server.py)."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from aiohttp import web

from ..seller.challenger import LABEL_PREFIX as CHALLENGE_LABEL_PREFIX
from ..seller.config import Config
from ..core.errors import ConfigError, Unauthorized
from ..http.bodies import BODY_TIMEOUT
from ..http.problems import expect_handler, problem_response
from ..lightning.base import Node
from ..core.metrics import Metrics
from ..seller.discovery import document as openapi_document, payment_paths, well_known as well_known_doc
from ..core.receipts import ReceiptSigner
from ..core.secretfile import private_dir, read_secret, write_secret
from ..seller.settlement import SettlementRouter
from ..store import CORE_SCHEMA, Store, open_store_from_url
from ..store.cursors import CursorRepository
from ..store.l402 import L402Repository
from ..core.tasks import every
from ..l402.tokens import RootKeyRing, TokenService, follow_key_file
from .gate import Gate, own_endpoint
from .limits import Connections, connection_limit
from .proxy import ProxyLimits, ReverseProxy
from .server import MAX_HEADER_BYTES, AccessLog, _Runner

if TYPE_CHECKING:                     # wired in at start-up; imported lazily so that a
    from ..games.service import Games     # sidecar without games never loads that package
    from ..creators.feature import CreatorsFeature
    from ..lightning.sandbox import SandboxNetwork

log = logging.getLogger("micropay.sidecar")
RUNTIME = web.AppKey("micropay_runtime", "Runtime")


@dataclass
class Runtime:
    """Everything the sidecar holds for its lifetime."""

    config: Config
    node: Node
    store: Store
    tokens: TokenService
    receipts: ReceiptSigner
    metrics: Metrics = field(default_factory=Metrics)
    metrics_token: bytes | None = None   # None: /metrics is public
    clock: Callable[[], float] = time.time
    sandbox: SandboxNetwork | None = None   # the play-money network in sandbox mode
    extra_routes: list = field(default_factory=list)   # (method, path, handler), gated like the rest
    gate: Gate | None = None
    games: Games | None = None           # the purchases API, when configured
    creators: CreatorsFeature | None = None   # Lightning Addresses, when configured (or tips still owed)
    openapi_doc: dict | None = None      # /openapi.json, built on first request

    def __post_init__(self) -> None:
        self.l402 = L402Repository(self.store)
        self.cursors = CursorRepository(self.store)

    @property
    def is_sandbox(self) -> bool:
        return self.sandbox is not None


async def create_runtime(config: Config, *, node: Node | None = None,
                         clock: Callable[[], float] = time.time) -> Runtime:
    """Open the store, load or create keys, connect the configured backend."""
    data_dir = config.data_dir
    private_dir(data_dir)
    keyring = RootKeyRing.load_or_create(data_dir / "root_keys.json")
    receipts = ReceiptSigner.load_or_create(data_dir / "receipt_key")
    sandbox = None
    if node is None and config.backend != "fleet":
        node, sandbox = await _connect_backend(config, clock)
    # The purchases feature (games) is loaded only when a catalog or payouts are configured,
    # or when the store still holds purchases awaiting payment (a catalog since removed):
    # their late payments are still recorded. Otherwise not one of its modules is imported.
    # Lightning Addresses likewise, and also once configured before: tips' shares still owed
    # to collaborators are forwarded after the addresses are gone from the config.
    with_creators = config.creators is not None
    with_games = (config.games is not None and config.games.enabled) or with_creators
    store = open_store_from_url(config.effective_store_url, _schemas(config, with_games, with_creators))
    await store.open()
    late_purchases = not with_games and await _purchases_pending(store)
    late_tips = not with_creators and await _component_present(store, "creators")
    if late_purchases or late_tips:
        if late_purchases:
            log.info("purchases made under an earlier catalog are awaiting payment: the purchases feature "
                     "stays loaded to record them")
        await store.close()
        with_games, with_creators = True, with_creators or late_tips
        store = open_store_from_url(config.effective_store_url, _schemas(config, True, with_creators))
        await store.open()
    if node is None:             # fleet mode: invoices and payments go through the store
        node = await _fleet_backend(config, store, clock)
    rt = Runtime(config, node, store, TokenService(keyring, config.service, clock), receipts,
                 clock=clock, sandbox=sandbox,
                 metrics_token=None if config.metrics_public else load_or_create_token(
                     config.effective_metrics_token_file))
    if with_games:       # its routes are served only when a catalog or payouts are configured
        from ..games.http.poster import AiohttpPoster
        from ..games.service import make_games
        rt.games = make_games(config, store, node, receipts, clock, AiohttpPoster())
    if with_creators:
        assert rt.games is not None
        rt.creators = _make_creators(config, rt.games, store, node, clock)
    return rt


def _make_creators(config: Config, games: Games, store: Store, node: Node,
                   clock: Callable[[], float]) -> CreatorsFeature:
    from ..creators.config import CreatorsConfig
    from ..creators.feature import make_creators
    from ..creators.lnurl_client import AddressPayer
    from ..creators.service import Limits
    from ..creators.zap_publish import publish_receipt
    lim = config.limits
    payer = AddressPayer(node.decode, clock=clock)
    feature = make_creators(config.creators or CreatorsConfig(), store, node, games.purchases.hub,
                            publish=publish_receipt, address_invoices=payer.invoice,
                            endpoints_for=games.cfg.endpoints_for,
                            limits=Limits(lim.per_client_per_minute, lim.max_pending, lim.max_pending_per_client),
                            clock=clock)
    feature.closers.append(payer.close)
    return feature


def _schemas(config: Config, with_games: bool, with_creators: bool = False) -> tuple:
    fleet: tuple = ()
    if config.backend == "fleet":
        from ..store.fleet import FLEET_SCHEMA
        fleet = (FLEET_SCHEMA,)
    creators: tuple = ()
    if with_creators:
        from ..creators.schema import CREATORS_SCHEMA
        creators = (CREATORS_SCHEMA,)
    return (CORE_SCHEMA,) + fleet + _games_schema(with_games) + creators


async def _component_present(store: Store, component: str) -> bool:
    """Whether an earlier run brought `component`'s tables into this store."""
    return bool(await store.query("SELECT 1 FROM micropay_schema_steps WHERE component = $1", (component,)))


async def _fleet_backend(config: Config, store: Store, clock: Callable[[], float]) -> Node:
    """The sidecar's side of fleet mode: no node connection of any kind is made."""
    from ..lightning.fleet import FleetBackend
    from ..store.fleet import FleetRepository
    opts = config.fleet
    assert opts is not None
    if config.store_url is None:
        # nothing is wrong on one host whose agents use this same file, but a sidecar that
        # was meant to share another store would see no agent and answer every 402 with 503
        log.warning("fleet mode on this process's own store, %s: the node agents must use this same store "
                    "(micropay-fleet-store=%s); set [store] url (or --store) to the fleet's shared store otherwise",
                    config.effective_store_url, config.effective_store_url)
    backend = FleetBackend(FleetRepository(store), network=opts.network, heartbeat_timeout_s=opts.heartbeat_timeout_s,
                           pool_depth=opts.pool_depth, pool_expiry_s=opts.pool_expiry_s,
                           ask_timeout_s=opts.ask_timeout_s, reserve=opts.reserve, clock=clock)
    await backend.start()
    return backend


def _games_schema(wanted: bool) -> tuple:
    if not wanted:
        return ()
    from ..games.schema import GAMES_SCHEMA
    return (GAMES_SCHEMA,)


async def _purchases_pending(store: Store) -> bool:
    """Whether the store has the purchases table with a purchase still awaiting payment
    (asked in SQL, so that the games package is not imported to find out)."""
    if not await store.query("SELECT 1 FROM micropay_schema_steps WHERE component = 'games'"):
        return False
    return bool(await store.query("SELECT 1 FROM micropay_purchases WHERE status = 'pending' LIMIT 1"))


async def _connect_backend(config: Config, clock: Callable[[], float]) -> tuple[Node, object | None]:
    if config.backend == "sandbox":
        from ..lightning.sandbox import PLAY_MONEY_MSAT, SandboxNetwork
        net = SandboxNetwork(clock)
        return net.add_node("sidecar", PLAY_MONEY_MSAT), net   # payouts can be tried before selling
    if config.backend == "cln":
        try:
            from ..lightning.cln import ClnNode
        except ImportError:
            raise ConfigError(f"{config.source}: backend.kind = \"cln\" is not available in this "
                              "build of micropay") from None
        if config.rpc_file is None:
            raise ConfigError(f"{config.source}: the cln backend needs the node's socket: "
                              "backend.rpc_file, --rpc-file, or --lightning-dir with --network")
        node = ClnNode(config.rpc_file)
        await node.connect()
        return node, None
    raise ConfigError(f"{config.source}: unknown backend {config.backend!r}")


def make_runner(app: web.Application, **kwargs) -> web.AppRunner:
    kwargs.setdefault("access_log_class", AccessLog)
    rt = app.get(RUNTIME)
    cfg = rt.config if rt is not None else Config()
    has_upstream = cfg.upstream is not None or any(r.upstream for r in cfg.routes)
    limit = connection_limit(cfg.max_connections, cfg.upstream_connections if has_upstream else 0)
    # Behind proxies of ours every connection comes from one of them: only the total counts.
    connections = Connections(limit, cfg.max_connections_per_client, by_address=not cfg.trust_forwarded_for)
    # aiohttp's RequestHandler keeps an idle connection 3630 s unless told (only
    # web.run_app passes 75).
    kwargs.setdefault("keepalive_timeout", cfg.keepalive_timeout_s)
    field_bytes = min(MAX_HEADER_BYTES, cfg.max_request_head_bytes)
    return _Runner(app, header_timeout_s=cfg.header_timeout_s, max_head_bytes=cfg.max_request_head_bytes,
                   connections=connections, max_line_size=field_bytes, max_field_size=field_bytes, **kwargs)


def build_app(rt: Runtime) -> web.Application:
    cfg = rt.config
    app = web.Application(client_max_size=1024 ** 2)
    app[RUNTIME] = rt
    app[BODY_TIMEOUT] = float(cfg.body_timeout_s)     # own endpoints' bodies (http/bodies.py)
    gate = Gate(tokens=rt.tokens, node=rt.node, store=rt.store,
                receipts=rt.receipts, limits=cfg.limits, metrics=rt.metrics, pricing=cfg.pricing,
                forwarded_for_hops=cfg.forwarded_for_hops if cfg.trust_forwarded_for else 0,
                body_timeout_s=cfg.body_timeout_s, clock=rt.clock)
    rt.gate = gate
    # Every handler is wrapped with the gate rather than using middleware: cheaper per
    # request. The config's routes price the demo, extra routes and the upstream; micropay's
    # own endpoints only get the canonical-path check, so a catch-all route cannot price them.
    add = lambda method, path, handler: app.router.add_route(method, path, gate.guard(handler),  # noqa: E731
                                                            expect_handler=expect_handler)
    add_own = lambda method, path, handler: add(method, path, own_endpoint(handler))  # noqa: E731
    add_own("GET", "/.well-known/l402.json", well_known)
    add_own("GET", "/metrics", metrics)
    add_own("GET", "/healthz", healthz)
    if rt.is_sandbox:
        from .sandbox_api import add_sandbox_routes
        add_sandbox_routes(add_own, rt)
    if cfg.demo:
        from .demo import add_demo_routes
        add_demo_routes(add, rt)
    if rt.games is not None and rt.games.cfg.enabled:
        from ..games.http import add_games_routes
        rt.games.openapi_extra_paths = payment_paths(cfg.routes) if cfg.openapi else {}
        add_games_routes(add_own, rt.games)
    elif cfg.openapi and cfg.routes:
        add_own("GET", "/openapi.json", openapi)
    if rt.creators is not None and rt.games is not None and cfg.creators is not None:
        from ..creators.http import add_creators_routes
        add_creators_routes(add_own, rt.creators.service, rt.games, gate.client_key)
    for method, path, handler in rt.extra_routes:
        add(method, path, handler)
    has_upstream = cfg.upstream is not None or any(r.upstream for r in cfg.routes)
    if has_upstream:
        proxy = ReverseProxy(cfg.pricing, cfg.upstream, trust_forwarded_for=cfg.trust_forwarded_for,
                             client_key=gate.client_key, limits=ProxyLimits.of(cfg))
        app.cleanup_ctx.append(proxy.cleanup_ctx)
        add("*", "/{tail:.*}", proxy.handle)
    app.cleanup_ctx.append(_background_tasks)
    app.on_shutdown.append(_end_streams)
    return app


async def _end_streams(app: web.Application) -> None:
    """Shutdown begins: let event streams (SSE, WebSocket) finish so in-flight requests drain.
    The node and store close last, after the background tasks (see _background_tasks)."""
    rt = app[RUNTIME]
    if rt.games is not None:
        rt.games.closing = True
        rt.games.purchases.hub.notify()
        rt.games.feed.wake()


def start_background(rt: Runtime) -> list[asyncio.Task]:
    """What runs beside the gate: the settlement router (each feature registers the
    invoices it issued), the purge of expired challenges, the root-key watcher, and the
    purchases API's own tasks."""
    assert rt.gate is not None
    router = SettlementRouter(rt.node, rt.cursors)
    router.register(CHALLENGE_LABEL_PREFIX, rt.gate.challenger.settled)
    if rt.games is not None:       # also with the catalog gone: a purchase paid late is still recorded
        rt.games.register_settlements(router)
    tasks = [asyncio.create_task(router.run(), name="micropay-settlements"),
             asyncio.create_task(every(60.0, rt.gate.challenger.purge_expired, what="purging expired challenges",
                                       log=log), name="micropay-purge"),
             asyncio.create_task(follow_key_file(rt.tokens), name="micropay-keys")]
    if any(r.session is not None for r in rt.config.routes):
        from ..payment.sessions import periodic_jobs
        tasks += [asyncio.create_task(every(period, job, what=what, log=log), name=f"micropay-sessions-{i}")
                  for i, (period, job, what) in enumerate(periodic_jobs(rt.gate.sessions))]
    if rt.games is not None and rt.games.cfg.enabled:
        from ..games.service import background
        tasks += background(rt.games)
    if rt.creators is not None:    # also with the addresses gone: shares still owed are forwarded
        rt.creators.register_settlements(router)
        tasks += rt.creators.background()
    return tasks


async def _write_challenge_records(rt: Runtime) -> None:
    if rt.gate is not None:
        try:
            await rt.gate.challenger.close()
        except Exception as exc:
            log.warning("writing the last challenge records failed: %s", exc)


async def stop_background(rt: Runtime, tasks: list[asyncio.Task]) -> None:
    # The last challenge records first, while the settlement router still runs: another
    # replica that hears of a payment on one of them meanwhile then finds its record.
    await _write_challenge_records(rt)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
    if rt.gate is not None:
        try:
            await rt.gate.sessions.stop()
        except Exception as exc:
            log.warning("stopping the session ledger failed: %s", exc)
        await _write_challenge_records(rt)
    if rt.creators is not None:
        await rt.creators.close()
    await rt.node.close()
    await rt.store.close()


async def _background_tasks(app: web.Application):
    rt = app[RUNTIME]
    tasks = start_background(rt)
    yield
    await stop_background(rt, tasks)


async def openapi(request: web.Request) -> web.Response:
    """The priced routes as OpenAPI with x-payment-info (draft-payment-discovery)."""
    rt = request.app[RUNTIME]
    if rt.openapi_doc is None:
        from .. import __version__
        rt.openapi_doc = openapi_document(rt.config.service, __version__, rt.config.routes)
    return web.json_response(rt.openapi_doc, headers={"Access-Control-Allow-Origin": "*"})


async def well_known(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    return web.json_response(well_known_document(rt))


def well_known_document(rt: Runtime) -> dict[str, Any]:
    cfg = rt.config
    return well_known_doc(cfg.service, cfg.routes, network=rt.node.network, sandbox=rt.is_sandbox,
                          receipt_pubkey=rt.receipts.pubkey_hex, invoice_expiry_s=cfg.limits.expiry_s)


def load_or_create_token(path: Path) -> bytes:
    """A bearer token kept in a 0600 file, made on first use."""
    if not path.exists():
        write_secret(path, secrets.token_urlsafe(32).encode() + b"\n")
    token = read_secret(path).strip()
    if not token:
        raise ConfigError(f"{path}: the metrics token file is empty")
    return token


async def metrics(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.metrics_token is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        given = given.strip()      # raw header bytes that are not UTF-8 arrive as surrogates: never a token
        if scheme.lower() != "bearer" or not given.isascii() or not hmac.compare_digest(given.encode(), rt.metrics_token):
            return problem_response(Unauthorized(
                "/metrics needs 'Authorization: Bearer <token>' (the token is in "
                f"{rt.config.effective_metrics_token_file.name} in the data directory)"),
                {"WWW-Authenticate": 'Bearer realm="micropay-metrics"'})
    text = rt.metrics.render()
    fleet = getattr(rt.node, "metrics_text", None)      # fleet mode: pools, heartbeats, the queue
    if fleet is not None:
        text += await fleet()
    return web.Response(text=text,
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "sandbox": request.app[RUNTIME].is_sandbox})
