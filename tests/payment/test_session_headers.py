"""The session intent's 402s and receipts (issue 17, 4 and 5): every deposit challenge is
new, and every response carrying a Payment-Receipt is `Cache-Control: private`."""
from micropay.payment import scheme as pa

from .test_sessions import env, fetch, opened, session_offer  # noqa: F401  (env is a fixture)


async def test_every_session_402_is_a_new_deposit_challenge(env):  # noqa: F811
    _, first, _ = await fetch(env.url + "/one")
    _, second, _ = await fetch(env.url + "/one")
    a, b = session_offer(first), session_offer(second)
    assert a.id != b.id
    assert pa.decode_request(a)["depositInvoice"] != pa.decode_request(b)["depositInvoice"]
    assert first["Cache-Control"] == second["Cache-Control"] == "no-store"


async def test_session_answers_with_a_receipt_are_private(env):  # noqa: F811
    ch, pre, sid, bearer = await opened(env)
    status, headers, _ = await fetch(env.url + "/one", bearer)             # a bearer request, proxied
    assert status == 200 and "Payment-Receipt" in headers and headers["Cache-Control"] == "private"
    _, fresh, _ = await fetch(env.url + "/one")
    close = pa.format_session_credential(session_offer(fresh), {"action": "close", "sessionId": sid,
                                                                 "preimage": pre})
    status, headers, body = await fetch(env.url + "/one", close)
    assert status == 200, body
    assert "Payment-Receipt" in headers and headers["Cache-Control"] == "private, no-store"
