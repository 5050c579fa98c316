"""The gate inside your own aiohttp app, in one call:

    from micropay.configfile import load_config
    from micropay.sidecar import embed

    app = web.Application()
    gate = embed(app, load_config(Path("micropay.toml")))   # before the app starts
    app.router.add_get("/report", report)                   # priced if a [[routes]] entry says so

    @gate.require(price_msat=777, pass_s=3600)              # or price one handler in code
    async def premium(request): ...

`embed` adds the pricing middleware, the header that puts receipts on streamed
responses, `/.well-known/l402.json` (the config's priced routes), the sandbox wallet
routes when the backend is the sandbox (and a SANDBOX MODE warning in the log when the
app starts), and a cleanup
context that opens the store and the node when the app starts, runs the settlement
watcher (paid challenges), the expiry purge and the key watcher, and closes everything
when the app stops. Routes in the config need no `upstream`: your app serves them.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from aiohttp import web

from ..seller.config import Config
from ..lightning.base import Node
from .app import Runtime, create_runtime, start_background, stop_background, well_known_document
from .gate import Gate, Handler, _add_paid_headers, own_endpoint

log = logging.getLogger("micropay")
SANDBOX_WARNING = ("SANDBOX MODE: the micropay gate runs on an in-process test network. Its invoices are real "
                   "BOLT11 (regtest) but no bitcoin moves; pay them with a sandbox wallet "
                   "(/sandbox/wallets/<name>/pay, or `micropay get URL`, whose default wallet is this server's "
                   "sandbox). Never use backend.kind = \"sandbox\" for a real service.")


class EmbeddedGate:
    """What `embed` returns: the app's gate, ready once the app has started."""

    def __init__(self, config: Config, node: Node | None) -> None:
        self.config, self._node = config, node
        self.runtime: Runtime | None = None
        self.gate: Gate | None = None

    @property
    def sandbox(self) -> Any:
        return self.runtime.sandbox if self.runtime is not None else None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        return await self._started().dispatch(request, handler, forwards=getattr(handler, "forwards_target", False))

    def require(self, price_msat: int = 0, **kw: Any) -> Callable[[Handler], Handler]:
        """Price one handler in code (see Gate.require); usable before the app starts."""
        def wrap(handler: Handler) -> Handler:
            gated: dict[str, Handler] = {}

            async def run(request: web.Request) -> web.StreamResponse:
                gate = self._started()
                if "h" not in gated:
                    gated["h"] = gate.require(price_msat, **kw)(handler)
                return await gated["h"](request)
            return run
        return wrap

    def _started(self) -> Gate:
        if self.gate is None:
            raise RuntimeError("the micropay gate starts with the app (web.run_app or AppRunner.setup)")
        return self.gate

    async def lifetime(self, app: web.Application):   # an aiohttp cleanup context
        rt = await create_runtime(self.config, node=self._node)
        cfg = rt.config
        self.runtime = rt
        if rt.is_sandbox:
            log.warning(SANDBOX_WARNING)
        self.gate = rt.gate = Gate(tokens=rt.tokens, node=rt.node, store=rt.store, receipts=rt.receipts,
                                   limits=cfg.limits, metrics=rt.metrics, pricing=cfg.pricing,
                                   forwarded_for_hops=cfg.forwarded_for_hops if cfg.trust_forwarded_for else 0,
                                   clock=rt.clock)
        self.gate.layered = True          # it runs as the app's middleware (see Gate.guard)
        tasks = start_background(rt)
        yield
        await stop_background(rt, tasks)


def embed(app: web.Application, config: Config, *, node: Node | None = None) -> EmbeddedGate:
    """Put the micropay gate into `app` (call it before the app starts)."""
    embedded = EmbeddedGate(config, node)
    app.middlewares.append(embedded.middleware)
    app.on_response_prepare.append(_add_paid_headers)
    app.cleanup_ctx.append(embedded.lifetime)

    async def well_known(request: web.Request) -> web.Response:
        embedded._started()
        assert embedded.runtime is not None
        return web.json_response(well_known_document(embedded.runtime))
    app.router.add_get("/.well-known/l402.json", own_endpoint(well_known))
    if config.backend == "sandbox" and node is None:
        from .sandbox_api import add_sandbox_routes
        add_sandbox_routes(lambda method, path, handler: app.router.add_route(method, path, own_endpoint(handler)),
                           embedded)
    return embedded
