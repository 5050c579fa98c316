"""The NWC service's money rules, request by request, without a relay: requests are
built and encrypted here as a client would, answers are captured as published and
decrypted. A crash is a task cancelled at a step boundary; a new service on the same
store then resumes."""
from __future__ import annotations

import asyncio
import json
import time

import pytest

from micropay.core.errors import PaymentUnknown
from micropay.lightning.sandbox import SandboxNetwork
from micropay.nostr import nip04, nip44
from micropay.nostr.event import sign_event
from micropay.nostr.keys import Keys
from micropay.nwc.repository import NwcRepository
from micropay.nwc.schema import NWC_SCHEMA
from micropay.nwc.service import LEASE_S, NOT_SENT_GRACE_S, NwcService, next_period, period_start
from micropay.nwc.uri import parse_uri
from micropay.store.sqlite import SqliteStore

MASTER = bytes(range(32))


class Crashing:
    """A node whose pay() dies (like the plugin's process) before or after the real one."""

    def __init__(self, node, when: str | None = None) -> None:
        self._node, self.when = node, when

    def __getattr__(self, name):
        return getattr(self._node, name)

    async def pay(self, *a, **kw):
        if self.when == "before":
            raise asyncio.CancelledError()
        p = await self._node.pay(*a, **kw)
        if self.when == "after":
            raise asyncio.CancelledError()
        if self.when == "unknown":
            raise PaymentUnknown("the connection to lightningd was lost")
        return p


class Harness:
    def __init__(self, store, node, clock) -> None:
        self.store, self.node, self.clock = store, node, clock
        self.sent: list = []
        self.service = self.make(node)

    def make(self, node, **kw) -> NwcService:
        async def publish(ev):
            self.sent.append(ev)
            return True

        async def info():
            return {"alias": "a", "network": "regtest"}
        return NwcService(node, NwcRepository(self.store), MASTER, ["ws://127.0.0.1:1"], publish=publish,
                          node_info=info, clock=self.clock, **kw)

    async def swap(self, node, **kw) -> None:
        """A new service (a restarted plugin) on the same store."""
        self.service = self.make(node, **kw)
        await self.service.load()

    async def connect(self, **kw):
        args = dict(budget_msat=50_000, budget_period="daily", methods=("pay_invoice", "pay_keysend", "get_balance"),
                    max_fee_msat=500)
        args.update(kw)
        created = await self.service.create("app", **args)
        uri = parse_uri(created["uri"])
        return created, uri

    def request(self, uri, method, params, *, enc="nip44_v2", keys=None, created_at=None, tags=()):
        keys = keys or uri.client
        text = json.dumps({"method": method, "params": params})
        if enc == "nip44_v2":
            content = nip44.encrypt(text, nip44.conversation_key(keys, uri.service_pubkey))
        else:
            content = nip04.encrypt(text, keys, uri.service_pubkey)
        etags = [["p", uri.service_pubkey], *([["encryption", enc]] if enc != "none" else []), *tags]
        return sign_event(keys, 23194, content, etags, created_at=created_at or int(self.clock()))

    def answers(self, uri, request_id):
        out = []
        for ev in self.sent:
            if ev.kind == 23195 and ev.first("e") == request_id:
                try:
                    text = nip44.decrypt(ev.content, nip44.conversation_key(uri.client, ev.pubkey))
                except Exception:
                    text = nip04.decrypt(ev.content, uri.client, ev.pubkey)
                out.append(json.loads(text))
        return out


@pytest.fixture
async def h(tmp_path):
    store = SqliteStore(tmp_path / "nwc.sqlite3", (NWC_SCHEMA,))
    await store.open()
    now = [1_800_000_000.0]
    net = SandboxNetwork(clock=lambda: now[0])
    node = net.add_node("alice", balance_msat=1_000_000)
    shop = net.add_node("shop", balance_msat=0)
    harness = Harness(store, node, lambda: now[0])
    harness.shop, harness.now, harness.net = shop, now, net
    yield harness
    await store.close()


async def test_errors_on_the_wire_use_the_spec_codes(h):
    _, uri = await h.connect(budget_msat=10_000)
    big = await h.shop.create_invoice(9_600, "big", "x", 600)
    ev = h.request(uri, "pay_invoice", {"invoice": big.bolt11})
    await h.service.handle(ev)
    [ans] = h.answers(uri, ev.id)
    assert ans["result_type"] == "pay_invoice" and ans["result"] is None
    assert ans["error"]["code"] == "QUOTA_EXCEEDED" and "9600 msat" in ans["error"]["message"]
    for method, params, code in (("make_invoice", {"amount": 1}, "RESTRICTED"),
                                 ("multi_pay_invoice", {}, "NOT_IMPLEMENTED"),
                                 ("pay_invoice", {"invoice": "lnbc1nonsense"}, "OTHER"),
                                 ("pay_invoice", {}, "OTHER")):
        ev = h.request(uri, method, params)
        await h.service.handle(ev)
        assert [a["error"]["code"] for a in h.answers(uri, ev.id)] == [code], method
    assert h.shop.invoice_status(big.payment_hash) == "unpaid"


