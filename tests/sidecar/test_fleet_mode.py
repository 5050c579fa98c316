"""A sidecar in fleet mode (`[backend] kind = "fleet"`) sells with invoices its node
agents pooled in the store, hears their settlements from the store, and never connects
to a node: not in this process, not by any code path of that mode."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import textwrap
import time

import aiohttp
import pytest

from micropay.lightning.bolt11codec import decode_invoice
from micropay.lightning.sandbox import SandboxNetwork
from micropay.plugin.agent import AgentSettings, FleetAgent
from micropay.sidecar.app import build_app, create_runtime, make_runner
from micropay.store import open_store_from_url
from micropay.store.fleet import FLEET_SCHEMA, FleetRepository

from ..conftest import DEMO_ROUTES, PG_SKIP_REASON, drop_pg_schema, make_config, pg_url_with_fresh_schema, start_sidecar


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.sqlite3'}"
        return
    if PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    url = pg_url_with_fresh_schema()
    yield url
    asyncio.run(drop_pg_schema(url))


def fleet_toml(url: str) -> str:
    return DEMO_ROUTES + f'[backend]\nkind = "fleet"\nask_timeout_s = 3\n[store]\nurl = "{url}"\n'


async def run_agent(agent: FleetAgent) -> None:
    follow = asyncio.create_task(agent.follow_settlements())
    try:
        while True:
            await agent.round()
            await agent.answer_asks()
            await agent.pay_once()
            await asyncio.sleep(0.02)
    finally:
        follow.cancel()


async def test_a_fleet_sidecar_sells_with_an_agents_invoices_and_hears_them_paid(tmp_path, store_url, monkeypatch):
    import micropay.sidecar.app as app_module

    def no_node(*a, **kw):
        raise AssertionError("fleet mode reached the code that connects to a node")
    monkeypatch.setattr(app_module, "_connect_backend", no_node)
    cfg = make_config(tmp_path, fleet_toml(store_url))
    assert cfg.backend == "fleet" and cfg.rpc_file is None
    sc = await start_sidecar(cfg)
    rt, runner, base = sc.rt, sc.runner, sc.url
    agent_store = open_store_from_url(store_url, (FLEET_SCHEMA,))
    await agent_store.open()
    net = SandboxNetwork()
    merchant, payer = net.add_node("merchant"), net.add_node("payer", 10_000_000)
    agent = FleetAgent(merchant, FleetRepository(agent_store), AgentSettings(min_left_s=120))
    agent_task = asyncio.create_task(run_agent(agent))
    try:
        await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/api/joke") as r:
                assert r.status == 402, await r.text()
                challenge = r.headers["WWW-Authenticate"]
            macaroon = re.search(r'macaroon="([^"]+)"', challenge).group(1)
            invoice = re.search(r'invoice="([^"]+)"', challenge).group(1)
            decoded = decode_invoice(invoice)
            assert decoded.payee == await merchant.node_id(), "the invoice is not the agent's node's"
            assert decoded.amount_msat == 1000
            paid = await payer.pay(invoice)
            async with http.get(f"{base}/api/joke",
                                headers={"Authorization": f"L402 {macaroon}:{paid.preimage}"}) as r:
                assert r.status == 200, await r.text()
            for _ in range(200):                       # the agent's feed reaches the sidecar's settlement router
                rows = await rt.store.query("SELECT paid_at FROM micropay_challenges WHERE payment_hash = $1",
                                            (decoded.payment_hash,))
                if rows and rows[0][0] is not None:
                    break
                await asyncio.sleep(0.02)
            assert rows and rows[0][0] is not None, "the settlement never reached the sidecar"
            # a second miss makes the price wanted; the agent pools it, and the next 402
            # is claimed from the pool, not asked for
            async with http.get(f"{base}/api/joke") as r:
                assert r.status == 402
            for _ in range(200):
                ready = await agent_store.query("SELECT COUNT(*) FROM micropay_fleet_invoices "
                                                "WHERE claim_label IS NULL")
                if ready[0][0]:
                    break
                await asyncio.sleep(0.02)
            async with http.get(f"{base}/api/joke") as r:
                assert r.status == 402
            pooled = await agent_store.query("SELECT COUNT(*) FROM micropay_fleet_invoices WHERE claim_label "
                                             "IS NOT NULL AND node_label NOT IN (SELECT node_label FROM "
                                             "micropay_fleet_invoices i JOIN micropay_fleet_asks a "
                                             "ON a.claim_label = i.claim_label)")
            assert pooled[0][0] >= 1, "the second 402 did not come from the pool"
            headers = {} if rt.metrics_token is None else {"Authorization": f"Bearer {rt.metrics_token.decode()}"}
            async with http.get(f"{base}/metrics", headers=headers) as r:
                assert r.status == 200
                text = await r.text()
            me = await merchant.node_id()
            assert f'micropay_fleet_node_live{{node="{me}"}} 1' in text
            assert re.search(rf'micropay_fleet_pool_ready{{node="{me}"}} [1-9]', text), text
            assert 'micropay_fleet_queue_payments{state="queued"} 0' in text
    finally:
        agent_task.cancel()
        await runner.cleanup()
        await agent_store.close()


async def test_without_an_invoice_in_time_the_client_gets_503_with_retry_after(tmp_path):
    """Over HTTP, as a client sees it: with no live node, and then with a live node whose
    agent never answers, a priced request ends in 503 with a Retry-After header and a
    problem body, within the ask timeout (never a hang, never a 500), and no challenge is
    left behind."""
    from micropay.store.fleet import NodeBeat
    url = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    sc = await start_sidecar(make_config(tmp_path, fleet_toml(url).replace("ask_timeout_s = 3", "ask_timeout_s = 1")))
    rt, runner, base = sc.rt, sc.runner, sc.url
    try:
        async with aiohttp.ClientSession() as http:
            for live in (False, True):
                if live:                              # alive and able to receive, but its agent never answers
                    await FleetRepository(rt.store).heartbeat(
                        NodeBeat("02" + "d" * 64, "regtest", int(time.time() * 1000) + 60_000, 10**12, 0))
                t0 = time.monotonic()
                async with http.get(f"{base}/api/joke", timeout=aiohttp.ClientTimeout(total=10)) as r:
                    elapsed = time.monotonic() - t0
                    body = await r.json(content_type=None)
                    assert r.status == 503, (live, r.status, body)
                    assert r.headers["Retry-After"].isdigit() and int(r.headers["Retry-After"]) >= 1
                    assert r.headers["Content-Type"].startswith("application/problem+json")
                    assert body["status"] == 503 and "WWW-Authenticate" not in r.headers
                assert elapsed < (2.5 if live else 1.0), (live, elapsed)
        unpaid = await rt.store.query("SELECT COUNT(*) FROM micropay_challenges", ())
        assert unpaid[0][0] == 0, "a refused 402 left a challenge behind"
    finally:
        await runner.cleanup()


NEVER_A_NODE = textwrap.dedent("""
    import asyncio, json, socket, sys, tomllib
    from pathlib import Path
    unix = []
    real_connect = socket.socket.connect
    def connect(self, address):
        if self.family == socket.AF_UNIX:
            unix.append(str(address))
        return real_connect(self, address)
    socket.socket.connect = connect
    real_open = asyncio.open_unix_connection
    async def open_unix(path=None, **kw):
        unix.append(str(path))
        return await real_open(path, **kw)
    asyncio.open_unix_connection = open_unix
    from micropay.seller.configfile import load_config
    from micropay.sidecar.app import build_app, create_runtime
    async def main(path):
        cfg = load_config(Path(path))
        rt = await create_runtime(cfg)
        build_app(rt)
        try:
            await rt.node.create_invoice(1000, "micropay-probe", "joke", 600)
        except Exception as exc:
            print(type(exc).__name__, file=sys.stderr)
        print(json.dumps({"unix": unix, "cln": "micropay.lightning.cln" in sys.modules,
                          "backend": type(rt.node).__name__}))
    asyncio.run(main(sys.argv[1]))
