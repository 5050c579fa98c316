"""Findings of the outside review of session money (round 3), each as a test:

- a charged event whose write waited on a full socket and then lost the client
  (aiohttp raises a plain ConnectionError, not ConnectionResetError) gives its unit back,
  and nothing escapes as a server error;
- a unit given back goes to the store at once, not into this replica's lease, where a
  close on another replica would not wait for it;
- units another replica releases after the refund was fixed, but before its attempt
  started, go to the client in the refund; after that they are refused, and logged;
- SSE framing as the standard has it: any mix of CR/LF line ends, a bare `data` field,
  and `[DONE]` ends the stream;
- a replayed open is `unknown-challenge` whatever its return invoice.
"""
import asyncio
import hashlib
import json
import logging
import os
import socket
import struct

from aiohttp import web

from micropay.payment import scheme as pa
from micropay.lightning.sandbox import SandboxNetwork
from micropay.payment.scheme import SessionAction
from micropay.payment.sessions import SessionLedger
from micropay.sidecar import proxy
from micropay.sidecar.proxy import _billable, _split_event
from micropay.store.sessions import SessionRepository

from ..conftest import FakeClock, make_config, serve_app, start_sidecar
from .test_sessions import return_invoice

UNIT = 1000


def toml(up_url: str, deposit_units: int = 100) -> str:
    return (f'service = "rev"\nupstream = "{up_url}"\n[challenges]\nper_client_per_minute = 10000\n'
            f'[[routes]]\nmethod = ["GET", "HEAD"]\npath = "/gen"\nprice_msat = {UNIT}\n'
            f'[routes.session]\ndeposit_units = {deposit_units}\nhold_s = 5\n')


async def _get(url, auth=None):
    import aiohttp
    async with aiohttp.ClientSession() as s, s.get(url, headers={"Authorization": auth} if auth else {}) as r:
        return r.status, r.headers.copy(), await r.read()


async def opened(sc, path="/gen?n=1"):
    status, headers, _ = await _get(sc.url + path)
    (ch,) = [c for c in pa.parse_challenges(headers.getall("WWW-Authenticate")) if c.intent == "session"]
    pre = (await sc.payer.pay(pa.decode_request(ch)["depositInvoice"])).preimage
    opening = pa.format_session_credential(ch, {"action": "open", "preimage": pre,
                                                "returnInvoice": await return_invoice(sc)})
    assert (await _get(sc.url + path, opening))[0] == 200
    sid = pa.decode_request(ch)["paymentHash"]
    return ch, pre, sid, opening, pa.format_session_credential(ch, {"action": "bearer", "sessionId": sid,
                                                                    "preimage": pre})


