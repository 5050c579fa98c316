"""Streams to Lightning Addresses: a real LNURL-pay server on 127.0.0.1 (built from
creators.lnurl's server side) issues real invoices from a sandbox node; the stream runner
pays them through AddressPayer (creators/lnurl_client.py) under the stream's labels.

A recipient that stops answering well (an ERROR, a timeout, a wrong invoice, an HTTP
error) is a failed payment: backed off, suspended after MAX_CONSECUTIVE_FAILURES, the
stream paused with the reason, and nothing paid. A restart with a payment in flight
never pays twice."""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiohttp import web

from micropay.core.errors import BadRequest, PaymentFailed
from micropay.creators import lnurl
from micropay.creators.lnurl_client import AddressPayer
from micropay.lightning.memrecords import MemoryRecords
from micropay.lightning.sandbox import SandboxNetwork
from micropay.streams.runner import RECONCILE_GRACE_S, StreamRunner
from micropay.streams.schedule import MAX_CONSECUTIVE_FAILURES

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class LnurlServer:
    """A Lightning Address service (every name but "nobody"; `alice` in the tests), paid
    into a sandbox node. `mode` makes it misbehave: at the payRequest ("pr_...") or at
    the callback."""

    def __init__(self, payee, *, comment_allowed: int = 200, clock=time.time) -> None:
        self.payee, self.comment_allowed, self.clock = payee, comment_allowed, clock
        self.mode = "ok"
        self.pay_requests: list[float] = []          # when each was asked (by `clock`)
        self.callbacks: list[dict[str, str]] = []    # the query of each callback
        self.callback_times: list[float] = []
        self.issued: list[str] = []                  # payment hashes of the invoices handed out
        self.last: str | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"alice@127.0.0.1:{self.port}"

    @property
    def metadata(self) -> str:
        return lnurl.metadata_text("tips for alice", self.address)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/lnurlp/{name}", self.pay_request)
        app.router.add_get("/cb/{name}", self.callback)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def close(self) -> None:
        await self.runner.cleanup()

    async def pay_request(self, request: web.Request) -> web.StreamResponse:
        self.pay_requests.append(self.clock())
        name = request.match_info["name"]
        if name == "nobody":
            return web.json_response(lnurl.error("no such user"), status=404)
        if self.mode == "pr_error":
            return web.json_response(lnurl.error("account frozen"), status=404)
        if self.mode == "pr_redirect":
            raise web.HTTPFound(f"http://127.0.0.1:{self.port}/elsewhere")
        if self.mode == "pr_big":
            return web.Response(text="[" + "1," * 40_000 + "1]", content_type="application/json")
        if self.mode == "pr_not_json":
            return web.Response(text="<html>hello</html>", content_type="text/html")
        if self.mode == "pr_https_callback_http":
            doc = lnurl.pay_request("http://127.0.0.1:1/cb", 1000, 10**9, self.metadata)
            return web.json_response(doc)
        return web.json_response(lnurl.pay_request(f"http://127.0.0.1:{self.port}/cb/{name}", 1000, 10**10,
                                                   self.metadata, comment_allowed=self.comment_allowed))

    async def callback(self, request: web.Request) -> web.StreamResponse:
        self.callbacks.append(dict(request.query))
        self.callback_times.append(self.clock())
        amount = int(request.query["amount"])
        if self.mode == "error":
            return web.json_response(lnurl.error("no more invoices today"))
        if self.mode == "slow":
            await asyncio.sleep(2)
        if self.mode == "http500":
            return web.Response(status=500, text="Internal Server Error")
        if self.mode == "same_invoice" and self.last is not None:
            return web.json_response(lnurl.callback_answer(self.last))
        description, hashed = self.metadata, True
        if self.mode == "wrong_amount":
            amount += 1000
        elif self.mode == "wrong_hash":
            description = lnurl.metadata_text("something else", self.address)
        elif self.mode == "plain_description":
            hashed = False
        inv = await self.payee.create_invoice(amount, f"lnurl-{uuid.uuid4()}", description, 600,
                                              hash_description=hashed)
        self.issued.append(inv.payment_hash)
        self.last = inv.bolt11
        return web.json_response(lnurl.callback_answer(inv.bolt11))


@pytest.fixture
async def net():
    network = SandboxNetwork()
    payer, alice = network.add_node("payer", 10**9), network.add_node("alice")
    return network, payer, alice


