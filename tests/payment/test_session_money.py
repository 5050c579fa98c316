"""Session money through the reverse proxy, checked at the far side: raw request lines
(no client library in between), an upstream that records what reached it, the session
record in the store, and the payer's wallet.

- a session is spent only on its own route, at its own unit price: a bearer echoing a
  challenge of another route, or an old challenge from before a price change, buys
  nothing more than the record says;
- a return invoice names one session, and a refund is found by its own attempt;
- an unknown session is `session-not-found`, whatever the preimage.
"""
import asyncio
import json

import pytest

from micropay.payment import scheme as pa
from micropay.payment.sessions import SessionLedger, refund_label
from micropay.store.sessions import SessionRepository

from ..conftest import make_config, start_sidecar
from ..rawhttp import LoopThread, RecordingUpstream, raw_request
from .test_sessions import return_invoice


def two_routes(up_url: str, cheap_msat: int = 1000, premium_msat: int = 10_000, deposit_units: int = 100) -> str:
    return f"""
service = "money"
upstream = "{up_url}"
[challenges]
per_client_per_minute = 1000     # every refusal carries a fresh invoice: these tests send many
[[routes]]
method = "GET"
path = "/api/cheap"
price_msat = {cheap_msat}
[routes.session]
deposit_units = {deposit_units}
[[routes]]
method = "GET"
path = "/api/premium"
price_msat = {premium_msat}
[routes.session]
deposit_units = {deposit_units}
"""


def offer_of(headers: dict[str, str]) -> pa.Challenge:
    (ch,) = [c for c in pa.parse_challenges([headers["WWW-Authenticate"]]) if c.intent == "session"]
    return ch


def paid_challenge(lt: LoopThread, sc, path: str) -> tuple[pa.Challenge, str]:
    status, headers, _ = raw_request(sc.port, "GET", path)
    assert status == 402
    ch = offer_of(headers)
    paid = lt.run(sc.payer.pay(pa.decode_request(ch)["depositInvoice"]))
    return ch, paid.preimage


def open_on(lt: LoopThread, sc, path: str) -> tuple[pa.Challenge, str, str]:
    """A session opened on `path` with a raw request: (challenge, preimage, session id)."""
    ch, pre = paid_challenge(lt, sc, path)
    auth = pa.format_session_credential(ch, {"action": "open", "preimage": pre,
                                             "returnInvoice": lt.run(return_invoice(sc))})
    status, _, body = raw_request(sc.port, "GET", path, {"Authorization": auth})
    assert status == 200, body
    return ch, pre, pa.decode_request(ch)["paymentHash"]


@pytest.fixture
def world(tmp_path):
    lt = LoopThread()
    up = lt.run(RecordingUpstream().start())
    yield lt, up
    lt.run(up.stop())
    lt.stop()


def test_a_bearer_echoing_another_routes_challenge_cannot_spend_the_session_there(world, tmp_path):
    """The outside review's attack: a session opened (and leased) on /api/cheap, then
    bearers echoing a fresh /api/premium challenge. Nothing is served on premium."""
    lt, up = world
    sc = lt.run(start_sidecar(make_config(tmp_path, two_routes(up.url))))
    try:
        ch, pre, sid = open_on(lt, sc, "/api/cheap")
        cheap = {"Authorization": pa.format_session_credential(ch, {"action": "bearer", "sessionId": sid,
                                                                    "preimage": pre})}
        for _ in range(32):                                  # leases of cheap units in this replica
            assert raw_request(sc.port, "GET", "/api/cheap", cheap)[0] == 200
        status, headers, _ = raw_request(sc.port, "GET", "/api/premium")
        premium_ch = offer_of(headers)
        forged = {"Authorization": pa.format_session_credential(
            premium_ch, {"action": "bearer", "sessionId": sid, "preimage": pre})}
        for _ in range(35):
            status, _, body = raw_request(sc.port, "GET", "/api/premium", forged)
            assert status == 402, body
            assert "opened for GET /api/cheap" in json.loads(body)["detail"]
        # the cheap bearer sent to premium (its challenge names cheap): refused too
        status, _, body = raw_request(sc.port, "GET", "/api/premium", cheap)
        assert status == 402
        assert [s.raw_path for s in up.seen].count("/api/premium") == 0
        # a topUp or a close of the session under premium's challenge: refused, nothing moves
        top_ch, top_pre = paid_challenge(lt, sc, "/api/premium")
        top = pa.format_session_credential(top_ch, {"action": "topUp", "sessionId": sid, "topUpPreimage": top_pre})
        assert raw_request(sc.port, "GET", "/api/premium", {"Authorization": top})[0] == 402
        close = pa.format_session_credential(premium_ch, {"action": "close", "sessionId": sid, "preimage": pre})
        assert raw_request(sc.port, "GET", "/api/premium", {"Authorization": close})[0] == 402
        lt.run(asyncio.sleep(sc.rt.gate.sessions.lease_s + 0.1))
        lt.run(sc.rt.gate.sessions.flush_leases())
        rec = lt.run(sc.rt.gate.sessions.repo.get(sid))
        assert rec.status == "open" and rec.deposit_msat == 100 * 1000
        assert rec.spent_msat == 33 * 1000                  # the open and 32 bearers, at 1 sat
        assert [s.raw_path for s in up.seen].count("/api/cheap") == 33
    finally:
        lt.run(sc.runner.cleanup())


