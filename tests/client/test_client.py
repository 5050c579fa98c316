"""The auto-paying client against a real sidecar, and against servers that lie."""
import json
import stat

import pytest
from aiohttp import web

from micropay.client.payer import Budget, L402Client, NodeWallet, PaidInvoice, TokenCache
from micropay.core.errors import BudgetExceeded, InvoiceMismatch, PaymentFailed, PaymentUnknown
from micropay.lightning.sandbox import SandboxNetwork

from ..conftest import FakeClock, make_config, serve_app, start_sidecar


def client(sc, tmp_path, budget=Budget(), **kw):
    return L402Client(NodeWallet(sc.payer), budget, TokenCache(tmp_path / "client.json"), **kw)


async def test_pays_once_then_reuses_credits_across_runs(sidecar, tmp_path):
    events = []
    c1 = client(sidecar, tmp_path, on_event=events.append)
    r = await c1.get(sidecar.url + "/api/fortune/1")
    assert r.status == 200 and r.paid_msat == 5000 and r.receipt["credits_remaining"] == 2
    assert any("invoice for 5000 msat" in e for e in events) and any("paid 5000" in e for e in events)
    assert stat.S_IMODE((tmp_path / "client.json").stat().st_mode) == 0o600
    c2 = client(sidecar, tmp_path)            # a new process, same cache file
    balance = sidecar.payer.balance_msat
    for i in (2, 3):
        r = await c2.get(f"{sidecar.url}/api/fortune/{i}")
        assert r.status == 200 and r.paid_msat == 0
    assert sidecar.payer.balance_msat == balance
    r = await c2.get(sidecar.url + "/api/fortune/4")          # credits gone: pays again
    assert r.status == 200 and r.paid_msat == 5000


async def test_budgets_are_checked_before_paying(sidecar, tmp_path):
    balance = sidecar.payer.balance_msat
    with pytest.raises(BudgetExceeded, match="per-request"):
        await client(sidecar, tmp_path, Budget(max_per_request_msat=999)).get(sidecar.url + "/api/joke")
    c = client(sidecar, tmp_path, Budget(max_per_request_msat=None, max_per_host_per_day_msat=2500,
                                         max_total_msat=None, max_fee_msat=0))
    assert (await c.get(sidecar.url + "/api/joke")).status == 200
    assert (await c.get(sidecar.url + "/api/joke")).status == 200
    with pytest.raises(BudgetExceeded, match="daily budget"):
        await c.get(sidecar.url + "/api/joke")
    assert sidecar.payer.balance_msat == balance - 2000
    c = client(sidecar, tmp_path, Budget(max_per_request_msat=None, max_per_host_per_day_msat=None,
                                         max_total_msat=2500, max_fee_msat=0))
    with pytest.raises(BudgetExceeded, match="total budget"):
        await c.get(sidecar.url + "/api/joke")
    assert not [s for s in c.cache.state.spends.values() if s.status == "paying"]


async def test_daily_budget_rolls_over(tmp_path):
    clock = FakeClock()
    sc = await start_sidecar(make_config(tmp_path), clock=clock)
    try:
        c = client(sc, tmp_path, Budget(None, 1000, None, 0), clock=clock)
        assert (await c.get(sc.url + "/api/joke")).paid_msat == 1000
        with pytest.raises(BudgetExceeded):
            await c.get(sc.url + "/api/joke")
        clock.advance(86401)
        assert (await c.get(sc.url + "/api/joke")).paid_msat == 1000
    finally:
        await sc.runner.cleanup()


async def lying_server(mode):
    """A server whose 402 does not agree with itself."""
    net = SandboxNetwork()
    node = net.add_node("liar")
    from micropay.l402.wire import challenge_headers
    from micropay.l402.tokens import RootKeyRing, TokenService
    svc = TokenService(RootKeyRing.ephemeral(), "x")

    async def handler(request):
        inv = await node.create_invoice(1000, request.path + str(id(request)), "d", 600)
        other = await node.create_invoice(1000, "o" + str(id(request)), "d", 600)
        ph = other.payment_hash if mode == "hash" else inv.payment_hash
        mac = svc.mint(bytes.fromhex(ph), ["services=x:0", "path=/"])
        body = {"price_msat": 10 if mode == "price" else 1000}
        resp = web.json_response(body, status=402)
        for v in challenge_headers(mac.serialize(), inv.bolt11):
            resp.headers.add("WWW-Authenticate", v)
        return resp

    app = web.Application()
    app.router.add_get("/", handler)
    runner, url = await serve_app(app)
    return runner, url + "/", net.add_node("p", 10**9)