@pytest.fixture
async def server(net):
    _, _, alice = net
    s = LnurlServer(alice)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
async def payer(net):
    _, node, _ = net
    p = AddressPayer(node.decode, timeout_s=0.3)
    yield p
    await p.close()


def make_runner(node, clock, address_payer, ds=None, **kw) -> StreamRunner:
    return StreamRunner(node, ds if ds is not None else MemoryRecords(), clock=clock,
                        address_invoices=address_payer.invoice if address_payer else None, **kw)


async def tick(r: StreamRunner, sid: str, clock: Clock, seconds: int, step: float = 1) -> None:
    for _ in range(int(seconds / step)):
        clock.t += step
        await r._step(r.streams[sid])


async def labels_paid(node) -> list[str]:
    return [s.label for s in node._sends]


# -- paying ----------------------------------------------------------------------------------
async def test_a_stream_to_an_address_pays_every_interval_under_its_labels(net, server, payer):
    _, node, alice = net
    clock = Clock()
    r = make_runner(node, clock, payer)
    await r.load()
    meta = {"sender_name": "bob", "message": "great\nshow", "podcast": "Show", "episode": "12", "feedID": 7}
    started = await r.create(server.address.upper(), 5000, 60, 100_000, metadata=meta)
    sid = started["id"]
    assert started["recipients"][0]["destination"] == server.address          # normalised
    await r._step(r.streams[sid])
    await tick(r, sid, clock, 120, step=60)
    st = r.streams[sid]
    assert (st.payments, st.paid_msat, st.failures, st.state) == (3, 15_000, 0, "active")
    assert alice.balance_msat == 15_000 and node.balance_msat == 10**9 - 15_000
    assert await labels_paid(node) == [f"streampay-{sid}-{k}" for k in (1, 2, 3)]
    assert [c["amount"] for c in server.callbacks] == ["5000"] * 3
    assert [c["comment"] for c in server.callbacks] == [
        f"bob: great show | Show - 12 | micropay stream {sid[:16]} #{k}" for k in (1, 2, 3)]
    assert len(server.pay_requests) == 1                  # the payRequest is cached between payments
    for k, h in enumerate(server.issued, 1):              # every invoice issued was paid, under its label
        status = await node.lookup_payment(f"streampay-{sid}-{k}", 1)
        assert status.state == "complete" and status.payment_hash == h


async def test_the_comment_is_cut_to_comment_allowed_or_left_out(net, server, payer):
    _, node, _ = net
    for allowed, expected in ((12, ["micropay str"]), (0, [None])):
        server.comment_allowed, server.callbacks = allowed, []
        payer._cache.clear()
        clock = Clock()
        r = make_runner(node, clock, payer)
        sid = (await r.create(server.address, 1000, 60, 10_000))["id"]
        await r._step(r.streams[sid])
        assert [c.get("comment") for c in server.callbacks] == expected
        assert r.streams[sid].payments == 1


async def test_an_address_split_with_a_node(net, server, payer):
    network, node, alice = net
    bob = network.add_node("bob")
    clock = Clock()
    r = make_runner(node, clock, payer)
    sid = (await r.create(None, 4000, 10, 100_000,
                          splits=[{"destination": server.address, "share": 3, "name": "alice"},
                                  {"destination": bob.id, "share": 1, "name": "bob"}]))["id"]
    await r._step(r.streams[sid])
    await tick(r, sid, clock, 20, step=10)
    assert (alice.balance_msat, bob.balance_msat) == (9000, 3000)
    assert len(bob.keysends_received) == 3 and len(server.issued) == 3


async def test_a_stream_to_an_address_is_refused_when_no_client_is_wired(net, server):
    _, node, _ = net
    r = make_runner(node, Clock(), None)
    with pytest.raises(BadRequest, match="cannot pay Lightning Addresses"):
        await r.create(server.address, 1000, 60, 10_000)
    with pytest.raises(BadRequest, match="cannot pay Lightning Addresses"):
        await r.create(None, 1000, 60, 10_000, splits=[{"destination": "02" + "a" * 64},
                                                       {"destination": server.address}])
    assert r.streams == {}


