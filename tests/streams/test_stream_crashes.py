"""The stream runner "crashes" at every boundary of a payment and a new process takes
over: recipients receive exactly what the payer's records say, no sequence is paid
twice, nothing paid is forgotten, the budget holds, and owed + paid is exact per
interval.

Boundaries of one payment: the datastore write of the in-flight record (crash before
it, or after it and before sending); the node has the payment (its record pending with
or without an HTLC behind it, or complete) and its result never came back; the result
came back and recording it dies. The node and the datastore are fakes with lightningd's
semantics: a record per payment label, an HTLC or not, generation compare-and-swap.
"""
import hashlib

import pytest

from micropay.core.errors import PaymentFailed
from micropay.lightning.base import Liquidity, Payment, PaymentStatus
from micropay.lightning.datastore import StaleRecord
from micropay.streams.runner import ORPHAN_GRACE_S, RECONCILE_GRACE_S, StreamRunner

HOST, GUEST = "02" + "a" * 64, "03" + "b" * 64
T0 = 1_800_000_000.0


class Crash(BaseException):
    """The process dies here: nothing after it runs, no handler sees it."""


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class FakeDatastore:
    """lightningd's datastore: JSON records with generations; can die around a write."""

    def __init__(self) -> None:
        self.records: dict[tuple, tuple[dict, int]] = {}
        self.writes = 0
        self.crash: tuple[int, str] | None = None     # (write number, "before" | "after")

    async def list(self, key):
        return [(list(k), doc, gen) for k, (doc, gen) in self.records.items() if k[:len(key)] == tuple(key)]

    async def create(self, key, value) -> int:
        self.records[tuple(key)] = (_copy(value), 0)
        return 0

    async def replace(self, key, value, generation) -> int:
        self.writes += 1
        if self.crash and self.crash[0] == self.writes and self.crash[1] == "before":
            raise Crash()
        doc, gen = self.records[tuple(key)]
        if gen != generation:
            raise StaleRecord("changed underneath us")
        self.records[tuple(key)] = (_copy(value), gen + 1)
        if self.crash and self.crash[0] == self.writes and self.crash[1] == "after":
            raise Crash()
        return gen + 1


def _copy(doc):
    import json
    return json.loads(json.dumps(doc))


class FakeNode:
    """Keysends recorded by label, as lightningd's listsendpays; can die mid-payment."""

    network = "regtest"

    def __init__(self) -> None:
        self.by_label: dict[str, PaymentStatus] = {}
        self.htlcs: set[str] = set()
        self.received: dict[str, int] = {}
        self.payments = 0
        self.crash: tuple[int, str] | None = None     # (payment number, mode)

    async def wait_until_ready(self, timeout_s):
        return True

    async def node_id(self):
        return "02" + "f" * 64

    async def sendpays_position(self):
        return 1

    async def liquidity(self):
        return Liquidity(0, 10**12)

    async def lookup_payment(self, label, start):
        return self.by_label.get(label)

    async def htlc_in_flight(self, payment_hash):
        return payment_hash in self.htlcs

    def settle(self, label: str, destination: str, amount: int) -> Payment:
        h = hashlib.sha256(label.encode()).hexdigest()
        assert self.by_label.get(label, PaymentStatus("failed")).state != "complete", f"{label} paid twice"
        p = Payment(h, "00" * 32, amount, 10)
        self.by_label[label] = PaymentStatus("complete", p, h)
        self.htlcs.discard(h)
        self.received[destination] = self.received.get(destination, 0) + amount
        return p

    async def keysend(self, destination, amount_msat, *, label=None, max_fee_msat=None, extratlvs=None,
                      retry_for_s=None):
        self.payments += 1
        h = hashlib.sha256(label.encode()).hexdigest()
        mode = self.crash[1] if self.crash and self.crash[0] == self.payments else None
        if mode == "pending_no_htlc":            # record written, HTLC never saved, then death
            self.by_label[label] = PaymentStatus("pending", payment_hash=h)
            raise Crash()
        if mode == "pending_htlc":               # the HTLC is out; it completes later
            self.by_label[label] = PaymentStatus("pending", payment_hash=h)
            self.htlcs.add(h)
            self.later = (label, destination, amount_msat)
            raise Crash()
        if self.payments % 7 == 0:               # now and then, an honest failure
            self.by_label[label] = PaymentStatus("failed", payment_hash=h)
            raise PaymentFailed("no route", cln_code=205)
        p = self.settle(label, destination, amount_msat)
        if mode == "complete":
            raise Crash()
        return p


