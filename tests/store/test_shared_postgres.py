"""Two sidecar processes sharing one PostgreSQL store: credits are spent exactly once."""
import asyncio
import json

import aiohttp
import pytest

from micropay.l402.wire import format_authorization, parse_challenges

from ..conftest import sidecars_sharing_postgres

pytestmark = pytest.mark.postgres

N_REQUESTS, K_CREDITS = 40, 13


@pytest.fixture
def two_sidecars(tmp_path):
    with sidecars_sharing_postgres(tmp_path, f'service = "shared"\n[[routes]]\npath = "/api/fortune/*"\n'
                                             f'price_msat = 5000\ncredits = {K_CREDITS}\n') as servers:
        yield servers


async def test_credits_across_two_processes(two_sidecars):
    a, b = two_sidecars
    async with aiohttp.ClientSession() as s:
        async with s.get(a.url + "/api/fortune/0") as r:
            ch = parse_challenges(r.headers.getall("WWW-Authenticate"))[0]
        async with s.post(a.url + "/sandbox/wallets/w/pay", json={"bolt11": ch.invoice}) as r:
            preimage = (await r.json())["preimage"]
        auth = {"Authorization": format_authorization(ch.macaroon, preimage)}

        async def one(i):
            server = (a, b)[i % 2]
            async with s.get(f"{server.url}/api/fortune/{i}", headers=auth) as r:
                body = await r.read()
                return r.status, json.loads(body)

        results = await asyncio.gather(*(one(i) for i in range(N_REQUESTS)))
    ok = [r for r in results if r[0] == 200]
    exhausted = [r for r in results if r[0] == 402]
    assert len(ok) == min(N_REQUESTS, K_CREDITS)
    assert len(exhausted) == N_REQUESTS - K_CREDITS
    assert all(body["error"] == "credits_exhausted" for _, body in exhausted)