@pytest.mark.parametrize("destination, why", [
    ("alice@exa_mple.com", "destination is not a Lightning Address: 'exa_mple.com' is not a host name"),
    ("al ice@example.com", "destination is not a Lightning Address: the name"),
    ("alice", "must be a node id .* or a Lightning Address"),
])
async def test_a_bad_address_is_refused_at_start(net, payer, destination, why):
    _, node, _ = net
    r = make_runner(node, Clock(), payer)
    with pytest.raises(BadRequest, match=why):
        await r.create(destination, 1000, 60, 10_000)


# -- failing ---------------------------------------------------------------------------------
FAILURES = [
    ("error", "the service refused: no more invoices today"),
    ("slow", "the callback timed out after 0.3 s"),
    ("wrong_amount", "the invoice is for 6000 msat, not the 5000 msat asked"),
    ("wrong_hash", "the invoice's description hash is not sha256 of the payRequest's metadata"),
    ("plain_description", "the invoice's description hash is not sha256 of the payRequest's metadata"),
    ("http500", "the callback answered HTTP 500 without a JSON document"),
    ("pr_error", "the service refused: account frozen"),
    ("pr_redirect", "the payRequest answered HTTP 302, a redirect (redirects are not followed)"),
    ("pr_big", "the payRequest answered with more than 64 KiB"),
    ("pr_not_json", "the payRequest is not a JSON document"),
]


@pytest.mark.parametrize("mode, why", FAILURES, ids=[m for m, _ in FAILURES])
async def test_a_recipient_that_stops_answering_is_backed_off_suspended_and_paused(net, server, payer, mode, why):
    _, node, alice = net
    clock = Clock()
    server.clock = clock
    r = make_runner(node, clock, payer, notify=lambda topic, doc: events.append((topic, doc)))
    events: list = []
    sid = (await r.create(server.address, 5000, 60, 100_000))["id"]
    server.mode = mode
    await r._step(r.streams[sid])
    await tick(r, sid, clock, 40)
    st = r.streams[sid]
    expected = f"lightning address {server.address}: {why}"
    assert st.state == "paused" and st.failures == MAX_CONSECUTIVE_FAILURES
    assert st.reason == f"every recipient failed {MAX_CONSECUTIVE_FAILURES} times in a row; last: {expected}"
    assert st.recipients[0].suspended and st.last_error == expected
    # backed off: 1, 2, 4, 8 s between attempts (no hot loop), and none after the pause
    asked = server.pay_requests if mode.startswith("pr_") else server.callback_times
    assert [b - a for a, b in zip(asked, asked[1:])] == [1, 2, 4, 8]
    # nothing paid, nothing sent, the failures reported with the reason
    assert alice.balance_msat == 0 and node.balance_msat == 10**9 and await labels_paid(node) == []
    failed = [doc for topic, doc in events if topic == "streampay_payment"]
    assert [d["status"] for d in failed] == ["failed"] * 5 and all(d["error"] == expected for d in failed)
    assert ("streampay_state", {"stream_id": sid, "state": "paused", "reason": st.reason}) in events


async def test_a_failing_address_is_suspended_while_a_node_in_the_split_is_paid(net, server, payer):
    network, node, alice = net
    bob = network.add_node("bob")
    clock = Clock()
    r = make_runner(node, clock, payer)
    sid = (await r.create(None, 2000, 1, 100_000, splits=[{"destination": server.address},
                                                           {"destination": bob.id}]))["id"]
    server.mode = "error"
    await tick(r, sid, clock, 30)
    st = r.streams[sid]
    assert st.state == "active" and st.recipients[0].suspended and not st.recipients[1].suspended
    assert alice.balance_msat == 0 and bob.balance_msat == st.recipients[1].paid_msat >= 29 * 1000
    assert len(server.callbacks) == MAX_CONSECUTIVE_FAILURES


async def test_a_paused_stream_resumes_when_the_service_answers_again(net, server, payer):
    _, node, alice = net
    clock = Clock()
    r = make_runner(node, clock, payer)
    sid = (await r.create(server.address, 1000, 60, 100_000))["id"]
    server.mode = "error"
    await tick(r, sid, clock, 40)
    assert r.streams[sid].state == "paused"
    server.mode = "ok"
    await r.change(sid, "resume")
    await tick(r, sid, clock, 1)
    st = r.streams[sid]
    assert st.state == "active" and st.payments == 1 and alice.balance_msat == 1000