def test_a_bearer_echoing_a_challenge_from_before_a_price_rise_pays_the_sessions_price(world, tmp_path):
    """A challenge saved at 1 sat a unit; the operator raises the price to 5 sat; a session
    opened at 5 sat with a 100 sat deposit serves 20 requests, whatever challenge its
    bearer echoes."""
    lt, up = world
    old_sc = lt.run(start_sidecar(make_config(tmp_path, two_routes(up.url, cheap_msat=1000, deposit_units=20))))
    try:
        old_ch = offer_of(raw_request(old_sc.port, "GET", "/api/cheap")[1])
    finally:
        lt.run(old_sc.runner.cleanup())
    sc = lt.run(start_sidecar(make_config(tmp_path, two_routes(up.url, cheap_msat=5000, deposit_units=20))))
    try:
        assert pa.decode_request(old_ch)["amount"] == "1"
        ch, pre, sid = open_on(lt, sc, "/api/cheap")           # unit 1 of 20, at 5 sat
        assert pa.decode_request(ch)["amount"] == "5"
        stale = {"Authorization": pa.format_session_credential(old_ch, {"action": "bearer", "sessionId": sid,
                                                                        "preimage": pre})}
        served = 1 + sum(raw_request(sc.port, "GET", "/api/cheap", stale)[0] == 200 for _ in range(95))
        assert served == 20
        assert len(up.seen) == 20
        rec = lt.run(sc.rt.gate.sessions.repo.get(sid))
        assert rec.unit_msat == 5000 and rec.spent_msat == rec.deposit_msat == 100_000
    finally:
        lt.run(sc.runner.cleanup())


def test_an_unknown_session_is_session_not_found_whatever_the_preimage(world, tmp_path):
    lt, up = world
    sc = lt.run(start_sidecar(make_config(tmp_path, two_routes(up.url))))
    try:
        ch = offer_of(raw_request(sc.port, "GET", "/api/cheap")[1])
        for action in ("bearer", "close"):
            for pre in ("11" * 32, "22" * 32):
                auth = pa.format_session_credential(ch, {"action": action, "sessionId": "ab" * 32, "preimage": pre})
                status, _, body = raw_request(sc.port, "GET", "/api/cheap", {"Authorization": auth})
                assert status == 402 and json.loads(body)["type"].endswith("/session-not-found"), body
        assert up.seen == []
    finally:
        lt.run(sc.runner.cleanup())


def test_a_return_invoice_named_by_another_session_is_refused_at_open(world, tmp_path):
    """The attack: open a session naming a victim's return invoice. Whoever names it
    second is refused (the deposit stays unused, so the refused client can open again
    with a fresh invoice)."""
    lt, up = world
    sc = lt.run(start_sidecar(make_config(tmp_path, two_routes(up.url))))
    try:
        victims = lt.run(return_invoice(sc))
        ch, pre = paid_challenge(lt, sc, "/api/cheap")
        auth = pa.format_session_credential(ch, {"action": "open", "preimage": pre, "returnInvoice": victims})
        assert raw_request(sc.port, "GET", "/api/cheap", {"Authorization": auth})[0] == 200
        ch2, pre2 = paid_challenge(lt, sc, "/api/cheap")
        for spelling in (victims, victims.upper()):
            stolen = pa.format_session_credential(ch2, {"action": "open", "preimage": pre2, "returnInvoice": spelling})
            status, _, body = raw_request(sc.port, "GET", "/api/cheap", {"Authorization": stolen})
            assert status == 402 and "already named by another session" in json.loads(body)["detail"], body
        fresh = pa.format_session_credential(ch2, {"action": "open", "preimage": pre2,
                                                   "returnInvoice": lt.run(return_invoice(sc))})
        status, _, body = raw_request(sc.port, "GET", "/api/cheap", {"Authorization": fresh})
        assert status == 200, body
    finally:
        lt.run(sc.runner.cleanup())