@pytest.mark.parametrize("mode,match", [("price", "the price is 10 msat"), ("hash", "payment hash")])
async def test_refuses_inconsistent_challenges(mode, match, tmp_path):
    runner, url, payer = await lying_server(mode)
    try:
        c = L402Client(NodeWallet(payer), Budget(), TokenCache(tmp_path / "c.json"))
        with pytest.raises(InvoiceMismatch, match=match):
            await c.get(url)
        assert payer.balance_msat == 10**9
    finally:
        await runner.cleanup()


class CrashAfterPaying:
    """Pays for real, then dies before the client can record anything."""

    def __init__(self, node):
        self.node = node

    async def pay(self, bolt11, amount_msat, max_fee_msat):
        await self.node.pay(bolt11, max_fee_msat=max_fee_msat)
        raise KeyboardInterrupt("process killed mid-payment")


async def test_crash_mid_payment_then_retry_pays_once(sidecar, tmp_path):
    cache_path = tmp_path / "client.json"
    balance = sidecar.payer.balance_msat
    crashing = L402Client(CrashAfterPaying(sidecar.payer), Budget(), TokenCache(cache_path))
    with pytest.raises(KeyboardInterrupt):
        await crashing.get(sidecar.url + "/api/fortune/1")
    assert sidecar.payer.balance_msat == balance - 5000
    events = []
    again = L402Client(NodeWallet(sidecar.payer), Budget(), TokenCache(cache_path), on_event=events.append)
    r = await again.get(sidecar.url + "/api/fortune/1")
    assert r.status == 200
    assert sidecar.payer.balance_msat == balance - 5000         # not paid twice
    assert any("interrupted payment" in e for e in events)
    spends = list(again.cache.state.spends.values())
    assert [(s.status, s.amount_msat) for s in spends] == [("paid", 5000)]


class LostAfterPaying:
    """Pays for real, then the connection to the node drops before the answer: the
    wallet cannot say whether anything was paid (what kill -9 of lightningd looks like)."""

    def __init__(self, node):
        self.node = node

    async def pay(self, bolt11, amount_msat, max_fee_msat):
        await self.node.pay(bolt11, max_fee_msat=max_fee_msat)
        raise PaymentUnknown("connection to lightningd closed")


async def test_an_unknown_outcome_keeps_the_intent_and_the_next_run_finishes_it(sidecar, tmp_path):
    cache_path = tmp_path / "client.json"
    balance = sidecar.payer.balance_msat
    with pytest.raises(PaymentUnknown):
        await L402Client(LostAfterPaying(sidecar.payer), Budget(), TokenCache(cache_path)).get(
            sidecar.url + "/api/fortune/1")
    kept = list(TokenCache(cache_path).state.spends.values())
    assert [(s.status, s.amount_msat) for s in kept] == [("paying", 5000)]   # counted, not forgotten
    again = L402Client(NodeWallet(sidecar.payer), Budget(), TokenCache(cache_path))
    assert (await again.get(sidecar.url + "/api/fortune/1")).status == 200
    assert sidecar.payer.balance_msat == balance - 5000                      # not paid twice
    assert [(s.status, s.amount_msat) for s in again.cache.state.spends.values()] == [("paid", 5000)]


async def test_failed_payment_releases_the_budget(sidecar, tmp_path):
    class Broke:
        async def pay(self, *a):
            raise PaymentFailed("no route")

    c = L402Client(Broke(), Budget(), TokenCache(tmp_path / "c.json"))
    with pytest.raises(PaymentFailed):
        await c.get(sidecar.url + "/api/joke")
    assert c.cache.state.spends == {}
    assert json.loads((tmp_path / "c.json").read_text())["spends"] == {}


async def test_paid_invoice_wallet_result_is_checked(sidecar, tmp_path):
    class Liar:
        async def pay(self, *a):
            return PaidInvoice("00" * 32, 1000, 0)

    with pytest.raises(PaymentFailed, match="preimage"):
        await L402Client(Liar(), Budget(), TokenCache(None)).get(sidecar.url + "/api/joke")