# -- the client alone --------------------------------------------------------------------------
async def test_the_client_refuses_an_expired_invoice(net, server):
    _, node, _ = net
    late = AddressPayer(node.decode, clock=lambda: time.time() + 3600, timeout_s=1)
    try:
        with pytest.raises(PaymentFailed, match=f"lightning address {server.address}: the callback's invoice "
                                                "has expired"):
            await late.invoice(server.address, 1000)
    finally:
        await late.close()


async def test_a_service_handing_out_a_paid_invoice_again_is_not_counted_as_paid(net, server, payer):
    _, node, alice = net
    clock = Clock()
    r = make_runner(node, clock, payer)
    sid = (await r.create(server.address, 1000, 60, 100_000))["id"]
    await r._step(r.streams[sid])
    server.mode = "same_invoice"
    await tick(r, sid, clock, 60)
    st = r.streams[sid]
    assert (st.payments, st.paid_msat, st.failures) == (1, 1000, 1) and alice.balance_msat == 1000
    assert st.last_error.endswith("the callback handed out an invoice it had handed out before")


async def test_the_client_refuses_an_amount_the_address_does_not_take(server, payer):
    with pytest.raises(PaymentFailed, match="500 msat is outside what the address accepts"):
        await payer.invoice(server.address, 500)
    assert server.callbacks == []


async def test_the_client_refuses_a_plain_http_callback_of_an_https_address(server, payer, monkeypatch):
    """A payRequest of an address reached over https may not send the node to plain http
    (its own loopback)."""
    import micropay.creators.lnurl_client as client
    server.mode = "pr_https_callback_http"
    monkeypatch.setattr(client, "plain_http_ok", lambda host: False)
    monkeypatch.setattr(client, "address_url", lambda a: f"http://127.0.0.1:{server.port}/.well-known/lnurlp/alice")
    with pytest.raises(PaymentFailed, match="callback is plain http:// while the address is reached over https"):
        await payer.invoice("alice@example.com", 1000)


async def test_the_client_reports_an_unknown_name_with_the_services_reason(server, payer):
    with pytest.raises(PaymentFailed, match=rf"^lightning address nobody@127.0.0.1:{server.port}: the service "
                                            r"refused: no such user$"):
        await payer.invoice(f"nobody@127.0.0.1:{server.port}", 1000)


async def test_the_client_reports_a_service_that_is_not_there(payer):
    with pytest.raises(PaymentFailed, match=r"lightning address alice@127.0.0.1:1: the payRequest could not be "
                                            r"fetched: ClientConnectorError"):
        await payer.invoice("alice@127.0.0.1:1", 1000)


async def test_the_pay_request_cache_expires_and_is_dropped_after_a_failure(net, server):
    _, node, _ = net
    later = [0.0]                               # drives the cache; the invoices expire in 600 s regardless
    p = AddressPayer(node.decode, clock=lambda: time.time() + later[0], cache_s=300)
    try:
        await p.invoice(server.address, 1000)
        await p.invoice(server.address, 1000)
        assert len(server.pay_requests) == 1
        later[0] = 301
        await p.invoice(server.address, 1000)
        assert len(server.pay_requests) == 2                         # expired: asked again
        server.mode = "error"
        with pytest.raises(PaymentFailed):
            await p.invoice(server.address, 1000)
        server.mode = "ok"
        await p.invoice(server.address, 1000)
        assert len(server.pay_requests) == 3                         # a failure dropped it
    finally:
        await p.close()


async def test_the_pay_request_cache_is_bounded(net, server):
    _, node, _ = net
    p = AddressPayer(node.decode, cache_size=2)
    try:
        for name in ("alice", "bob", "carol", "bob", "alice"):
            await p.invoice(f"{name}@127.0.0.1:{server.port}", 1000)
        assert list(p._cache) == [f"bob@127.0.0.1:{server.port}", f"alice@127.0.0.1:{server.port}"]
        assert len(server.pay_requests) == 4                         # alice, bob, carol, alice again
    finally:
        await p.close()


# -- restarts ----------------------------------------------------------------------------------
class Crash(BaseException):
    """The process dies here."""


class DiesAfterPaying:
    """The node pays, and the process dies before the result comes back."""

    def __init__(self, inner, die_on: int) -> None:
        self.inner, self.die_on, self.pays = inner, die_on, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def pay(self, *a, **kw):
        self.pays += 1
        p = await self.inner.pay(*a, **kw)
        if self.pays == self.die_on:
            raise Crash()
        return p