def runner(node, ds, clock, **kw):
    return StreamRunner(node, ds, clock=clock, **kw)


async def tick(r: StreamRunner, sid: str, clock: Clock, seconds: int) -> None:
    for _ in range(seconds):
        clock.t += 1
        await r._step(r.streams[sid])


CASES = [
    ("datastore", (3, "before")),     # the in-flight record is never written
    ("datastore", (3, "after")),      # written, then death before sending
    ("node", (3, "pending_no_htlc")),
    ("node", (3, "pending_htlc")),
    ("node", (3, "complete")),        # paid; the result never came back
    ("datastore", (4, "before")),     # the result came back; recording it dies
]


@pytest.mark.parametrize("where,crash", CASES)
@pytest.mark.parametrize("node_restarted", [False, True])
async def test_crash_at_every_boundary(where, crash, node_restarted):
    clock, node, ds = Clock(), FakeNode(), FakeDatastore()
    first = runner(node, ds, clock)
    s = await first.create(None, 4000, 1, 100_000, 50,
                           [{"destination": HOST, "share": 1}, {"destination": GUEST, "share": 3}])
    sid = s["id"]
    (ds if where == "datastore" else node).crash = crash
    with pytest.raises(Crash):
        await tick(first, sid, clock, 30)
    ds.crash = node.crash = None
    crashed_at = clock.t
    # a new process: lightningd restarted with it, or only the plugin did
    events = []
    second = runner(node, ds, clock, node_started_at=clock.t if node_restarted else None,
                    notify=lambda topic, payload: events.append(payload))
    await second.load()
    if crash[1] == "pending_htlc":
        await tick(second, sid, clock, 5)
        assert second.streams[sid].in_flight is not None          # waits for the HTLC
        node.settle(*node.later)
    await tick(second, sid, clock, max(RECONCILE_GRACE_S, ORPHAN_GRACE_S) + 30)
    st = second.streams[sid]
    assert st.in_flight is None and clock.t > crashed_at
    # recipients received exactly what the payer's records say, nothing paid twice
    assert node.received.get(HOST, 0) == st.recipients[0].paid_msat
    assert node.received.get(GUEST, 0) == st.recipients[1].paid_msat
    assert st.paid_msat == sum(node.received.values())
    assert sum(1 for p in node.by_label.values() if p.state == "complete") == st.payments
    # the budget and exact per-interval accounting
    assert st.paid_msat + st.fees_msat <= 100_000
    assert st.recipients[0].paid_msat + st.recipients[0].owed == 1000 * st.intervals
    assert st.recipients[1].paid_msat + st.recipients[1].owed == 3000 * st.intervals
    if crash[1] == "pending_no_htlc":             # settled as failed; its sequence never paid
        dead = [e for e in events if "no HTLC carries it" in (e.get("error") or "")]
        assert len(dead) == 1 and dead[0]["seq"] == 3 and dead[0]["status"] == "failed"
        assert node.by_label[f"streampay-{sid}-3"].state == "pending"


async def test_a_payment_that_never_left_is_retried_at_once_after_lightningd_restarted():
    clock, node, ds = Clock(), FakeNode(), FakeDatastore()
    first = runner(node, ds, clock)
    sid = (await first.create(HOST, 1000, 10, 50_000, 50))["id"]
    ds.crash = (1, "after")                 # the in-flight record written, then death
    with pytest.raises(Crash):
        await tick(first, sid, clock, 2)
    ds.crash = None
    second = runner(node, ds, clock, node_started_at=clock.t + 1)
    await second.load()
    await tick(second, sid, clock, 2)
    st = second.streams[sid]
    assert st.in_flight is None and st.payments == 1 and node.received[HOST] == 1000
    assert st.missed_intervals == 0         # no 60 s wait made it skip intervals