""")


def test_a_fleet_sidecar_opens_no_nodes_socket(tmp_path):
    cfg = tmp_path / "fleet.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n' + fleet_toml(f"sqlite:///{tmp_path / 's.sqlite3'}")
                   .replace("ask_timeout_s = 3", "ask_timeout_s = 1"))
    script = tmp_path / "probe.py"
    script.write_text(NEVER_A_NODE)
    out = subprocess.run([sys.executable, str(script), str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout)
    assert seen == {"unix": [], "cln": False, "backend": "FleetBackend"}, seen
    assert "NoInvoiceInTime" in out.stderr, "without an agent the claim should end in a bounded 503"


def test_fleet_options_are_checked(tmp_path):
    from micropay.core.errors import ConfigError
    with pytest.raises(ConfigError, match="opens no node's socket"):
        make_config(tmp_path, DEMO_ROUTES + '[backend]\nkind = "fleet"\nrpc_file = "/x/lightning-rpc"\n')
    with pytest.raises(ConfigError, match="only with kind"):
        make_config(tmp_path, DEMO_ROUTES + '[backend]\nkind = "sandbox"\npool_depth = 5\n')
    with pytest.raises(ConfigError, match="pool_expiry_s"):
        make_config(tmp_path, DEMO_ROUTES + '[backend]\nkind = "fleet"\npool_expiry_s = 100\n')
    with pytest.raises(ConfigError, match="network"):
        make_config(tmp_path, DEMO_ROUTES + '[backend]\nkind = "fleet"\nnetwork = "mainnet"\n')
    cfg = make_config(tmp_path, DEMO_ROUTES + '[backend]\nkind = "fleet"\npool_depth = 7\n')
    assert cfg.fleet.pool_depth == 7 and cfg.fleet.heartbeat_timeout_s == 15


async def test_a_fleet_sidecar_on_its_own_store_says_which_store_its_agents_must_use(tmp_path, caplog):
    """Without [store], a fleet sidecar uses its own SQLite file: right on one host whose
    agents use that file, and a silent fleet of 503s otherwise. The log names the file."""
    import logging
    cfg = make_config(tmp_path, DEMO_ROUTES + '[backend]\nkind = "fleet"\n')
    with caplog.at_level(logging.WARNING, logger="micropay.sidecar"):
        rt = await create_runtime(cfg)
        await rt.node.close()
        await rt.store.close()
    said = [r.getMessage() for r in caplog.records if "own store" in r.getMessage()]
    assert len(said) == 1 and f"micropay-fleet-store=sqlite:///{tmp_path / 'data'}" in said[0], said
    caplog.clear()
    shared = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    with caplog.at_level(logging.WARNING, logger="micropay.sidecar"):
        rt = await create_runtime(make_config(tmp_path, DEMO_ROUTES + '[backend]\nkind = "fleet"\n',
                                              store_url=shared))
        await rt.node.close()
        await rt.store.close()
    assert not [r for r in caplog.records if "own store" in r.getMessage()]


async def test_a_fleet_sidecar_serves_a_lightning_address_and_splits_through_the_queue(tmp_path, store_url):
    """Tips in fleet mode: the callback's invoice is asked of an agent and commits to the
    metadata's hash; the settlement arrives from the store; the collaborator's share is
    paid by the agent through the payment queue, under the operator's caps."""
    import hashlib
    net = SandboxNetwork()
    merchant, payer = net.add_node("merchant"), net.add_node("payer", 10_000_000)
    carol = net.add_node("carol")
    toml = fleet_toml(store_url) + textwrap.dedent(f"""
        [[addresses]]
        name = "alice"
        description = "Tips for Alice"
        keep_share = 1
        splits = [{{ destination = "{carol.id}", share = 1, name = "carol" }}]
        """)
    rt = await create_runtime(make_config(tmp_path, toml))
    runner = make_runner(build_app(rt))
    await runner.setup()
    from aiohttp import web
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    agent_store = open_store_from_url(store_url, (FLEET_SCHEMA,))
    await agent_store.open()
    agent = FleetAgent(merchant, FleetRepository(agent_store),
                       AgentSettings(min_left_s=120, max_payment_msat=100_000, per_subject_day_msat=100_000,
                                     per_day_msat=1_000_000, max_fee_msat=1_000))
    agent_task = asyncio.create_task(run_agent(agent))
    try:
        for _ in range(500):        # the agent's first heartbeat: until then no node of the fleet is up
            if await agent.repo.live_nodes(int(time.time() * 1000) - 15_000):
                break
            await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/.well-known/lnurlp/alice") as r:
                pay_request = await r.json()
            async with http.get(pay_request["callback"], params={"amount": "10001"}) as r:
                assert r.status == 200, await r.text()
                answer = await r.json()
        decoded = decode_invoice(answer["pr"])
        assert decoded.payee == await merchant.node_id() and decoded.amount_msat == 10_001
        assert decoded.description_hash == hashlib.sha256(pay_request["metadata"].encode()).hexdigest()
        await payer.pay(answer["pr"])
        for _ in range(1000):
            if carol.keysends_received:
                break
            await asyncio.sleep(0.02)
        assert [a for a, _ in carol.keysends_received] == [5000]        # 10,001 * 1/2, the remainder carried
        for _ in range(1000):
            page = await rt.creators.service.list()
            if page["tips"][0]["shares"][0]["status"] == "paid":
                break
            await asyncio.sleep(0.02)
        tip = page["tips"][0]
        assert tip["status"] == "paid" and tip["received_msat"] == 10_001
        assert tip["shares"][0]["status"] == "paid"
        queued = await agent_store.query("SELECT kind, subject, amount_msat, state FROM micropay_fleet_payments")
        assert queued == [("tip share", "creator:alice", 5000, "paid")]
    finally:
        agent_task.cancel()
        await runner.cleanup()
        await agent_store.close()
