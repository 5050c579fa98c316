"""Assembling the sidecar: ports, gate, proxy, discovery, metrics, background tasks."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ..config import Config
from ..errors import ConfigError
from ..lightning.base import Node
from ..receipts import ReceiptSigner
from ..store import Store, open_store_from_url
from ..tokens import RootKeyRing, TokenService
from .gate import Gate
from .metrics import Metrics
from .proxy import ReverseProxy

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
    clock: Callable[[], float] = time.time
    sandbox: object | None = None        # SandboxNetwork in sandbox mode
    extra_routes: list = field(default_factory=list)   # (method, path, handler), gated like the rest
    gate: Gate | None = None
    games: Any = None                    # games.api.Games

    @property
    def is_sandbox(self) -> bool:
        return self.sandbox is not None


async def create_runtime(config: Config, *, node: Node | None = None,
                         clock: Callable[[], float] = time.time) -> Runtime:
    """Open the store, load or create keys, connect the configured backend."""
    data_dir = config.data_dir
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyring = RootKeyRing.load_or_create(data_dir / "root_keys.json")
    receipts = ReceiptSigner.load_or_create(data_dir / "receipt_key")
    sandbox = None
    if node is None:
        node, sandbox = await _connect_backend(config, clock)
    store = open_store_from_url(config.effective_store_url)
    await store.open()
    rt = Runtime(config, node, store, TokenService(keyring, config.service, clock), receipts,
                 clock=clock, sandbox=sandbox)
    # Always present, so that a purchase paid after its catalog was removed is still recorded;
    # its routes are served only when a catalog or payouts are configured.
    from ..games.setup import make_games
    rt.games = make_games(config, store, node, receipts, clock)
    return rt


async def _connect_backend(config: Config, clock: Callable[[], float]) -> tuple[Node, object | None]:
    if config.backend == "sandbox":
        from ..lightning.sandbox import SandboxNetwork
        net = SandboxNetwork(clock)
        return net.add_node("sidecar"), net
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


# Header limits above aiohttp's 8 KiB default, so that an oversized Authorization header
# reaches the gate and gets a JSON 400 (the gate's own limit is 8 KiB).
MAX_HEADER_BYTES = 64 * 1024


def settle_heap() -> None:
    """After start-up: move everything allocated so far out of the garbage collector's
    view, so collections during serving only walk request-time objects."""
    import gc
    gc.collect()
    gc.freeze()


class AccessLog(AbstractAccessLogger):
    """One line per request, without the query string: it may carry a purchase's
    client token (EventSource cannot send headers), and tokens stay out of logs."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info('%s "%s %s" %s %s %.1fms', request.remote, request.method, request.path,
                         response.status, response.body_length, time * 1000)


def make_runner(app: web.Application, **kwargs) -> web.AppRunner:
    kwargs.setdefault("access_log_class", AccessLog)
    return web.AppRunner(app, max_line_size=MAX_HEADER_BYTES, max_field_size=MAX_HEADER_BYTES, **kwargs)


def build_app(rt: Runtime) -> web.Application:
    cfg = rt.config
    app = web.Application(client_max_size=1024 ** 2)
    app[RUNTIME] = rt
    gate = Gate(tokens=rt.tokens, node=rt.node, store=rt.store,
                receipts=rt.receipts, limits=cfg.limits, metrics=rt.metrics, pricing=cfg.pricing,
                trust_forwarded_for=cfg.trust_forwarded_for, clock=rt.clock)
    rt.gate = gate
    # Every handler is wrapped with the gate rather than using middleware: cheaper per
    # request, and our own endpoints are priced only if a route says so.
    add = lambda method, path, handler: app.router.add_route(method, path, gate.guard(handler))  # noqa: E731
    add("GET", "/.well-known/l402.json", well_known)
    add("GET", "/metrics", metrics)
    add("GET", "/healthz", healthz)
    if rt.is_sandbox:
        from .sandbox_api import add_sandbox_routes
        add_sandbox_routes(add, rt)
    if cfg.demo:
        from .demo import add_demo_routes
        add_demo_routes(add)
    if rt.games is not None and cfg.games.enabled:
        from ..games.api import add_games_routes
        add_games_routes(add, rt.games)
    for method, path, handler in rt.extra_routes:
        add(method, path, handler)
    has_upstream = cfg.upstream is not None or any(r.upstream for r in cfg.routes)
    if has_upstream:
        proxy = ReverseProxy(cfg.pricing, cfg.upstream)
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


