"""The sandbox wallets' invoice endpoint is bounded per client like the gate's challenges:
each new invoice draws on the same per-client token bucket (`[challenges]
per_client_per_minute`), and past it the answer is 429 with Retry-After."""
import json

import aiohttp
import pytest

from ..conftest import make_config, start_sidecar

TOML = """
service = "sbx"
demo = true
[challenges]
per_client_per_minute = 3
[[routes]]
method = "GET"
path = "/api/joke"
price_msat = 1000
"""


@pytest.fixture
async def sc(tmp_path):
    sidecar = await start_sidecar(make_config(tmp_path, TOML, trust_forwarded_for=True))
    yield sidecar
    await sidecar.runner.cleanup()


async def post(sc, path, body, client="203.0.113.7"):
    async with aiohttp.ClientSession() as s:
        async with s.post(sc.url + path, data=json.dumps(body) if not isinstance(body, bytes) else body,
                          headers={"X-Forwarded-For": client}) as r:
            return r.status, r.headers.copy(), await r.read()


async def test_invoices_past_the_per_client_rate_are_429_with_retry_after(sc):
    for i in range(3):
        status, _, body = await post(sc, "/sandbox/wallets/alice/invoice", {"amount_msat": 1000 + i})
        assert status == 200, body
        assert json.loads(body)["bolt11"].startswith("lnbcrt")
    status, headers, body = await post(sc, "/sandbox/wallets/alice/invoice", {"amount_msat": 1000})
    assert status == 429, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert json.loads(body)["error"] == "rate_limited" and 1 <= int(headers["Retry-After"]) <= 21
    # another wallet name does not reset it: the bound is the client's, not the wallet's
    status, _, _ = await post(sc, "/sandbox/wallets/bob/invoice", {})
    assert status == 429
    # another client has its own bucket
    status, _, body = await post(sc, "/sandbox/wallets/alice/invoice", {}, client="198.51.100.9")
    assert status == 200, body


async def test_the_bound_is_shared_with_challenges(sc):
    """A new invoice is a new invoice, whichever node makes it: one budget per client."""
    for _ in range(3):
        status, _, body = await post(sc, "/sandbox/wallets/alice/invoice", {})
        assert status == 200, body
    async with aiohttp.ClientSession() as s:
        async with s.get(sc.url + "/api/joke", headers={"X-Forwarded-For": "203.0.113.7"}) as r:
            assert r.status == 429 and "Retry-After" in r.headers


async def test_refused_bodies_cost_no_invoice(sc):
    for _ in range(10):
        status, _, _ = await post(sc, "/sandbox/wallets/alice/invoice", {"amount_msat": -1})
        assert status == 400
        status, _, _ = await post(sc, "/sandbox/wallets/alice/invoice", b"[")
        assert status == 400
    status, _, body = await post(sc, "/sandbox/wallets/alice/invoice", {})
    assert status == 200, body
