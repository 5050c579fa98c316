"""The gate inside someone else's aiohttp app, as docs/protocol.md shows it."""
import asyncio
import tomllib

from aiohttp import web

from micropay.client.payer import Budget, L402Client, SandboxHttpWallet
from micropay.seller.configfile import parse_config
from micropay.sidecar import Gate, create_runtime, embed

from ..conftest import serve_app

CONFIG = '''
service = "shop"
[[routes]]
method = "GET"
path = "/report"
price_msat = 2000
'''


async def report(request):
    return web.json_response({"report": "numbers"})


def config(tmp_path, text=CONFIG):
    return parse_config(tomllib.loads(text), "shop.toml").with_overrides(data_dir=tmp_path / "data")


async def test_embed_in_one_call_serves_pays_settles_and_stops_cleanly(tmp_path):
    app = web.Application()
    gate = embed(app, config(tmp_path))          # routes with no upstream: the app serves them

    @gate.require(price_msat=700, pass_s=60)
    async def premium(request):
        return web.json_response({"premium": True})
    app.router.add_get("/report", report)
    app.router.add_get("/premium", premium)
    runner, url = await serve_app(app)
    try:
        client = L402Client(SandboxHttpWallet(f"{url}/sandbox/wallets/me"), Budget())
        first = await client.get(url + "/report")
        assert first.status == 200 and first.paid_msat == 2000 and first.receipt["type"] == "request"
        assert (await client.get(url + "/premium")).paid_msat == 700
        store = gate.runtime.store
        for _ in range(100):                      # the settlement watcher records the payments
            rows = await store.query("SELECT COUNT(*) FROM micropay_challenges WHERE paid_at IS NOT NULL")
            if rows[0][0] == 2:
                break
            await asyncio.sleep(0.02)
        assert rows[0][0] == 2
    finally:
        await runner.cleanup()                   # tasks stopped, node and store closed
    assert gate.runtime.store._conn is None


async def test_middleware_plus_a_wrapped_handler_charges_once(tmp_path):
    """protocol.md's old snippet: gate.install(app) and gate.guard(handler) on a priced
    route made the client pay twice and then get credits_exhausted."""
    cfg = config(tmp_path)
    rt = await create_runtime(cfg)
    gate = Gate(tokens=rt.tokens, node=rt.node, store=rt.store, receipts=rt.receipts, limits=cfg.limits,
                pricing=cfg.pricing)
    app = web.Application()
    gate.install(app)
    app.router.add_get("/report", gate.guard(report))
    from micropay.sidecar.sandbox_api import add_sandbox_routes
    add_sandbox_routes(lambda m, p, h: app.router.add_route(m, p, h), rt)
    runner, url = await serve_app(app)
    try:
        res = await L402Client(SandboxHttpWallet(f"{url}/sandbox/wallets/me"), Budget()).get(url + "/report")
        assert res.status == 200 and res.paid_msat == 2000
    finally:
        await runner.cleanup()
        await rt.store.close()


async def test_a_catch_all_route_never_prices_the_sandbox_wallet(tmp_path):
    """`path = "/*"` prices every path of the app, but not the wallet that pays it."""
    app = web.Application()
    embed(app, config(tmp_path, 'service = "shop"\n[[routes]]\npath = "/*"\nprice_msat = 900\n'))
    app.router.add_get("/report", report)
    runner, url = await serve_app(app)
    try:
        client = L402Client(SandboxHttpWallet(f"{url}/sandbox/wallets/me"), Budget())
        paid = await client.get(url + "/report")
        assert paid.status == 200 and paid.paid_msat == 900
        wallet = await client.get(url + "/sandbox/wallets/me")
        assert wallet.status == 200 and wallet.paid_msat == 0 and wallet.json()["balance_msat"] < 10 ** 11
    finally:
        await runner.cleanup()


async def test_a_pass_through_middleware_and_a_guarded_handler_counts_once(tmp_path):
    """The guard's fast path (cached pass credentials) also sees an earlier layer's admission."""
    cfg = config(tmp_path, 'service = "shop"\n[[routes]]\npath = "/report"\nprice_msat = 500\npass_s = 600\n')
    rt = await create_runtime(cfg)
    gate = Gate(tokens=rt.tokens, node=rt.node, store=rt.store, receipts=rt.receipts, limits=cfg.limits,
                pricing=cfg.pricing)
    app = web.Application()
    gate.install(app)
    app.router.add_get("/report", gate.guard(report))
    from micropay.sidecar.sandbox_api import add_sandbox_routes
    add_sandbox_routes(lambda m, p, h: app.router.add_route(m, p, h), rt)
    runner, url = await serve_app(app)
    try:
        client = L402Client(SandboxHttpWallet(f"{url}/sandbox/wallets/me"), Budget())
        results = [await client.get(url + "/report") for _ in range(3)]
        assert [r.status for r in results] == [200] * 3 and sum(r.paid_msat for r in results) == 500
        assert all(r.receipt["type"] == "pass" for r in results)
        assert sum(gate.metrics.paid_requests.values()) == 3          # once per request, not per layer
    finally:
        await runner.cleanup()
        await rt.store.close()