async def _background_tasks(app: web.Application):
    rt = app[RUNTIME]
    tasks = [asyncio.create_task(watch_settlements(rt), name="micropay-settlements"),
             asyncio.create_task(purge_expired(rt), name="micropay-purge")]
    if rt.games is not None and rt.config.games.enabled:
        from ..games.setup import background
        tasks += background(rt.games)
    yield
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
    await rt.node.close()
    await rt.store.close()


def cursor_name(node: Node) -> str:
    return f"settlements:{getattr(node, 'cursor_namespace', 'node')}"


async def watch_settlements(rt: Runtime) -> None:
    """Follow the node's settlements from the persisted cursor; mark challenges paid,
    store a payment receipt. Each step is idempotent, so a crash between steps only
    repeats work on restart, never loses or double-counts a payment."""
    name, backoff = cursor_name(rt.node), 1.0
    while True:
        try:
            after = await rt.store.get_cursor(name)
            async for s in rt.node.settlements(after):
                if s.label.startswith("micropay-purchase-"):
                    await rt.games.purchases.on_settlement(s)
                elif s.label.startswith("micropay-"):
                    await record_settlement(rt, s)
                await rt.store.advance_cursor(name, s.pay_index)
                backoff = 1.0
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # node restarts, socket drops: resume from the cursor
            log.warning("settlement stream interrupted (%s); resuming in %.0fs", exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)


async def record_settlement(rt: Runtime, s) -> None:
    record = await rt.store.get_challenge(s.payment_hash)
    if await rt.store.mark_paid(s.payment_hash, s.amount_msat, s.paid_at):
        rt.metrics.record_settlement(s.amount_msat)
        log.info("paid: %s msat for %s (payment_hash %s)", s.amount_msat,
                 record.route_key if record else "?", s.payment_hash)
    if record is not None:
        receipt = rt.receipts.sign({
            "v": 1, "type": "payment", "service": rt.config.service,
            "payment_hash": s.payment_hash, "token_id": record.token_id, "route": record.route_key,
            "amount_msat": s.amount_msat, "paid_at": s.paid_at})
        await rt.store.add_receipt(s.payment_hash, receipt, s.paid_at)


async def purge_expired(rt: Runtime, every_s: float = 60.0) -> None:
    while True:
        try:
            n = await rt.store.purge_expired(int(rt.clock()) - 60)
            if n:
                log.info("purged %d expired unpaid challenges", n)
        except Exception as exc:
            log.warning("purging expired challenges failed: %s", exc)
        await asyncio.sleep(every_s)


async def well_known(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    cfg = rt.config
    routes = []
    for r in cfg.routes:
        routes.append({
            "method": sorted(r.methods) if r.methods else ["*"], "path": r.path,
            "price_msat": r.price_msat if r.price_hook is None else None,
            "dynamic_price": r.price_hook is not None, "credits": r.credits, "pass_s": r.pass_s,
            "capabilities": sorted(r.capabilities), "free_per_hour": r.free_per_hour,
            "stream_msat": r.stream_msat,
            "caveats": r.caveats(cfg.service, 0)[:-1] + (
                [f"{cfg.service}_valid_until=<issued_at + {r.pass_s}>"] if r.pass_s else [f"credits={r.credits}"]),
            "description": r.description})
    return web.json_response({
        "version": 1, "service": cfg.service, "scheme": ["L402", "LSAT"], "network": rt.node.network,
        "sandbox": rt.is_sandbox, "receipt_pubkey": rt.receipts.pubkey_hex,
        "invoice_expiry_s": cfg.limits.expiry_s, "routes": routes})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[RUNTIME].metrics.render(),
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "sandbox": request.app[RUNTIME].is_sandbox})