async def test_nip04_requests_are_answered_in_nip04(h):
    _, uri = await h.connect()
    for enc in ("nip04", "none"):             # no encryption tag means NIP-04
        ev = h.request(uri, "get_balance", {}, enc="nip04" if enc == "nip04" else "none")
        if enc == "none":
            text = nip04.encrypt(json.dumps({"method": "get_balance", "params": {}}), uri.client, uri.service_pubkey)
            ev = sign_event(uri.client, 23194, text, [["p", uri.service_pubkey]], created_at=int(h.clock()))
        await h.service.handle(ev)
        [resp] = [e for e in h.sent if e.first("e") == ev.id]
        assert "?iv=" in resp.content
        assert json.loads(nip04.decrypt(resp.content, uri.client, resp.pubkey))["result"]["balance"] == 50_000


async def test_replays_stale_expired_and_foreign_requests_get_nothing(h):
    _, uri = await h.connect()
    bill = await h.shop.create_invoice(1_000, "b", "x", 600)
    ev = h.request(uri, "pay_invoice", {"invoice": bill.bolt11})
    await h.service.handle(ev)
    await h.service.handle(ev)                                     # the same event again (a replay)
    assert len(h.answers(uri, ev.id)) == 1
    assert h.net.nodes[await h.shop.node_id()].balance_msat == 1_000
    stale = h.request(uri, "get_balance", {}, created_at=int(h.clock()) - 3600)
    expired = h.request(uri, "get_balance", {}, tags=[["expiration", str(int(h.clock()) - 1)]])
    stranger = h.request(uri, "get_balance", {}, keys=Keys.generate())
    for e in (stale, expired, stranger):
        await h.service.handle(e)
        assert h.answers(uri, e.id) == []
    fresh = h.request(uri, "get_balance", {}, tags=[["expiration", str(int(h.clock()) + 60)]])
    await h.service.handle(fresh)
    assert h.answers(uri, fresh.id)[0]["result"]["balance"] == 50_000 - 1_000


async def test_crash_before_the_node_pays_fails_it_and_gives_the_budget_back(h):
    created, uri = await h.connect()
    bill = await h.shop.create_invoice(10_000, "c1", "x", 600)
    await h.swap(Crashing(h.node, "before"))
    ev = h.request(uri, "pay_invoice", {"invoice": bill.bolt11})
    with pytest.raises(asyncio.CancelledError):
        await h.service.handle(ev)
    assert (await h.service.list())[0]["used_msat"] == 10_500        # reserved: amount + fee cap
    await h.swap(h.node)
    h.now[0] += LEASE_S + 1                                          # the lease ran out, the grace has not:
    await h.service.resume()                                         # a live lightningd may still write its record
    assert h.answers(uri, ev.id) == [] and (await h.service.list())[0]["used_msat"] == 10_500
    h.now[0] += NOT_SENT_GRACE_S
    await h.service.resume()
    [ans] = h.answers(uri, ev.id)
    assert ans["error"]["code"] == "PAYMENT_FAILED"
    assert (await h.service.list())[0]["used_msat"] == 0 and h.shop.invoice_status(bill.payment_hash) == "unpaid"
    await h.service.resume()
    assert len(h.answers(uri, ev.id)) == 1                           # answered once


async def test_crash_before_pay_after_a_lightningd_restart_fails_at_once(h):
    _, uri = await h.connect()
    bill = await h.shop.create_invoice(10_000, "c1", "x", 600)
    await h.swap(Crashing(h.node, "before"))
    ev = h.request(uri, "pay_invoice", {"invoice": bill.bolt11})
    with pytest.raises(asyncio.CancelledError):
        await h.service.handle(ev)
    h.now[0] += 130
    await h.swap(h.node, node_started_at=h.now[0] - 5)              # lightningd started after the attempt
    await h.service.resume()
    assert h.answers(uri, ev.id)[0]["error"]["code"] == "PAYMENT_FAILED"


