"""Units charged are units delivered: a metered SSE stream through the reverse proxy,
read by a raw socket client that goes away during a top-up hold, right as a top-up
arrives, and between two events. What the client actually read is compared with what
the session's record says was spent, and the refund with the deposits less that."""
import asyncio
import json
import socket
import time

import pytest
from aiohttp import web

from micropay.payment import scheme as pa

from ..conftest import make_config, serve_app, start_sidecar
from ..rawhttp import LoopThread
from .test_sessions import return_invoice

UNIT_MSAT = 1000
DEPOSIT_UNITS = 4


async def slow_events_upstream():
    """/gen?n=N&gap=S: N data events, S seconds apart."""
    async def gen(request):
        n, gap = int(request.query.get("n", "8")), float(request.query.get("gap", "0"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(n):
                await resp.write(f"data: {json.dumps({'i': i})}\n\n".encode())
                await asyncio.sleep(gap)
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            pass
        return resp
    app = web.Application()
    app.router.add_get("/gen", gen)
    return await serve_app(app)


class RawSSE:
    """A socket that sends one HTTP/1.0 GET (so the body comes unframed, as written) and
    reads SSE events as they come: no client library in between."""

    def __init__(self, port: int, target: str, auth: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(f"GET {target} HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: {auth}\r\n\r\n".encode())
        self.buf = b""
        self.head_read = False

    def next_event(self) -> tuple[str, str]:
        """(event name or "message", data) of the next event; reads the head first."""
        while True:
            if not self.head_read and b"\r\n\r\n" in self.buf:
                head, self.buf = self.buf.split(b"\r\n\r\n", 1)
                assert head.split(b"\r\n")[0].endswith(b"200 OK"), head
                self.head_read = True
            if self.head_read and b"\n\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n\n", 1)
                name, data = "message", ""
                for ln in raw.decode().split("\n"):
                    if ln.startswith("event:"):
                        name = ln[6:].strip()
                    elif ln.startswith("data:"):
                        data = ln[5:].strip()
                return name, data
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the stream")
            self.buf += chunk

    def leave(self) -> int:
        """Close the connection; returns how many data events had reached this socket
        unread (a busy server may write several at once: they were delivered too)."""
        self.sock.setblocking(False)
        try:
            while chunk := self.sock.recv(65536):
                self.buf += chunk
        except (BlockingIOError, ConnectionError):
            pass
        self.sock.close()
        body = self.buf.split(b"\r\n\r\n", 1)[1] if not self.head_read and b"\r\n\r\n" in self.buf else self.buf
        complete = body[:body.rfind(b"\n\n") + 2] if b"\n\n" in body else b""
        return complete.count(b'data: {"i"')


@pytest.fixture
def world(tmp_path):
    lt = LoopThread()
    up_runner, up_url = lt.run(slow_events_upstream())
    toml = (f'service = "sse"\nupstream = "{up_url}"\n[[routes]]\nmethod = "GET"\npath = "/gen"\n'
            f'price_msat = {UNIT_MSAT}\n[routes.session]\ndeposit_units = {DEPOSIT_UNITS}\nhold_s = 20\n')
    sc = lt.run(start_sidecar(make_config(tmp_path, toml)))
    yield lt, sc
    lt.run(sc.runner.cleanup())
    lt.run(up_runner.cleanup())
    lt.stop()


async def _fetch(url, auth=None):
    import aiohttp
    async with aiohttp.ClientSession() as s, s.get(url, headers={"Authorization": auth} if auth else {}) as r:
        return r.status, r.headers.copy(), await r.read()


def deposit(lt, sc) -> tuple[pa.Challenge, str]:
    status, headers, _ = lt.run(_fetch(sc.url + "/gen?n=1"))
    assert status == 402
    (ch,) = [c for c in pa.parse_challenges(headers.getall("WWW-Authenticate")) if c.intent == "session"]
    return ch, lt.run(sc.payer.pay(pa.decode_request(ch)["depositInvoice"])).preimage


def open_session(lt, sc):
    """Opened with a one-event stream (its first unit); (challenge, preimage, sid, bearer)."""
    ch, pre = deposit(lt, sc)
    auth = pa.format_session_credential(ch, {"action": "open", "preimage": pre,
                                             "returnInvoice": lt.run(return_invoice(sc))})
    status, _, body = lt.run(_fetch(sc.url + "/gen?n=1", auth))
    assert status == 200 and body.count(b'data: {"i"') == 1, body
    sid = pa.decode_request(ch)["paymentHash"]
    return ch, pre, sid, pa.format_session_credential(ch, {"action": "bearer", "sessionId": sid, "preimage": pre})


def top_up(lt, sc, sid) -> None:
    ch, pre = deposit(lt, sc)
    auth = pa.format_session_credential(ch, {"action": "topUp", "sessionId": sid, "topUpPreimage": pre})
    assert lt.run(_fetch(sc.url + "/gen?n=1", auth))[0] == 200


def read_until_hold(stream: RawSSE) -> int:
    """Data events read before the server asked for a top-up."""
    delivered = 0
    while True:
        name, data = stream.next_event()
        if name == "payment-need-topup":
            return delivered
        if name == "message" and data.startswith("{"):
            delivered += 1


def settled_record(lt, sc, sid, wait_s: float = 0.0):
    ledger = sc.rt.gate.sessions
    lt.run(asyncio.sleep(max(wait_s, ledger.lease_s + 0.1)))
    lt.run(ledger.flush_leases())
    return lt.run(ledger.repo.get(sid))


def close_and_check_refund(lt, sc, ch, pre, sid, delivered_units: int, deposits: int) -> None:
    before = sc.payer.balance_msat
    close = pa.format_session_credential(ch, {"action": "close", "sessionId": sid, "preimage": pre})
    status, _, body = lt.run(_fetch(sc.url + "/gen?n=1", close))
    assert status == 200, body
    refund = deposits * DEPOSIT_UNITS * UNIT_MSAT - delivered_units * UNIT_MSAT
    assert json.loads(body)["refundSats"] == refund // 1000
    assert sc.payer.balance_msat - before == refund


def test_a_client_that_leaves_during_a_hold_is_not_charged_when_a_top_up_comes(world):
    lt, sc = world
    ch, pre, sid, bearer = open_session(lt, sc)
    stream = RawSSE(sc.port, "/gen?n=25", bearer)
    delivered = read_until_hold(stream)
    assert delivered == DEPOSIT_UNITS - 1                  # the open's event took the first unit
    assert stream.leave() == 0                             # held: nothing more was written
    time.sleep(0.6)                                        # the server notices within a quarter second
    top_up(lt, sc, sid)
    rec = settled_record(lt, sc, sid, wait_s=1.0)
    assert rec.spent_msat == (1 + delivered) * UNIT_MSAT   # nothing for the events after the client left
    close_and_check_refund(lt, sc, ch, pre, sid, 1 + delivered, deposits=2)


def test_a_client_that_leaves_as_the_top_up_arrives_is_charged_only_for_what_it_read(world):
    lt, sc = world
    ch, pre, sid, bearer = open_session(lt, sc)
    stream = RawSSE(sc.port, "/gen?n=25", bearer)
    delivered = read_until_hold(stream)
    assert delivered == DEPOSIT_UNITS - 1
    t_ch, t_pre = deposit(lt, sc)
    auth = pa.format_session_credential(t_ch, {"action": "topUp", "sessionId": sid, "topUpPreimage": t_pre})
    assert stream.leave() == 0                             # the same moment: leave, top up
    assert lt.run(_fetch(sc.url + "/gen?n=1", auth))[0] == 200
    rec = settled_record(lt, sc, sid, wait_s=1.0)
    assert rec.spent_msat == (1 + delivered) * UNIT_MSAT
    close_and_check_refund(lt, sc, ch, pre, sid, 1 + delivered, deposits=2)


def test_a_client_that_leaves_between_events_pays_for_the_events_it_read(world):
    lt, sc = world
    ch, pre, sid, bearer = open_session(lt, sc)
    top_up(lt, sc, sid)                                    # 8 units: room for the whole stream
    stream = RawSSE(sc.port, "/gen?n=6&gap=0.4", bearer)
    delivered = 0
    for _ in range(3):
        name, data = stream.next_event()
        assert name == "message"
        delivered += 1
    delivered += stream.leave()                            # any that reached the socket unread
    rec = settled_record(lt, sc, sid, wait_s=1.5)          # the upstream's next events come meanwhile
    assert rec.spent_msat == (1 + delivered) * UNIT_MSAT
    close_and_check_refund(lt, sc, ch, pre, sid, 1 + delivered, deposits=2)


def test_a_client_killed_between_a_top_up_and_the_close_closes_the_session_at_its_next_start(world, tmp_path):
    """kill -9 of `micropay get --session` right after its top-up: the session stays open
    on the server (idle timeout 300 s). The next run with the same ledger closes it first,
    and the refund is paid then: deposits less what the server recorded as spent."""
    import os
    import signal
    import subprocess
    import sys
    lt, sc = world
    cache = tmp_path / "client.json"
    cmd = [sys.executable, "-m", "micropay.cli", "get", "--session", "--cache", str(cache),
           "--max-msat", "5000"]
    first = subprocess.Popen(cmd + [sc.url + "/gen?n=30&gap=0.3"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen = b""
    deadline = time.monotonic() + 60
    while b"topped up" not in seen and time.monotonic() < deadline:
        line = first.stderr.readline()
        if not line:
            break
        seen += line
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert b"topped up" in seen, seen
    ledger = json.loads(cache.read_text())
    (sid,) = ledger["sessions"]                              # the open session, recorded
    assert lt.run(sc.rt.gate.sessions.repo.get(sid)).status == "open"
    second = subprocess.run(cmd + [sc.url + "/gen?n=1"], capture_output=True, timeout=60)
    assert second.returncode == 0, second.stderr.decode()
    assert f"session {sid[:16]}… left open by an earlier run: closed, refund".encode() in second.stderr
    rec = lt.run(sc.rt.gate.sessions.repo.get(sid))
    assert rec.status == "closed" and rec.refund_status == "succeeded"
    assert rec.refund_msat == rec.deposit_msat - rec.spent_msat == 2 * DEPOSIT_UNITS * UNIT_MSAT - rec.spent_msat
    assert json.loads(cache.read_text())["sessions"] == {}  # and the second run's own session closed too
