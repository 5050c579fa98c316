"""The client pays 402s from an NWC wallet: our client library and `micropay get --wallet
nwc:@FILE` (a real process), through a real relay, to the plugin's NWC service running on a
sandbox node of the sidecar's network."""
from __future__ import annotations

import asyncio
import contextlib
import os
import sys

import pytest

from micropay.client.nwc_wallet import NwcWallet
from micropay.client.payer import Budget, L402Client, TokenCache
from micropay.core.errors import PaymentFailed

from ..conftest import make_config, start_sidecar
from .util import nwc_service

pytest.importorskip("nostr_sdk", reason="nostr-sdk is not installed (pip install '.[test]'): it runs the relay")


@pytest.fixture
async def shop_and_wallet(tmp_path, nostr_relay):
    sc = await start_sidecar(make_config(tmp_path))
    try:
        async with nwc_service(sc.payer, tmp_path, nostr_relay.url) as runner:
            yield sc, runner
    finally:
        await sc.runner.cleanup()


async def new_connection(runner, **kw):
    args = dict(budget_msat=10_000, budget_period="daily", methods=("pay_invoice", "make_invoice"),
                max_fee_msat=0)
    args.update(kw)
    created = await runner.service.create("client", **args)
    await runner.changed()
    await asyncio.sleep(0.3)
    return created


async def test_the_client_library_pays_through_nwc(shop_and_wallet, tmp_path):
    sc, runner = shop_and_wallet
    created = await new_connection(runner)
    merchant_before = sc.rt.node.balance_msat
    wallet = NwcWallet(created["uri"])
    assert created["uri"] not in repr(wallet) and "secret" not in repr(wallet)
    client = L402Client(wallet, Budget(), TokenCache(tmp_path / "cache.json"))
    try:
        res = await client.get(sc.url + "/api/joke")
        assert res.status == 200 and res.paid_msat == 1000
        assert sc.rt.node.balance_msat - merchant_before == 1000           # exactly the price arrived
        assert (await runner.service.list())[0]["used_msat"] == 1000
        ret = await wallet.invoice_any("refund", 3600)                      # a session's return invoice
        assert (await sc.payer.decode(ret)).amount_msat is None
        with pytest.raises(PaymentFailed, match="QUOTA_EXCEEDED"):
            for _ in range(20):                                            # 1,000 msat each; budget 10,000
                await client.get(sc.url + "/api/joke", headers={"X-Forwarded-For": "10.9.9.9"})
        assert (await runner.service.list())[0]["used_msat"] == 10_000
        assert sc.rt.node.balance_msat - merchant_before == 10_000
    finally:
        await wallet.close()


async def test_micropay_get_with_an_nwc_wallet_file(shop_and_wallet, tmp_path):
    sc, runner = shop_and_wallet
    created = await new_connection(runner)
    secret_file = tmp_path / "wallet.nwc"
    secret_file.write_text(created["uri"])
    secret_file.chmod(0o644)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "micropay.cli", "get", sc.url + "/api/joke", "--wallet", f"nwc:@{secret_file}",
        "--cache", str(tmp_path / "c.json"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0 and b"chmod 600" in err and created["uri"].encode() not in err   # refused: readable by others
    secret_file.chmod(0o600)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "micropay.cli", "get", sc.url + "/api/joke", "--wallet", f"nwc:@{secret_file}",
        "--cache", str(tmp_path / "c.json"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert (await runner.service.list())[0]["used_msat"] == 1000
    secret = created["uri"].split("secret=")[1].split("&")[0]
    assert secret.encode() not in out + err


async def test_only_a_refusal_releases_the_budget():
    """An answer that says the wallet paid nothing is PaymentFailed; OTHER, INTERNAL or an
    unknown code (our service says OTHER while the invoice is in flight) is PaymentUnknown."""
    from micropay.core.errors import PaymentUnknown
    from micropay.nostr.keys import Keys
    from micropay.nwc.protocol import Code, NwcError
    wallet = NwcWallet(f"nostr+walletconnect://{Keys.generate().pubkey}?relay=ws%3A%2F%2F127.0.0.1%3A9"
                       f"&secret={'11' * 32}")
    for code, expected in ((Code.PAYMENT_FAILED, PaymentFailed), (Code.QUOTA_EXCEEDED, PaymentFailed),
                           (Code.OTHER, PaymentUnknown), (Code.INTERNAL, PaymentUnknown)):
        async def answer(method, params, timeout_s=60.0, code=code):
            raise NwcError(code, "no")
        wallet.client.request = answer
        with pytest.raises(expected):
            await wallet.pay("lnbcrt1...", 1000, 0)


async def test_a_payment_session_deposits_tops_up_and_is_refunded_through_nwc(tmp_path, nostr_relay):
    """The session client on an NWC wallet: deposits and top-ups are paid with pay_invoice,
    the refund comes back on the amountless invoice make_invoice gave; what left the
    wallet's node is exactly the units streamed."""
    from micropay.client.sessions import PaymentSession

    from ..payment.test_sessions import DEPOSIT_UNITS, UNIT_MSAT, routes, start_upstream
    up_runner, up_url, _ = await start_upstream()
    sc = await start_sidecar(make_config(tmp_path, routes(up_url)))
    wallet = None
    runners = contextlib.AsyncExitStack()
    try:
        runner = await runners.enter_async_context(nwc_service(sc.payer, tmp_path, nostr_relay.url))
        created = await new_connection(runner, budget_msat=1_000_000)
        before = sc.payer.balance_msat
        wallet = NwcWallet(created["uri"])
        client = L402Client(wallet, Budget(10_000, 10_000_000, 10_000_000), TokenCache(tmp_path / "c.json"))
        async with PaymentSession(client, wallet, sc.url + "/gen?n=12") as s:
            events = [ev.json()["i"] async for ev in s.stream()]
        assert events == list(range(12)) and s.top_ups == 2
        assert s.closed["refundStatus"] == "succeeded"
        refund = 3 * UNIT_MSAT * DEPOSIT_UNITS - 12 * UNIT_MSAT
        assert s.closed["refundSats"] * 1000 == refund
        assert before - sc.payer.balance_msat == 12 * UNIT_MSAT
        view = (await runner.service.list())[0]
        assert view["used_msat"] == 3 * UNIT_MSAT * DEPOSIT_UNITS            # the deposits left through NWC
        for _ in range(100):
            got = await runner.service.repo.transactions(created["id"], 0, 2**40, False, 10)
            if got[0]:
                break
            await asyncio.sleep(0.05)
        assert [i.received_msat for i in got[0]] == [refund]                 # and the refund came back to it
    finally:
        if wallet is not None:
            await wallet.close()
        await runners.aclose()
        await sc.runner.cleanup()
        await up_runner.cleanup()