class SlowDatastore(FakeDatastore):
    """A datastore whose writes take a while, as lightningd's do over RPC."""

    async def replace(self, key, value, generation) -> int:
        import asyncio
        await asyncio.sleep(0.02)
        return await super().replace(key, value, generation)


async def test_a_stop_while_the_loop_records_a_payment_is_not_refused_as_stale():
    """Seen on regtest: streampay-stop answered "changed by someone else" because its
    write and the payment loop's (both of this process) started from one generation."""
    import asyncio
    clock, node, ds = Clock(), FakeNode(), SlowDatastore()
    r = runner(node, ds, clock)
    sid = (await r.create(HOST, 1000, 1, 50_000, 50))["id"]
    clock.t += 1
    step = asyncio.ensure_future(r._step(r.streams[sid]))    # writes the in-flight record, pays, records
    await asyncio.sleep(0.01)                                 # its first write is under way
    stopped = await r.change(sid, "stop")
    await step
    assert stopped["state"] == "stopped"
    again = runner(node, ds, clock)
    await again.load()                                        # what a restart would read
    st = again.streams[sid]
    assert st.state == "stopped" and st.in_flight is None and st.payments == 1 and node.received[HOST] == 1000


async def _crash_mid_payment(mode):
    clock, node, ds = Clock(), FakeNode(), FakeDatastore()
    first = runner(node, ds, clock)
    sid = (await first.create(HOST, 1000, 1, 20_000, 50))["id"]
    node.crash = (2, mode)
    with pytest.raises(Crash):
        await tick(first, sid, clock, 5)
    node.crash = None
    events = []
    second = runner(node, ds, clock, node_started_at=clock.t,     # lightningd restarted with it
                    notify=lambda topic, payload: events.append(payload))
    await second.load()
    second.events = events
    return clock, node, second, sid


async def test_a_pending_payment_with_no_htlc_is_failed_after_the_grace_and_its_amount_paid_once():
    clock, node, second, sid = await _crash_mid_payment("pending_no_htlc")
    dead = f"streampay-{sid}-2"
    await tick(second, sid, clock, ORPHAN_GRACE_S - 1)
    st = second.streams[sid]
    assert st.in_flight is not None and st.in_flight.label == dead      # within the grace: waited for
    paid_before = st.paid_msat
    await tick(second, sid, clock, 5)
    st = second.streams[sid]
    assert st.in_flight is None or st.in_flight.label != dead
    dead_events = [e for e in second.events if e["seq"] == 2 and e["status"] != "complete"]
    assert len(dead_events) == 1 and "no HTLC" in dead_events[0]["error"]
    assert node.by_label[dead].state == "pending"                       # never completed, never paid again
    # the budget: the dead payment cost nothing; what it owed was paid under a new sequence
    assert st.paid_msat > paid_before and st.paid_msat == node.received[HOST]
    assert st.paid_msat + st.recipients[0].owed == 1000 * st.intervals
    assert st.paid_msat + st.fees_msat <= 20_000


async def test_a_pending_payment_with_its_htlc_out_is_waited_for_past_the_grace():
    clock, node, second, sid = await _crash_mid_payment("pending_htlc")
    await tick(second, sid, clock, 3 * ORPHAN_GRACE_S)
    st = second.streams[sid]
    assert st.in_flight is not None and st.in_flight.seq == 2 and not second.events
    node.settle(*node.later)
    await tick(second, sid, clock, 2)
    st = second.streams[sid]
    assert [e["status"] for e in second.events if e["seq"] == 2] == ["complete"]
    assert st.paid_msat == node.received[HOST]
    assert sum(1 for p in node.by_label.values() if p.state == "complete") == st.payments