@pytest.mark.parametrize("when", ["after", "unknown"])
async def test_paid_but_not_recorded_is_settled_from_the_node_and_answered_once(h, when):
    _, uri = await h.connect()
    bill = await h.shop.create_invoice(10_000, "c2", "x", 600)
    await h.swap(Crashing(h.node, when))
    ev = h.request(uri, "pay_invoice", {"invoice": bill.bolt11})
    if when == "after":
        with pytest.raises(asyncio.CancelledError):
            await h.service.handle(ev)
    else:
        await h.service.handle(ev)                                  # no answer yet: the outcome is unknown
    assert h.answers(uri, ev.id) == [] and h.shop.invoice_status(bill.payment_hash) == "paid"
    await h.swap(h.node)
    h.now[0] += 200
    await h.service.resume()
    await h.service.resume()
    [ans] = h.answers(uri, ev.id)
    assert ans["result"]["preimage"] and ans["error"] is None
    assert (await h.service.list())[0]["used_msat"] == 10_000      # amount + the fee actually paid (0 here)
    again = h.request(uri, "pay_invoice", {"invoice": bill.bolt11})
    await h.service.handle(again)                                   # a retry with a new request id
    assert h.answers(uri, again.id)[0]["result"]["preimage"] == ans["result"]["preimage"]
    assert h.net.nodes[await h.shop.node_id()].balance_msat == 10_000


async def test_concurrent_payments_never_overspend_the_budget(h):
    _, uri = await h.connect(budget_msat=35_000, max_fee_msat=0)
    bills = [await h.shop.create_invoice(10_000, f"p{i}", "x", 600) for i in range(6)]
    events = [h.request(uri, "pay_invoice", {"invoice": b.bolt11}) for b in bills]
    await asyncio.gather(*(h.service.handle(e) for e in events))
    codes = sorted(("ok" if a["error"] is None else a["error"]["code"]) for e in events for a in h.answers(uri, e.id))
    assert codes == ["QUOTA_EXCEEDED"] * 3 + ["ok"] * 3
    assert h.net.nodes[await h.shop.node_id()].balance_msat == 30_000


async def test_keysend_counts_against_the_budget(h):
    _, uri = await h.connect()
    ev = h.request(uri, "pay_keysend", {"amount": 7_000, "pubkey": await h.shop.node_id(),
                                        "tlv_records": [{"type": 696969, "value": "0102"}]})
    await h.service.handle(ev)
    [ans] = h.answers(uri, ev.id)
    assert ans["error"] is None and ans["result"]["preimage"]
    assert (await h.service.list())[0]["used_msat"] == 7_000
    bad = h.request(uri, "pay_keysend", {"amount": 1, "pubkey": "02" + "00" * 32, "tlv_records": [{"type": 5}]})
    await h.service.handle(bad)
    assert h.answers(uri, bad.id)[0]["error"]["code"] == "OTHER"


def test_budget_periods_are_utc_calendar_periods():
    t = 1_800_000_000          # 2027-01-15 08:00 UTC, a Friday
    assert period_start("daily", t) == 1_799_971_200 and next_period("daily", t) == 1_799_971_200 + 86400
    assert time.gmtime(period_start("weekly", t)).tm_wday == 0
    assert time.gmtime(period_start("monthly", t))[:3] == (2027, 1, 1)
    assert time.gmtime(next_period("monthly", t))[:3] == (2027, 2, 1)
    assert time.gmtime(next_period("yearly", t))[:3] == (2028, 1, 1)
    assert period_start("never", t) == 0 and next_period("never", t) is None


async def test_a_connection_past_its_request_rate_is_told_rate_limited(h):
    h.service = h.make(h.node, requests_per_minute=5)
    await h.service.load()
    _, uri = await h.connect()
    events = [h.request(uri, "get_balance", {}) for _ in range(8)]
    for ev in events:
        await h.service.handle(ev)
    codes = [("ok" if a["error"] is None else a["error"]["code"]) for e in events for a in h.answers(uri, e.id)]
    assert codes == ["ok"] * 5 + ["RATE_LIMITED"]        # told once; the flood after it costs nothing
    h.now[0] += 1.5
    late = h.request(uri, "get_balance", {})
    await h.service.handle(late)
    assert [a["error"]["code"] for a in h.answers(uri, late.id)] == ["RATE_LIMITED"]


