"""The PostgreSQL store goes away under load and comes back: requests get 503 with
Retry-After (never a 500), nothing is half-written, and service resumes by itself.

The outage is made by a TCP relay between the sidecar and PostgreSQL that drops every
connection and refuses new ones for a while, as a server restart or a network cut does.
"""
import asyncio
import contextlib

import aiohttp
import pytest

from micropay.games.apikeys import create_key
from micropay.games.repository import PurchaseRepository

from ..conftest import PG_SKIP_REASON, drop_pg_schema, make_config, pg_url_with_fresh_schema, start_sidecar
from ..games_util import GAMES_TOML

pytestmark = pytest.mark.postgres


class Relay:
    def __init__(self) -> None:
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.down = False
        self.links: set[asyncio.StreamWriter] = set()

    async def start(self) -> "Relay":
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _link(self, reader, writer) -> None:
        if self.down:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)
        except OSError:
            writer.close()
            return
        self.links |= {writer, up_writer}

        async def pipe(src, dst):
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.down = True
        for w in self.links:
            w.transport.abort()
        self.links.clear()

    def restore(self) -> None:
        self.down = False

    async def stop(self) -> None:
        self.cut()
        self.server.close()


async def test_postgres_outage_under_load(tmp_path):
    if PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    relay = await Relay().start()
    direct = pg_url_with_fresh_schema()
    via_relay = direct.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
    toml = 'demo = true\ntrust_forwarded_for = true\n' + GAMES_TOML + \
        '\n[challenges]\nper_client_per_minute = 100000\n[[routes]]\nmethod = "GET"\npath = "/api/joke"\nprice_msat = 1000\n'
    sc = await start_sidecar(make_config(tmp_path, toml, store_url=via_relay))
    key, _ = await create_key(sc.rt.store, "load", ["purchases:write", "purchases:read"])
    statuses, created = [], []
    stop = asyncio.Event()

    async def client(n: int) -> None:
        async with aiohttp.ClientSession() as s:
            for i in range(400):                       # bounded
                if stop.is_set():
                    return
                if i % 2:
                    async with s.get(sc.url + "/api/joke", headers={"X-Forwarded-For": f"10.0.{n}.{i % 250}"}) as r:
                        statuses.append((r.status, r.headers.get("Retry-After")))
                else:
                    body = {"sku": "gems-100", "player_id": f"p{n}", "idempotency_key": f"c{n}-{i}"}
                    async with s.post(sc.url + "/v1/purchases", json=body,
                                      headers={"Authorization": f"Bearer {key}"}) as r:
                        statuses.append((r.status, r.headers.get("Retry-After")))
                        if r.status == 201:
                            created.append((await r.json())["id"])
                await asyncio.sleep(0.01)
    try:
        load = [asyncio.create_task(client(n)) for n in range(4)]
        await asyncio.sleep(0.5)
        relay.cut()                                    # PostgreSQL "restarts"
        await asyncio.sleep(2.0)
        during = len(statuses)
        relay.restore()
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*load)
        codes = {code for code, _ in statuses}
        assert codes <= {200, 201, 402, 503}, codes               # never a 500
        assert 503 in codes and all(after for code, after in statuses if code == 503)
        assert {code for code, _ in statuses[during:]} & {201, 402}   # back by itself
        # nothing half-written: every purchase answered 201 is there, with its invoice
        for pid in created:
            p = await PurchaseRepository(sc.rt.store).by_id(pid)
            assert p is not None and p.bolt11.startswith("lnbcrt")
        count = (await sc.rt.store.query("SELECT COUNT(*) FROM micropay_purchases"))[0][0]
        assert count >= len(created)
    finally:
        await sc.runner.cleanup()
        await relay.stop()
        await drop_pg_schema(direct)
