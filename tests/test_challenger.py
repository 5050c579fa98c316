"""The challenge service (micropay/challenger.py), with no HTTP: reuse, limits, records."""
import pytest

from micropay.challenger import Challenger
from micropay.config import ChallengeLimits
from micropay.errors import Overloaded, RateLimited
from micropay.lightning.sandbox import SandboxNetwork
from micropay.pricing import RouteRule
from micropay.receipts import ReceiptSigner
from micropay.store.l402 import ChallengeStatus, L402Repository
from micropay.tokens import RootKeyRing, TokenService

RULE = RouteRule(path="/a", price_msat=1000)


def challenger(store, tmp_path, **limits):
    net = SandboxNetwork(clock=lambda: 1_800_000_000)
    tokens = TokenService(RootKeyRing.load_or_create(tmp_path / "keys.json"), "svc", lambda: 1_800_000_000)
    c = Challenger(tokens=tokens, node=net.add_node("n"), l402=L402Repository(store),
                   limits=ChallengeLimits(**limits), receipts=ReceiptSigner.load_or_create(tmp_path / "rk"),
                   clock=lambda: 1_800_000_000)
    return c, net


async def test_a_client_gets_its_pending_challenge_back(store, tmp_path):
    c, _ = challenger(store, tmp_path)
    first = await c.challenge("1.2.3.4", RULE, 1000, "d", None)
    assert (await c.challenge("1.2.3.4", RULE, 1000, "d", None)) == first
    assert (await c.challenge("5.6.7.8", RULE, 1000, "d", None)).payment_hash != first.payment_hash
    assert (await c.challenge("1.2.3.4", RULE, 2000, "d", None)).payment_hash != first.payment_hash  # new price
    assert c.metrics.challenges[RULE.key] == 3 and c.metrics.challenges_reused[RULE.key] == 1


async def test_limits_refuse_before_any_invoice_is_made(store, tmp_path):
    c, net = challenger(store, tmp_path, max_pending=20, max_pending_per_client=2, per_client_per_minute=100)
    await c.challenge("a", RouteRule(path="/1", price_msat=1), 1, "d", None)
    await c.challenge("a", RouteRule(path="/2", price_msat=1), 1, "d", None)
    with pytest.raises(RateLimited, match="for this client"):
        await c.challenge("a", RouteRule(path="/3", price_msat=1), 1, "d", None)
    await c.close()                          # its records written: another process counts them
    c2, _ = challenger(store, tmp_path / "x", max_pending=2, per_client_per_minute=100)
    with pytest.raises(Overloaded):
        await c2.challenge("b", RULE, 1000, "d", None)
    c3, _ = challenger(store, tmp_path / "y", per_client_per_minute=1, max_pending=100)
    await c3.challenge("c", RouteRule(path="/p", price_msat=5), 5, "d", None)
    with pytest.raises(RateLimited, match="too many new invoices"):
        await c3.challenge("c", RouteRule(path="/q", price_msat=5), 5, "d", None)


async def test_a_settlement_marks_the_challenge_paid_and_keeps_a_receipt(store, tmp_path):
    c, net = challenger(store, tmp_path)
    rec = await c.challenge("a", RULE, 1000, "d", None)
    payer = net.add_node("payer", 10**9)
    await payer.pay(rec.bolt11)
    (s,) = [s async for s in _first(c.node.settlements(0))]
    await c.settled(s)
    await c.settled(s)                         # handed over twice after a crash: counted once
    assert (await c.l402.get_challenge(rec.payment_hash)).status == ChallengeStatus.PAID
    assert c.metrics.settlements == 1 and c.metrics.revenue_msat == 1000


async def _first(it):
    async for s in it:
        yield s
        return


async def test_a_record_not_written_yet_is_reused_counted_and_written_at_close(store, tmp_path):
    c, _ = challenger(store, tmp_path, max_pending_per_client=2, per_client_per_minute=100)
    first = await c.challenge("a", RULE, 1000, "d", None)
    assert c.writer.holds(first.payment_hash)                        # not written yet ...
    assert await c.challenge("a", RULE, 1000, "d", None) == first     # ... and handed out again
    await c.challenge("a", RouteRule(path="/2", price_msat=1), 1, "d", None)
    with pytest.raises(RateLimited, match="for this client"):          # ... and counted
        await c.challenge("a", RouteRule(path="/3", price_msat=1), 1, "d", None)
    await c.close()
    assert not c.writer.holds(first.payment_hash)
    assert (await c.l402.get_challenge(first.payment_hash)) == first


async def test_records_made_together_are_written_in_one_transaction(store, tmp_path):
    import asyncio
    c, _ = challenger(store, tmp_path, per_client_per_minute=1000)
    real, batches = c.l402.add_challenges, []

    async def counting(records):
        batches.append(len(records))
        await real(records)
    c.l402.add_challenges = counting
    await asyncio.gather(*(c.challenge(f"client-{i}", RULE, 1000, "d", None) for i in range(50)))
    await c.close()
    assert sum(batches) == 50 and len(batches) < 10
    assert (await c.l402.count_pending(1_800_000_000)) == 50
