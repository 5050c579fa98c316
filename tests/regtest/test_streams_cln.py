"""Streaming payments on a real network: l1 -> l2 -> l3, every node running micropay."""
import time

from pyln.testing.utils import wait_for

from .util import opts


def status(node, sid):
    return node.rpc.call("streampay-status", {"id": sid})


def settled(node, sid):
    """The stream's status once nothing is in flight: a payment sent before a stop or a
    completion may still be finishing, and a snapshot taken before it did is stale."""
    wait_for(lambda: status(node, sid)["in_flight"] is None, timeout=90)
    return status(node, sid)


def sessions(node, sid):
    return {s["stream_id"]: s for s in node.rpc.call("streampay-received", {"stream_id": sid})["sessions"]}


def received(node, sid, expected_msat):
    """The receiver's session once it has recorded `expected_msat` (its hook records each
    payment as it arrives, which may be a moment after the payer counts it)."""
    wait_for(lambda: sessions(node, sid).get(sid, {}).get("received_msat") == expected_msat, timeout=30)
    return sessions(node, sid)[sid]


def test_stream_over_two_hops_pays_exact_amounts_within_budget(node_factory):
    l1, l2, l3 = node_factory.line_graph(3, opts=opts(listener=True), wait_for_announce=True)
    started = time.time()
    s = l1.rpc.call("streampay-start", {"destination": l3.info["id"], "amount_msat": 10_000,
                                        "interval_s": 2, "max_total_msat": 45_000, "max_fee_msat": 500,
                                        "metadata": {"podcast": "regtest radio"}})
    sid = s["id"]
    wait_for(lambda: status(l1, sid)["state"] == "completed", timeout=60)
    st = settled(l1, sid)
    assert st["reason"] == "budget exhausted"
    assert st["paid_msat"] + st["fees_msat"] <= 45_000
    assert st["paid_msat"] >= 40_000 and st["failures"] == 0
    assert st["intervals"] == 5                   # 10_000 x 4, then what the budget allowed
    elapsed = time.time() - started
    assert elapsed >= 2 * 4 - 1                   # paid at the interval, not in a burst
    # the receiver attributed every payment to this stream, each sequence number once
    got = received(l3, sid, st["paid_msat"])
    assert got["payments"] == got["distinct_seqs"] == st["payments"]
    assert got["app_name"] == "micropay"
    l1.daemon.wait_for_log("listener got streampay_payment: .*\"status\": \"complete\"")
    l1.daemon.wait_for_log("listener got streampay_state: .*completed")


def test_split_stream_survives_payer_restart_without_double_payment(node_factory):
    l1, l2, l3 = node_factory.line_graph(3, opts=opts(may_reconnect=True), wait_for_announce=True)
    s = l1.rpc.call("streampay-start", {
        "destination": l2.info["id"], "amount_msat": 4000, "interval_s": 1, "max_total_msat": 200_000,
        "splits": [{"destination": l2.info["id"], "share": 1, "name": "host"},
                   {"destination": l3.info["id"], "share": 3, "name": "guest"}]})
    sid = s["id"]
    wait_for(lambda: status(l1, sid)["payments"] >= 4, timeout=60)
    l1.restart()                                           # mid-stream
    for peer in (l2,):
        l1.rpc.connect(peer.info["id"], "localhost", peer.port)
    l1.wait_channel_active(l1.get_channel_scid(l2))
    wait_for(lambda: status(l1, sid)["payments"] >= 12, timeout=90)
    l1.rpc.call("streampay-stop", {"id": sid})
    st = settled(l1, sid)          # read after the payment in flight at the stop has finished
    assert st["state"] == "stopped"
    host, guest = st["recipients"]
    # shares 1:3 of 4000 msat per interval, remainders carried: exact per interval
    assert host["paid_msat"] + host["owed_msat"] == 1000 * st["intervals"]
    assert guest["paid_msat"] + guest["owed_msat"] == 3000 * st["intervals"]
    for node, rcpt in ((l2, host), (l3, guest)):
        got = received(node, sid, rcpt["paid_msat"])            # nothing paid twice or lost
        assert got["payments"] == got["distinct_seqs"]
    assert st["paid_msat"] + st["fees_msat"] <= 200_000


def test_stream_to_a_bolt12_offer(node_factory):
    l1, l2 = node_factory.line_graph(2, opts=opts(), wait_for_announce=True)
    offer = l2.rpc.offer("any", "streamed support")["bolt12"]
    s = l1.rpc.call("streampay-start", [offer, 5000, 1, 12_000, 100])
    wait_for(lambda: status(l1, s["id"])["state"] == "completed", timeout=60)
    st = settled(l1, s["id"])
    assert st["failures"] == 0 and st["paid_msat"] + st["fees_msat"] <= 12_000

    def paid_to_l2():
        return sum(i["amount_received_msat"] for i in l2.rpc.listinvoices()["invoices"] if i["status"] == "paid")
    wait_for(lambda: paid_to_l2() == st["paid_msat"], timeout=30)
    assert st["paid_msat"] >= 10_000