class DiesAfterWrite(MemoryRecords):
    """The datastore writes the n-th replace, then the process dies."""

    def __init__(self) -> None:
        super().__init__()
        self.writes, self.die_on = 0, None

    async def replace(self, key, value, generation):
        gen = await super().replace(key, value, generation)
        self.writes += 1
        if self.writes == self.die_on:
            raise Crash()
        return gen


async def test_a_payment_paid_before_a_crash_is_found_and_not_paid_again(net, server, payer):
    _, node, alice = net
    clock, ds = Clock(), MemoryRecords()
    first = make_runner(DiesAfterPaying(node, die_on=2), clock, payer, ds=ds)
    sid = (await first.create(server.address, 1000, 1, 100_000))["id"]
    with pytest.raises(Crash):
        await tick(first, sid, clock, 5)
    assert alice.balance_msat == 2000 and len(server.issued) == 2
    second = make_runner(node, clock, payer, ds=ds)
    await second.load()
    assert second.streams[sid].in_flight.label == f"streampay-{sid}-2"
    await tick(second, sid, clock, 5)
    st = second.streams[sid]
    assert st.in_flight is None and st.payments == st.intervals == 7
    assert alice.balance_msat == st.paid_msat == 7000
    labels = await labels_paid(node)
    assert labels == [f"streampay-{sid}-{k}" for k in range(1, 8)]             # each label paid once
    assert len(server.issued) == 7                    # no invoice fetched again for the reconciled one


@pytest.mark.parametrize("node_restarted", [False, True])
async def test_a_payment_in_flight_that_never_left_is_paid_once_under_a_new_label(net, server, payer, node_restarted):
    _, node, alice = net
    clock, ds = Clock(), DiesAfterWrite()
    first = make_runner(node, clock, payer, ds=ds)
    sid = (await first.create(server.address, 1000, 1, 100_000))["id"]
    ds.die_on = 5              # two writes a payment (in flight, outcome): the 5th puts seq 3 in flight
    with pytest.raises(Crash):
        await tick(first, sid, clock, 5)
    assert alice.balance_msat == 2000 and len(server.issued) == 2       # seq 3 never asked for an invoice
    ds.die_on = None
    second = make_runner(node, clock, payer, ds=ds, node_started_at=clock.t if node_restarted else None)
    await second.load()
    assert second.streams[sid].in_flight.label == f"streampay-{sid}-3"
    await tick(second, sid, clock, RECONCILE_GRACE_S + 5)
    st = second.streams[sid]
    labels = await labels_paid(node)
    assert f"streampay-{sid}-3" not in labels and len(labels) == len(set(labels)) == st.payments
    assert alice.balance_msat == st.paid_msat
    assert st.paid_msat + st.recipients[0].owed == 1000 * st.intervals      # each interval owed once
    assert len(server.issued) == st.payments          # every invoice fetched was paid once


async def test_an_invoice_fetched_before_a_crash_is_never_paid(net, server, payer):
    """The process dies between fetching the invoice and paying it: after the restart the
    payment is made under a new label with a new invoice; the first stays unpaid."""
    _, node, alice = net
    clock, ds = Clock(), MemoryRecords()
    fetched = []

    async def dies_after_fetching(address, amount, comment):
        got = await payer.invoice(address, amount, comment)
        fetched.append(got[1])
        if len(fetched) == 2:
            raise Crash()
        return got

    first = StreamRunner(node, ds, clock=clock, address_invoices=dies_after_fetching)
    sid = (await first.create(server.address, 1000, 1, 100_000))["id"]
    with pytest.raises(Crash):
        await tick(first, sid, clock, 5)
    second = make_runner(node, clock, payer, ds=ds, node_started_at=clock.t)
    await second.load()
    await tick(second, sid, clock, 3)
    st = second.streams[sid]
    paid_hashes = [s.payment.payment_hash for s in node._sends]
    assert fetched[1] not in paid_hashes and alice.invoice_status(fetched[1]) != "paid"
    assert alice.balance_msat == st.paid_msat == 1000 * st.payments
    assert st.paid_msat + st.recipients[0].owed == 1000 * st.intervals