async def test_a_refund_is_found_by_its_own_attempt_not_by_the_invoice_paid_by_someone_else(store):
    """A payment to the return invoice that is not this session's refund attempt (made
    by anyone, under another label) is never reported as the refund."""
    import hashlib
    import os

    from micropay.lightning.sandbox import SandboxNetwork
    from micropay.payment.scheme import SessionAction
    from micropay.store.sessions import RefundStatus

    from ..conftest import FakeClock
    clock = FakeClock()
    net = SandboxNetwork(clock)
    merchant, payer = net.add_node("merchant", 10**10), net.add_node("payer", 10**10)
    ledger = SessionLedger(SessionRepository(store), merchant, clock=clock, lease_s=0.2)
    preimage = os.urandom(32)
    sid = hashlib.sha256(preimage).hexdigest()
    ret = (await payer.create_invoice(None, "ret", "refund", 86400)).bolt11
    deposit = (await merchant.create_invoice(10_000, "dep", "deposit", 600)).bolt11
    await ledger.open(SessionAction("open", "ch", sid, "GET /x", 1000, 10_000, os.urandom(32).hex(), ret, deposit),
                      int(clock()))
    await merchant.pay(ret, amount_msat=1000, label="someone-else")          # not our refund
    result = await ledger.close(sid)
    # the invoice was already paid: this refund's own attempt failed, and it says so
    assert result.refund_status == RefundStatus.FAILED and result.refund_msat == 10_000
    assert await merchant.lookup_payment(refund_label(sid), 1) is None


def _invoice_with_route_hint(base_fee_msat: int, ppm: int) -> str:
    """An amountless regtest invoice whose one route hint charges base + ppm."""
    import os
    import time

    import bolt11
    from bolt11 import Bolt11, Feature, Features, FeatureState, TagChar, Tags
    from bolt11.models.routehint import Route, RouteHint
    from coincurve import PrivateKey
    key = PrivateKey()
    tags = Tags()
    tags.add(TagChar.payment_hash, os.urandom(32).hex())
    tags.add(TagChar.payment_secret, os.urandom(32).hex())
    tags.add(TagChar.description, "refund")
    tags.add(TagChar.expire_time, 86400)
    tags.add(TagChar.min_final_cltv_expiry, 18)
    tags.add(TagChar.route_hint, RouteHint([Route(PrivateKey().public_key.format().hex(), "1x2x3", base_fee_msat,
                                                   ppm, 40)]))
    tags.add(TagChar.features, Features.from_feature_list({Feature.var_onion_optin: FeatureState.required,
                                                           Feature.payment_secret: FeatureState.required}))
    return bolt11.encode(Bolt11(currency="bcrt", date=int(time.time()), tags=tags), key.secret.hex())


def test_a_return_invoice_whose_route_hints_cost_more_than_the_refund_fee_cap_is_refused_at_open(world, tmp_path):
    lt, up = world
    toml = two_routes(up.url, deposit_units=20).replace("deposit_units = 20\n", "deposit_units = 20\n"
                                                        "refund_max_fee_msat = 2000\n", 1)
    sc = lt.run(start_sidecar(make_config(tmp_path, toml)))
    try:
        assert sc.rt.gate.sessions.refund_fee_cap("GET /api/cheap", 20_000) == 2000
        assert sc.rt.gate.sessions.refund_fee_cap("GET /api/premium", 20_000) == 5000      # the default
        assert sc.rt.gate.sessions.refund_fee_cap("GET /api/premium", 39_000_000) == 390_000   # 1% of a big one
        ch, pre = paid_challenge(lt, sc, "/api/cheap")
        # a 20 sat deposit through a hint of 1 sat + 5%: 2000 msat, at the cap: accepted later
        dear = _invoice_with_route_hint(1500, 50_000)      # 1500 + 1000 msat > 2000
        auth = pa.format_session_credential(ch, {"action": "open", "preimage": pre, "returnInvoice": dear})
        status, _, body = raw_request(sc.port, "GET", "/api/cheap", {"Authorization": auth})
        problem = json.loads(body)
        assert status == 402 and problem["type"].endswith("/invalid-return-invoice"), body
        assert "2500 msat" in problem["detail"] and "at most 2000 msat" in problem["detail"]
        fair = _invoice_with_route_hint(1000, 50_000)      # 1000 + 1000 msat: at the cap
        auth = pa.format_session_credential(ch, {"action": "open", "preimage": pre, "returnInvoice": fair})
        status, _, body = raw_request(sc.port, "GET", "/api/cheap", {"Authorization": auth})
        assert status == 200, body                          # the deposit was still unused
    finally:
        lt.run(sc.runner.cleanup())


