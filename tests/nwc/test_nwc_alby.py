"""Alby's NWC client (@getalby/sdk 8.0.3, from npm, run by node) drives the plugin's NWC
service on a sandbox node through a real relay on loopback."""
from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from .test_nwc_service import connect, wallet  # noqa: F401  (the fixture)

JS = Path(__file__).resolve().parents[1] / "js"


def _why_not() -> str | None:
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not (JS / "node_modules" / "@getalby" / "sdk").is_dir():
        return "@getalby/sdk is not installed: npm ci --prefix tests/js (.ci/run does it)"
    return None


async def alby(uri: str, steps: list) -> list:
    proc = await asyncio.create_subprocess_exec(
        "node", "--experimental-websocket", "--no-warnings", str(JS / "nwc_alby.mjs"), uri, json.dumps(steps),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return json.loads(out.decode().strip().splitlines()[-1])


async def test_alby_client_uses_the_service(wallet):  # noqa: F811
    why = _why_not()
    if why:
        pytest.skip(why)
    runner, node, shop = wallet
    created, _ = await connect(runner, budget_msat=40_000)
    bill = await shop.create_invoice(21_000, "alby-bill", "a bill", 600)
    big = await shop.create_invoice(30_000, "alby-big", "over budget", 600)
    info, balance, made, paid, over = await alby(created["uri"], [
        ["getInfo", {}], ["getBalance", {}], ["makeInvoice", {"amount": 5000, "description": "from alby"}],
        ["payInvoice", {"invoice": bill.bolt11}], ["payInvoice", {"invoice": big.bolt11}]])
    assert info["result"]["pubkey"] == await node.node_id() and "pay_invoice" in info["result"]["methods"]
    assert balance["result"]["balance"] == 40_000
    assert (await node.decode(made["result"]["invoice"])).amount_msat == 5000
    assert paid["result"]["preimage"] and shop.invoice_status(bill.payment_hash) == "paid"
    assert over["error"]["code"] == "QUOTA_EXCEEDED" and shop.invoice_status(big.payment_hash) == "unpaid"
    await shop.pay(made["result"]["invoice"])
    await asyncio.sleep(0.3)
    [looked, listed] = await alby(created["uri"], [
        ["lookupInvoice", {"payment_hash": made["result"]["payment_hash"]}], ["listTransactions", {"limit": 10}]])
    assert looked["result"]["state"] == "settled" and looked["result"]["amount"] == 5000
    assert sorted(t["type"] for t in listed["result"]["transactions"]) == ["incoming", "outgoing"]
    await runner.service.revoke(created["id"])
    await runner.changed()
    [revoked] = await alby(created["uri"], [["getBalance", {}]])
    assert "error" in revoked


async def test_our_nwc_wallet_pays_through_albys_wallet_service(tmp_path, nostr_relay):
    """The client's nwc wallet against a wallet service that is not ours: @getalby/sdk's
    NWCWalletService, paying from a sandbox wallet of the sidecar whose 402 is paid."""
    why = _why_not()
    if why:
        pytest.skip(why)
    from micropay.client.nwc_wallet import NwcWallet
    from micropay.client.payer import Budget, L402Client, TokenCache

    from ..conftest import make_config, start_sidecar
    sc = await start_sidecar(make_config(tmp_path))
    proc = await asyncio.create_subprocess_exec(
        "node", "--experimental-websocket", "--no-warnings", str(JS / "nwc_alby_service.mjs"), nostr_relay.url,
        f"{sc.url}/sandbox/wallets/alby", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    wallet = None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.startswith(b"URI "), (line, await proc.stderr.read(2000))
        await asyncio.sleep(0.5)
        before = sc.rt.node.balance_msat
        wallet = NwcWallet(line.decode().split(" ", 1)[1].strip())
        client = L402Client(wallet, Budget(), TokenCache(tmp_path / "cache.json"))
        res = await client.get(sc.url + "/api/joke")
        assert res.status == 200 and res.paid_msat == 1000
        assert sc.rt.node.balance_msat - before == 1000
        assert (await sc.payer.decode(await wallet.invoice_any("refund", 3600))).amount_msat is None
    finally:
        if wallet is not None:
            await wallet.close()
        proc.kill()
        await proc.wait()
        await sc.runner.cleanup()