async def test_oversized_and_undecryptable_requests_are_dropped(h):
    _, uri = await h.connect()
    big = h.request(uri, "get_balance", {"pad": "x" * 70_000}, enc="nip04")     # NIP-44 caps it below
    await h.service.handle(big)
    assert [a["error"]["code"] for a in h.answers(uri, big.id)] == ["OTHER"]       # request too large
    garbled = sign_event(uri.client, 23194, "not a payload", [["p", uri.service_pubkey], ["encryption", "nip44_v2"]],
                         created_at=int(h.clock()))
    await h.service.handle(garbled)
    assert h.answers(uri, garbled.id) == []
    odd = h.request(uri, "get_balance", {}, enc="none", tags=[["encryption", "nip99"]])
    await h.service.handle(odd)
    assert [a["error"]["code"] for a in h.answers(uri, odd.id)] == ["UNSUPPORTED_ENCRYPTION"]


class Slow(Crashing):
    """A node whose pay() takes a while, counting the calls that reach it."""

    calls = 0

    async def pay(self, *a, **kw):
        type(self).calls += 1
        await asyncio.sleep(0.2)
        return await self._node.pay(*a, **kw)


async def test_two_requests_for_one_invoice_reach_the_node_once(h):
    _, uri = await h.connect()
    Slow.calls = 0
    await h.swap(Slow(h.node))
    bill = await h.shop.create_invoice(10_000, "twice", "x", 600)
    first, second = (h.request(uri, "pay_invoice", {"invoice": bill.bolt11}) for _ in range(2))
    await asyncio.gather(h.service.handle(first), h.service.handle(second))
    answers = h.answers(uri, first.id) + h.answers(uri, second.id)
    assert Slow.calls == 1 and sorted(str(a["error"] and a["error"]["code"]) for a in answers) == ["None", "OTHER"]
    assert (await h.service.list())[0]["used_msat"] == 10_000                     # charged once
    third = h.request(uri, "pay_invoice", {"invoice": bill.bolt11})
    await h.service.handle(third)
    assert h.answers(uri, third.id)[0]["result"]["preimage"] and Slow.calls == 1


async def test_a_store_error_after_paying_is_never_answered_as_a_failure(h, monkeypatch):
    _, uri = await h.connect()
    bill = await h.shop.create_invoice(10_000, "flaky", "x", 600)
    real_finish = h.service.repo.finish

    async def broken(*a, **kw):
        raise OSError("disk I/O error")
    monkeypatch.setattr(h.service.repo, "finish", broken)
    ev = h.request(uri, "pay_invoice", {"invoice": bill.bolt11})
    await h.service.handle(ev)
    assert h.answers(uri, ev.id) == [] and h.shop.invoice_status(bill.payment_hash) == "paid"
    monkeypatch.setattr(h.service.repo, "finish", real_finish)
    h.now[0] += LEASE_S + 1
    await h.service.resume()
    await h.service.resume()
    [ans] = h.answers(uri, ev.id)
    assert ans["error"] is None and ans["result"]["preimage"]


async def test_future_dated_requests_are_ignored(h):
    _, uri = await h.connect()
    ahead = h.request(uri, "get_balance", {}, created_at=int(h.clock()) + 3600)
    await h.service.handle(ahead)
    assert h.answers(uri, ahead.id) == []


async def test_list_transactions_fits_one_event(h):
    _, uri = await h.connect(methods=("make_invoice", "list_transactions"))
    for i in range(60):
        await h.service.handle(h.request(uri, "make_invoice", {"amount": 1000 + i, "description": "d" * 600}))
    ev = h.request(uri, "list_transactions", {"limit": 100, "unpaid": True})
    await h.service.handle(ev)
    [ans] = h.answers(uri, ev.id)
    txs = ans["result"]["transactions"]
    assert 10 < len(txs) < 60 and len(json.dumps(txs)) <= 48_000
    assert [t["amount"] for t in txs] == sorted((t["amount"] for t in txs), reverse=True)    # the newest kept


async def test_make_invoice_with_a_description_hash(h):
    import hashlib
    _, uri = await h.connect(methods=("make_invoice",))
    text = '[["text/plain","a tip for the stream"]]'
    digest = hashlib.sha256(text.encode()).hexdigest()
    ev = h.request(uri, "make_invoice", {"amount": 21_000, "description": text, "description_hash": digest})
    await h.service.handle(ev)
    [ans] = h.answers(uri, ev.id)
    dec = await h.node.decode(ans["result"]["invoice"])
    assert dec.description_hash == digest and dec.description == "" and dec.amount_msat == 21_000
    for params in ({"amount": 1, "description_hash": digest},                       # a bare hash
                   {"amount": 1, "description": "other", "description_hash": digest}):
        bad = h.request(uri, "make_invoice", params)
        await h.service.handle(bad)
        assert [a["error"]["code"] for a in h.answers(uri, bad.id)] == ["NOT_IMPLEMENTED"]