def test_the_refund_is_paid_with_the_routes_fee_cap(tmp_path):
    """The cap reaches the node's pay call (the operator pays the fee on top of the refund)."""
    from micropay.seller.pricing import Pricing, parse_route
    rule = parse_route({"path": "/x", "price_msat": 1000, "session": {"refund_max_fee_msat": 1234}}, "t")
    assert rule.session.refund_max_fee_msat == 1234
    for bad in (-1, 1.5, "5000", True, 10_000_001):
        with pytest.raises(Exception, match="refund_max_fee_msat"):
            parse_route({"path": "/x", "price_msat": 1000, "session": {"refund_max_fee_msat": bad}}, "t")
    for bad in (-1, 0.5, "1%", 1_000_001):
        with pytest.raises(Exception, match="refund_max_fee_ppm"):
            parse_route({"path": "/x", "price_msat": 1000, "session": {"refund_max_fee_ppm": bad}}, "t")
    ppm = parse_route({"path": "/x", "price_msat": 1000, "session": {"refund_max_fee_ppm": 2000}}, "t")
    assert ppm.session.refund_fee_cap(10_000_000) == 20_000 and ppm.session.refund_fee_cap(1000) == 5000
    assert Pricing([rule]).rules[0].session.refund_max_fee_msat == 1234


def test_a_close_echoing_a_challenge_another_session_closed_with_closes_its_own_session(world, tmp_path):
    """Close answers were kept by (challenge id, action): a victim echoing the challenge an
    attacker's close had used got the attacker's answer and its own session stayed open.
    Each close now closes, and answers for, the session it names."""
    lt, up = world
    sc = lt.run(start_sidecar(make_config(tmp_path, two_routes(up.url, deposit_units=10))))
    try:
        ch_a, pre_a, sid_a = open_on(lt, sc, "/api/cheap")
        ch_b, pre_b, sid_b = open_on(lt, sc, "/api/cheap")
        bearer_b = {"Authorization": pa.format_session_credential(ch_b, {"action": "bearer", "sessionId": sid_b,
                                                                        "preimage": pre_b})}
        assert raw_request(sc.port, "GET", "/api/cheap", bearer_b)[0] == 200            # B spends 2 units
        shared = ch_a                                          # both closes echo A's challenge
        answers = {}
        for sid, pre in ((sid_a, pre_a), (sid_b, pre_b)):
            close = pa.format_session_credential(shared, {"action": "close", "sessionId": sid, "preimage": pre})
            status, _, body = raw_request(sc.port, "GET", "/api/cheap", {"Authorization": close})
            assert status == 200, body
            answers[sid] = json.loads(body)
        assert answers[sid_a]["refundSats"] == 9 and answers[sid_b]["refundSats"] == 8
        for sid in (sid_a, sid_b):
            assert lt.run(sc.rt.gate.sessions.repo.get(sid)).status == "closed"
    finally:
        lt.run(sc.runner.cleanup())


async def test_a_refund_grown_by_top_ups_is_not_refused_by_a_flat_fee_cap(store):
    """The outside review: 39,000 sat to refund through a network charging 200 ppm needs
    7.8 sat of fees, over a flat 5 sat cap, and the one attempt failed: the seller kept
    it all. The cap grows with the refund (1% by default)."""
    import hashlib
    import os

    from micropay.lightning.sandbox import SandboxNetwork
    from micropay.payment.scheme import SessionAction
    from micropay.store.sessions import RefundStatus

    from ..conftest import FakeClock
    clock = FakeClock()
    net = SandboxNetwork(clock, fee_ppm=200)
    merchant, payer = net.add_node("merchant", 10**11), net.add_node("payer", 10**10)
    ledger = SessionLedger(SessionRepository(store), merchant, clock=clock, lease_s=0.2)
    sid = hashlib.sha256(os.urandom(32)).hexdigest()
    ret = (await payer.create_invoice(None, "ret", "refund", 86400)).bolt11
    deposit = (await merchant.create_invoice(40_000_000, "dep", "deposit", 600)).bolt11
    await ledger.open(SessionAction("open", "ch", sid, "GET /x", 1_000_000, 40_000_000, os.urandom(32).hex(), ret,
                                    deposit), int(clock()))
    assert await ledger.spend(sid, 1_000_000)
    before = payer.balance_msat
    result = await ledger.close(sid)
    assert result.refund_status == RefundStatus.SUCCEEDED and payer.balance_msat - before == 39_000_000
