"""Shared fixtures: stores (SQLite and PostgreSQL), sandbox network, a running sidecar."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from pathlib import Path

import pytest
from aiohttp import web

from micropay.seller.config import ChallengeLimits, Config
from micropay.seller.configfile import parse_config
from micropay.lightning.sandbox import SandboxNetwork
from micropay.sidecar.app import Runtime, build_app, create_runtime, make_runner
from micropay.games.schema import GAMES_SCHEMA
from micropay.store import CORE_SCHEMA, open_store_from_url

PG_URL = os.environ.get("MICROPAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_reachable() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return None
    except OSError as exc:
        return f"PostgreSQL not reachable at 127.0.0.1:5432 ({exc}); set MICROPAY_TEST_PG"


PG_SKIP_REASON = _pg_reachable()


def pg_url_with_fresh_schema() -> str:
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}schema=mp_test_{uuid.uuid4().hex[:12]}"


async def drop_pg_schema(url: str) -> None:
    import asyncpg

    from micropay.store.postgres import split_schema
    dsn, schema = split_schema(url)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


ALL_SCHEMAS = (CORE_SCHEMA, GAMES_SCHEMA)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store_from_url(f"sqlite:///{tmp_path / 'store.sqlite3'}", ALL_SCHEMAS)
        await s.open()
        yield s
        await s.close()
        return
    if PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    url = pg_url_with_fresh_schema()
    s = open_store_from_url(url, ALL_SCHEMAS)
    await s.open()
    yield s
    await s.close()
    await drop_pg_schema(url)


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


DEMO_ROUTES = """
service = "test"
demo = true
[[routes]]
method = "GET"
path = "/api/joke"
price_msat = 1000
description = "joke"
[[routes]]
method = "GET"
path = "/api/fortune/*"
price_msat = 5000
credits = 3
[[routes]]
method = ["GET", "POST"]
path = "/api/echo"
price_msat = 2000
pass_s = 3600
"""


def make_config(tmp_path: Path, toml_text: str = DEMO_ROUTES, **overrides) -> Config:
    import tomllib
    cfg = parse_config(tomllib.loads(toml_text), "test.toml")
    return cfg.with_overrides(data_dir=tmp_path / "data", **overrides)


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    """Run `app` on 127.0.0.1 on a free port; returns (runner, base URL)."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


class Sidecar:
    """A sidecar app on 127.0.0.1 with a sandbox node and a funded payer node."""

    def __init__(self, rt: Runtime, runner: web.AppRunner, port: int, payer) -> None:
        self.rt, self.runner, self.port, self.payer = rt, runner, port, payer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_sidecar(cfg: Config, clock=None, node=None, sandbox=None) -> Sidecar:
    """In fleet mode (`[backend] kind = "fleet"`) no node is given: the runtime makes its
    FleetBackend from the config, as `micropay serve` does."""
    import time as _time
    clock = clock or _time.time
    net = sandbox or SandboxNetwork(clock)
    if cfg.backend != "fleet":
        node = node or net.add_node("merchant")
    rt = await create_runtime(cfg, node=node, clock=clock)
    rt.sandbox = net
    runner = make_runner(build_app(rt))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return Sidecar(rt, runner, port, net.add_node("payer", 10_000_000_000))


@pytest.fixture
async def sidecar(tmp_path):
    sc = await start_sidecar(make_config(tmp_path))
    yield sc
    await sc.runner.cleanup()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def limits():
    return ChallengeLimits()


async def payment_receipt(store, payment_hash: str) -> str | None:
    """The receipt the settlement watcher stored for a paid challenge (no product code reads
    it back; the tests do, to check it was written)."""
    rows = await store.query("SELECT receipt FROM micropay_receipts WHERE payment_hash = $1", (payment_hash,))
    return rows[0][0] if rows else None


@contextlib.contextmanager
def sidecars_sharing_postgres(tmp_path: Path, config_body: str, n: int = 2):
    """`n` `micropay serve` processes on 127.0.0.1 sharing one fresh PostgreSQL schema
    (skips, saying why, without PostgreSQL). `config_body`: the TOML after the store."""
    from .helpers_proc import ServerProcess, free_port
    if PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    url = pg_url_with_fresh_schema()
    cfg = tmp_path / "shared.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\ndemo = true\n{config_body}\n[store]\nurl = "{url}"\n')
    servers = []
    try:
        for _ in range(n):
            port = free_port()
            servers.append(ServerProcess(["serve", "--config", str(cfg), "--listen", f"127.0.0.1:{port}"],
                                         tmp_path, port))
        yield servers
    finally:
        for s in servers:
            s.stop()
        asyncio.run(drop_pg_schema(url))


@pytest.fixture
def nostr_relay(tmp_path):
    """A real Nostr relay on 127.0.0.1 (rust-nostr's LocalRelay in its own process)."""
    pytest.importorskip("nostr_sdk", reason="nostr-sdk is not installed (pip install '.[test]'): "
                        "it provides the loopback relay")
    from tests.helpers_proc import free_port
    from tests.nostr_relay import RelayProcess
    relay = RelayProcess(free_port(), tmp_path)
    yield relay
    relay.stop()


class SlowInvoices:
    """Wraps a sandbox node's create_invoice: each call takes `delay_s`, one for the
    description `refuse` raises NodeError; counts the calls in flight at most at once
    (`peak`) and the refusals."""

    def __init__(self, node, delay_s: float, refuse: str) -> None:
        self.real, self.delay_s, self.refuse = node.create_invoice, delay_s, refuse
        self.inflight = self.peak = self.refused = 0
        node.create_invoice = self

    async def __call__(self, amount, label, description, expiry_s, **kw):
        from micropay.core.errors import NodeError
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            await asyncio.sleep(self.delay_s)
            if description == self.refuse:
                self.refused += 1
                raise NodeError("the node said no")
            return await self.real(amount, label, description, expiry_s, **kw)
        finally:
            self.inflight -= 1