async def test_a_charged_event_blocked_on_a_full_socket_then_reset_gives_its_unit_back(tmp_path, monkeypatch):
    big = 200_000

    async def gen(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(int(request.query.get("n", "1"))):
                await resp.write(b"data: " + str(i).encode() + b" " + b"x" * big + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionError:
            pass
        return resp
    app = web.Application()
    app.router.add_get("/gen", gen)
    up_runner, up_url = await serve_app(app)
    sc = await start_sidecar(make_config(tmp_path, toml(up_url)))
    delivered = []
    original = proxy._deliver

    async def counting(response, data, charged):
        await original(response, data, charged)
        if charged is not None:
            delivered.append(1)
    monkeypatch.setattr(proxy, "_deliver", counting)
    errors = []

    class Collect(logging.Handler):
        def emit(self, record):
            errors.append(record.getMessage())
    handler = Collect(level=logging.ERROR)
    logging.getLogger("aiohttp.server").addHandler(handler)
    loop = asyncio.get_running_loop()
    try:
        _, _, sid, _, bearer = await opened(sc)
        delivered.clear()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", sc.port))
        s.setblocking(False)
        await loop.sock_sendall(s, f"GET /gen?n=50 HTTP/1.0\r\nHost: x\r\nAuthorization: {bearer}\r\n\r\n".encode())
        got = b""
        while len(got) < 100_000:
            got += await loop.sock_recv(s, 65536)
        await asyncio.sleep(1.0)                 # stop reading: the proxy's write of a charged event blocks
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()                                # RST
        await asyncio.sleep(1.5)
        await sc.rt.gate.sessions.flush_leases()
        rec = await sc.rt.gate.sessions.repo.get(sid)
        assert rec.spent_msat == (1 + len(delivered)) * UNIT      # the open's event, and each written one
        assert errors == []
    finally:
        logging.getLogger("aiohttp.server").removeHandler(handler)
        await sc.runner.cleanup()
        await up_runner.cleanup()


async def _ledger_world(store):
    clock = FakeClock()
    net = SandboxNetwork(clock)
    merchant, payer = net.add_node("merchant", 10**10), net.add_node("payer", 10**10)
    a = SessionLedger(SessionRepository(store), merchant, clock=clock, lease_s=0.2)
    b = SessionLedger(SessionRepository(store), merchant, clock=clock, lease_s=0.2)
    preimage = os.urandom(32)
    sid = hashlib.sha256(preimage).hexdigest()
    ret = (await payer.create_invoice(None, f"ret-{sid[:8]}", "refund", 86400)).bolt11
    deposit = (await merchant.create_invoice(10 * UNIT, f"dep-{sid[:8]}", "deposit", 600)).bolt11
    await a.open(SessionAction("open", "ch", sid, "GET /x", UNIT, 10 * UNIT, os.urandom(32).hex(), ret, deposit),
                 int(clock()))
    return a, b, sid, payer


async def test_a_unit_given_back_reaches_the_store_at_once(store):
    a, b, sid, payer = await _ledger_world(store)
    assert await a.spend(sid, UNIT)
    assert (await a.repo.get(sid)).spent_msat == UNIT
    await a.give_back(sid, UNIT)                         # an event that never reached its client
    assert (await a.repo.get(sid)).spent_msat == 0       # in the store now, not only in a's lease
    before = payer.balance_msat
    result = await b.close(sid)                          # the other replica closes at once
    assert result.refund_msat == 10 * UNIT and payer.balance_msat - before == 10 * UNIT


async def test_units_released_late_go_into_the_refund_until_its_attempt_starts(store, caplog):
    a, b, sid, payer = await _ledger_world(store)
    for _ in range(3):
        assert await a.spend(sid, UNIT)
    assert await a.repo.begin_close(sid, 0)
    assert await a.repo.fix_refund(sid) == 7 * UNIT
    assert await a.repo.release(sid, UNIT)               # another replica's unserved unit, late
    rec = await a.repo.get(sid)
    assert (rec.spent_msat, rec.refund_msat) == (2 * UNIT, 8 * UNIT)
    assert await a.repo.start_refund(sid, 1) == (1, 8 * UNIT)
    assert not await a.repo.release(sid, UNIT)           # too late: the attempt's amount is final
    with caplog.at_level(logging.WARNING, logger="micropay.sessions"):
        await a.give_back(sid, UNIT)
    assert "came back after its refund was made" in caplog.text
    rec = await a.repo.get(sid)
    assert (rec.spent_msat, rec.refund_msat) == (2 * UNIT, 8 * UNIT)


def test_sse_events_end_at_any_mix_of_line_ends():
    buf = bytearray(b"data: a\n\r\ndata: b\r\n\r\ndata: c\r\rdata: d\n\ndata: e\r")
    events = []
    while (ev := _split_event(buf)) is not None:
        events.append(ev)
    assert [e.split(b":")[1].strip() for e in events] == [b"a", b"b", b"c", b"d"]
    assert bytes(buf) == b"data: e\r"                   # a CR at the end may be half a CRLF
    buf += b"\r\n"
    assert _split_event(buf) == b"data: e\r\r\n"


def test_a_bare_data_field_is_an_event_and_done_is_the_sentinel():
    assert _billable(b"data\n\n") is True
    assert _billable(b"data:x\n\n") is True
    assert _billable(b": comment\n\n") is False
    assert _billable(b"event: ping\n\n") is False
    assert _billable(b"data: [DONE]\n\n") is None


async def test_nothing_after_done_is_forwarded_or_charged(tmp_path):
    async def gen(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: {\"i\": 0}\n\ndata: [DONE]\n\n" + b"".join(b"data: {\"i\": %d}\n\n" % i
                                                                         for i in range(1, 20)))
        return resp
    app = web.Application()
    app.router.add_get("/gen", gen)
    up_runner, up_url = await serve_app(app)
    sc = await start_sidecar(make_config(tmp_path, toml(up_url)))
    try:
        _, _, sid, _, bearer = await opened(sc)
        status, _, body = await _get(sc.url + "/gen", bearer)
        assert status == 200 and body.count(b'data: {"i"') == 1 and body.rstrip().endswith(b"data: [DONE]")
        receipt = json.loads(body.split(b"event: payment-receipt\ndata: ")[1].split(b"\n")[0])
        assert receipt["units"] == 1
        await asyncio.sleep(sc.rt.gate.sessions.lease_s + 0.1)
        await sc.rt.gate.sessions.flush_leases()
        assert (await sc.rt.gate.sessions.repo.get(sid)).spent_msat == 2 * UNIT     # the open's, this one's
    finally:
        await sc.runner.cleanup()
        await up_runner.cleanup()


async def test_a_replayed_open_is_unknown_challenge_whatever_its_return_invoice(tmp_path):
    async def gen(request):
        return web.Response(text="x")
    app = web.Application()
    app.router.add_get("/gen", gen)
    up_runner, up_url = await serve_app(app)
    sc = await start_sidecar(make_config(tmp_path, toml(up_url)))
    try:
        ch, pre, sid, _, _ = await opened(sc)
        for ret in ("lnbcrt1garbage", await return_invoice(sc)):
            again = pa.format_session_credential(ch, {"action": "open", "preimage": pre, "returnInvoice": ret})
            status, _, body = await _get(sc.url + "/gen", again)
            assert status == 402 and json.loads(body)["type"].endswith("/unknown-challenge"), body
    finally:
        await sc.runner.cleanup()
        await up_runner.cleanup()
