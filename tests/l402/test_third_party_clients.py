"""L402 clients nobody here wrote, as they come from their registries, against the sidecar:
l402-requests and Fewsats' l402 0.0.9 (PyPI), lsat-js (npm, driven by node). pymacaroons
is in test_macaroon.py. Each parses our challenge, pays through the sandbox and makes the
paid request; when the credential is spent, the 402 they get carries a fresh challenge
(bLIP-26, reusing credentials), so they pay again instead of failing."""
import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from micropay.l402.macaroon import Macaroon

JS_DIR = Path(__file__).parents[1] / "js"


class SandboxWallet:
    """Pays with the sandbox payer node; what a wallet adapter hands a client library."""

    def __init__(self, node) -> None:
        self.node, self.paid = node, []

    async def pay(self, invoice: str) -> str:
        p = await self.node.pay(invoice)
        self.paid.append(p.amount_msat)
        return p.preimage


async def test_l402_requests(sidecar):
    l402_requests = pytest.importorskip("l402_requests", reason="l402-requests is not installed ('.[test]')")
    from l402_requests.wallets import WalletBase

    wallet = SandboxWallet(sidecar.payer)

    class Adapter(WalletBase):
        async def pay_invoice(self, bolt11: str) -> str:
            return await wallet.pay(bolt11)

    async with l402_requests.AsyncL402Client(wallet=Adapter(),
                                             budget=l402_requests.BudgetController(max_sats_per_request=10)) as c:
        first = await c.get(sidecar.url + "/api/joke")
        again = await c.get(sidecar.url + "/api/joke")     # the cached credential is spent: pays anew
    assert first.status_code == again.status_code == 200
    assert "joke" in first.json() and first.headers["Payment-Receipt"]
    assert wallet.paid == [1000, 1000]


async def test_fewsats_l402_client(sidecar):
    pytest.importorskip("l402.client.client", reason="Fewsats' l402 0.0.9 is not installed ('.[test]')")
    from l402.client.client import Client
    from l402.client.credentials import CredentialsService

    wallet = SandboxWallet(sidecar.payer)

    class Preimages:
        async def get_preimage(self, invoice: str) -> str:
            return await wallet.pay(invoice)

    class Memory(CredentialsService):
        def __init__(self) -> None:
            self.by_location = {}

        async def store(self, credentials) -> None:
            self.by_location[credentials.location] = credentials

        async def get(self, location: str):
            return self.by_location.get(location)

    client = Client(preimage_provider=Preimages(), credentials_service=Memory())
    statuses = [(await client.request("GET", sidecar.url + "/api/joke")).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]       # 0.0.9 raised on the bare 402 of a spent credential
    assert wallet.paid == [1000, 1000, 1000]


def _node_and_lsat_js() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not (JS_DIR / "node_modules" / "lsat-js").is_dir():
        return "lsat-js is not installed: npm install --prefix tests/js (.ci/run does it)"
    return None


async def test_lsat_js_pays_and_its_expiration_caveat_is_honoured(sidecar):
    why = _node_and_lsat_js()
    if why:
        pytest.skip(why)

    def node(*args: str) -> dict:
        res = subprocess.run(["node", str(JS_DIR / "lsat_client.js"), *args], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    out = await asyncio.to_thread(node, "pay", sidecar.url, "/api/fortune/1")
    assert out["status"] == 200 and "fortune" in json.loads(out["body"])
    # attenuate the paid token with lsat-js's expiration caveats (milliseconds since the epoch)
    mac_b64, preimage = out["token"].removeprefix("LSAT ").split(":")
    tokens = {}
    for when in ("past", "future"):
        mac = Macaroon.deserialize(mac_b64).add_first_party_caveat(out["caveats"][when].encode())
        tokens[when] = f"LSAT {mac.serialize()}:{preimage}"
    import aiohttp
    async with aiohttp.ClientSession() as s:
        async with s.get(sidecar.url + "/api/fortune/2", headers={"Authorization": tokens["past"]}) as r:
            assert r.status == 402 and (await r.json())["error"] == "token_expired"
            assert r.headers.getall("WWW-Authenticate")         # with a fresh challenge
        async with s.get(sidecar.url + "/api/fortune/2", headers={"Authorization": tokens["future"]}) as r:
            assert r.status == 200 and r.headers["Payment-Credits-Remaining"] == "1"
    # lsat-js reads the same tokens the same way
    assert (await asyncio.to_thread(node, "expired", tokens["past"]))["expired"] is True
    assert (await asyncio.to_thread(node, "expired", tokens["future"]))["expired"] is False
