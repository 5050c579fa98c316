"""A property of session money over interleavings, on two sidecars sharing PostgreSQL.

Hypothesis draws a sequence of actions on one session (bearer requests, SSE streams read
to the end, SSE streams the client leaves after k events, top-ups), each sent to either
of two sidecars (in-process, one sandbox merchant node, one PostgreSQL store, the same
root keys), then a close. What the client received is counted on its side; after the
close:

    spent  = units delivered x the session's unit price
    refund = deposits - spent, paid to the payer's wallet exactly once, never negative
"""
import asyncio
import json

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micropay.payment import scheme as pa
from micropay.lightning.sandbox import SandboxNetwork

from ..conftest import PG_SKIP_REASON, drop_pg_schema, make_config, pg_url_with_fresh_schema, start_sidecar
from ..rawhttp import LoopThread
from .test_session_disconnects import RawSSE, slow_events_upstream

UNIT_MSAT = 2000
DEPOSIT_UNITS = 5

action = st.one_of(
    st.tuples(st.just("bearer"), st.integers(0, 1)),
    st.tuples(st.just("sse"), st.integers(0, 1), st.integers(1, 7)),
    st.tuples(st.just("leave"), st.integers(0, 1), st.integers(1, 3)),
    st.tuples(st.just("topUp"), st.integers(0, 1)),
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if PG_SKIP_REASON:
        pytest.skip(PG_SKIP_REASON)
    tmp = tmp_path_factory.mktemp("fleet")
    url = pg_url_with_fresh_schema()
    lt = LoopThread()
    up_runner, up_url = lt.run(slow_events_upstream())
    toml = (f'service = "prop"\nupstream = "{up_url}"\n[[routes]]\nmethod = "GET"\npath = "/gen"\n'
            f'price_msat = {UNIT_MSAT}\n[routes.session]\ndeposit_units = {DEPOSIT_UNITS}\nhold_s = 1\n'
            f'[challenges]\nper_client_per_minute = 100000\nmax_pending = 1000000\nmax_pending_per_client = 100000\n'
            f'[store]\nurl = "{url}"\n')
    net = SandboxNetwork()
    merchant = net.add_node("merchant")
    sidecars = [lt.run(start_sidecar(make_config(tmp, toml), sandbox=net, node=merchant)) for _ in range(2)]
    yield lt, sidecars, sidecars[0].payer
    for sc in sidecars:
        lt.run(sc.runner.cleanup())
    lt.run(up_runner.cleanup())
    lt.run(drop_pg_schema(url))
    lt.stop()


async def _get(url: str, auth: str | None = None) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers={"Authorization": auth} if auth else {}) as r:
        return r.status, r.headers.copy(), await r.read()


def data_events(body: bytes) -> int:
    """Data events of the upstream's (each `data: {"i": ...}`) in a response body."""
    return body.count(b'data: {"i"')


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(action, min_size=1, max_size=7), closer=st.integers(0, 1))
def test_spent_is_units_delivered_and_the_refund_the_rest_across_two_sidecars(fleet, steps, closer):
    lt, sidecars, payer = fleet

    def deposit(sc) -> tuple[pa.Challenge, str]:
        status, headers, _ = lt.run(_get(sc.url + "/gen?n=1"))
        assert status == 402, status
        (ch,) = [c for c in pa.parse_challenges(headers.getall("WWW-Authenticate")) if c.intent == "session"]
        return ch, lt.run(payer.pay(pa.decode_request(ch)["depositInvoice"])).preimage

    ch, pre = deposit(sidecars[0])
    sid = pa.decode_request(ch)["paymentHash"]
    ret = lt.run(payer.create_invoice(None, f"ret-{sid[:16]}", "refund", 86400)).bolt11
    opening = pa.format_session_credential(ch, {"action": "open", "preimage": pre, "returnInvoice": ret})
    status, _, body = lt.run(_get(sidecars[1].url + "/gen?n=1", opening))
    assert status == 200
    delivered, deposits = data_events(body), 1
    bearer = pa.format_session_credential(ch, {"action": "bearer", "sessionId": sid, "preimage": pre})
    for step in steps:
        sc = sidecars[step[1]]
        if step[0] == "bearer":
            status, _, body = lt.run(_get(sc.url + "/gen?n=1", bearer))
            delivered += data_events(body) if status == 200 else 0
        elif step[0] == "sse":
            status, _, body = lt.run(_get(sc.url + f"/gen?n={step[2]}", bearer))
            delivered += data_events(body) if status == 200 else 0
        elif step[0] == "leave":
            stream = RawSSE(sc.port, "/gen?n=8&gap=0.3", bearer)
            try:
                for _ in range(step[2]):
                    name, data = stream.next_event()
                    if name == "message" and data.startswith("{"):
                        delivered += 1
                    elif name in ("session-timeout", "payment-receipt"):
                        break
            except (AssertionError, EOFError):     # a 402 (the balance ran out): nothing read
                pass
            delivered += stream.leave()            # events that reached the socket unread count too
            lt.run(asyncio.sleep(0.5))             # the server sees the client go
        else:
            t_ch, t_pre = deposit(sc)
            top = pa.format_session_credential(t_ch, {"action": "topUp", "sessionId": sid, "topUpPreimage": t_pre})
            assert lt.run(_get(sc.url + "/gen?n=1", top))[0] == 200
            deposits += 1
    before = payer.balance_msat
    close = pa.format_session_credential(ch, {"action": "close", "sessionId": sid, "preimage": pre})
    status, _, body = lt.run(_get(sidecars[closer].url + "/gen?n=1", close), timeout=60)
    assert status == 200, body
    rec = lt.run(sidecars[0].rt.gate.sessions.repo.get(sid))
    deposit_msat = deposits * DEPOSIT_UNITS * UNIT_MSAT
    assert rec.deposit_msat == deposit_msat
    assert rec.spent_msat == delivered * UNIT_MSAT, (steps, delivered)
    assert rec.refund_msat == deposit_msat - rec.spent_msat >= 0
    assert json.loads(body)["refundSats"] * 1000 == rec.refund_msat
    assert payer.balance_msat - before == rec.refund_msat
    # and never twice: a second close is refused and pays nothing
    assert lt.run(_get(sidecars[1 - closer].url + "/gen?n=1", close))[0] == 402
    assert payer.balance_msat - before == rec.refund_msat
