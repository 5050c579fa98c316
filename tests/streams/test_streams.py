"""The streaming rules, driven by a fake clock: exact splits, budget, pacing, failures."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from micropay.core.errors import BadRequest
from micropay.streams.schedule import (MAX_CONSECUTIVE_FAILURES, MIN_PIECE_MSAT, Recipient, Stream,
                                       parse_recipients)

A, B, C = "02" + "a" * 64, "03" + "b" * 64, "02" + "c" * 64


def run(stream, until, pay=lambda s, i, amt: (True, 0, False), step=1.0):
    """Drive the stream like the runner does; pay() returns (ok, fee, liquidity)."""
    t = stream.created_at
    while t <= until:
        stream.accrue(t)
        while (plan := stream.next_payment(t)) is not None:
            i, amount = plan
            stream.begin(i, amount, t)
            ok, fee, liquidity = pay(stream, i, amount)
            if ok:
                stream.succeeded(fee, t)
            else:
                stream.failed("boom", liquidity, t)
        t += step


def test_pays_the_amount_every_interval():
    s = Stream.create("s1", [Recipient(A)], 5000, 10, None, 100, now=0)
    run(s, 59)
    assert (s.intervals, s.paid_msat, s.payments) == (6, 30_000, 6)


def test_splits_are_exact_with_remainders_carried():
    s = Stream.create("s2", [Recipient(A, 1), Recipient(B, 1), Recipient(C, 1)], 1000, 1, None, 0, now=0)
    run(s, 2.5)                                   # 3 intervals: 3000 msat over 3 recipients
    assert s.paid_msat + sum(r.owed for r in s.recipients) + sum(r.carry for r in s.recipients) / 3 == 3000
    run_more = Stream.from_json(json.loads(json.dumps(s.to_json())))
    assert run_more == s                          # persistence round trip


@settings(max_examples=200, deadline=None)
@given(amount=st.integers(1, 10**7), shares=st.lists(st.integers(1, 50), min_size=1, max_size=6),
       intervals=st.integers(1, 30))
def test_no_msat_lost_to_rounding(amount, shares, intervals):
    s = Stream.create("p", [Recipient(A, sh) for sh in shares], amount, 1, None, 0, now=0)
    for k in range(intervals):
        s.accrue(float(k))
    total = sum(shares)
    # everything accrued is owed, plus remainders smaller than one msat per recipient
    assert sum(r.owed for r in s.recipients) * total + sum(r.carry for r in s.recipients) == amount * intervals * total
    assert all(0 <= r.carry < total for r in s.recipients)


def test_budget_caps_amounts_plus_fees():
    s = Stream.create("b", [Recipient(A)], 5000, 1, 12_345, 50, now=0)
    run(s, 100, pay=lambda st, i, amt: (True, 37, False))
    assert s.state == "completed" and s.reason == "budget exhausted"
    assert s.paid_msat + s.fees_msat <= 12_345
    assert s.paid_msat + s.fees_msat + 50 > 12_345 - 5000   # and it did use the budget


def test_one_failing_recipient_does_not_stop_the_others():
    s = Stream.create("f", [Recipient(A), Recipient(B)], 2000, 1, None, 10, now=0)
    run(s, 60, pay=lambda st, i, amt: (st.recipients[i].destination != B, 0, False))
    status = s.status(60)
    assert status["recipients"][0]["paid_msat"] == 61 * 1000
    assert status["recipients"][1]["suspended"] is True
    assert s.state == "active" and s.failures == MAX_CONSECUTIVE_FAILURES


def test_everyone_failing_pauses_with_reason_and_resume_clears():
    s = Stream.create("p", [Recipient(A)], 1000, 1, None, 10, now=0)
    run(s, 100, pay=lambda st, i, amt: (False, 0, False))
    assert s.state == "paused" and "failed 5 times" in s.reason
    assert s.failures == MAX_CONSECUTIVE_FAILURES       # backoff kept it from hammering
    s.resume(101)
    assert s.state == "active" and not any(r.suspended for r in s.recipients)


def test_liquidity_failures_shrink_pieces_then_recover():
    s = Stream.create("l", [Recipient(A)], 64_000, 10, None, 10, now=0)
    sizes = []

    def pay(st, i, amt):
        sizes.append(amt)
        return (amt <= 8000, 0, amt > 8000)          # only small payments get through

    run(s, 200, pay=pay, step=0.5)
    assert sizes[:4] == [64_000, 32_000, 16_000, 8000]  # multiplicative decrease
    assert s.paid_msat == s.intervals * 64_000 - s.recipients[0].owed
    assert 8000 < max(sizes[4:]) <= 24_000              # additive recovery probes up, then halves again
    assert min(sizes) >= MIN_PIECE_MSAT


def test_missed_intervals_are_skipped_not_burst_paid():
    s = Stream.create("m", [Recipient(A)], 1000, 10, None, 0, now=0)
    run(s, 5)
    s.accrue(1000.0)                               # node was down for ~100 intervals
    assert s.intervals == 2 and s.missed_intervals == 99
    assert s.next_due == 1010.0


def test_state_changes_are_validated():
    s = Stream.create("x", [Recipient(A)], 1000, 10, None, 0, now=0)
    with pytest.raises(BadRequest):
        s.resume(0)
    s.stop()
    with pytest.raises(BadRequest):
        s.pause("no")


def test_tlv_record_is_blip10_json():
    s = Stream.create("t", [Recipient(A, name="host")], 1000, 60, None, 0, now=0,
                      metadata={"podcast": "show", "message": "hi"})
    s.accrue(0)
    i, amt = s.next_payment(0)
    s.begin(i, amt, 0)
    (key, value), = s.tlv_record().items()
    doc = json.loads(bytes.fromhex(value))
    assert key == "7629169"
    assert doc["action"] == "stream" and doc["value_msat"] == 1000 and doc["app_name"] == "micropay"
    assert doc["micropay_stream_id"] == "t" and doc["micropay_seq"] == 1 and doc["podcast"] == "show"


@pytest.mark.parametrize("dest,splits", [
    ("nothex", None), (None, None), (A, []), (A, [{"destination": B}]),
    (None, [{"destination": A, "share": 0}]), (None, [{"destination": A, "share": "1"}]), (None, "x"),
])
def test_bad_recipients(dest, splits):
    with pytest.raises(BadRequest):
        parse_recipients(dest, splits)


def test_good_recipients():
    assert [r.destination for r in parse_recipients(None, [{"destination": A, "share": 3},
                                                           {"destination": "lno1qgsq"}])] == [A, "lno1qgsq"]



def test_lightning_addresses_are_recipients_next_to_nodes_and_offers():
    rs = parse_recipients(None, [{"destination": A}, {"destination": "lno1qgsq"},
                                 {"destination": " Alice@Example.com "}, {"destination": "_@127.0.0.1:8080"}])
    assert [(r.destination, r.kind) for r in rs] == [(A, "node"), ("lno1qgsq", "offer"),
                                                     ("alice@example.com", "address"), ("_@127.0.0.1:8080", "address")]
    assert parse_recipients("ALICE@example.com", None)[0].destination == "alice@example.com"
    with pytest.raises(BadRequest, match="name the same destination twice"):
        parse_recipients(None, [{"destination": "alice@example.com"}, {"destination": "Alice@EXAMPLE.com"}])
    with pytest.raises(BadRequest, match=r"splits\[1\].destination is not a Lightning Address: .*bad port"):
        parse_recipients(None, [{"destination": A}, {"destination": "alice@example.com:99999"}])


def test_the_comment_to_an_address_carries_the_blip10_fields_on_one_line():
    s = Stream.create("0123456789abcdef0123", [Recipient("alice@example.com")], 1000, 60, None, 0, now=0,
                      metadata={"sender_name": "bob", "message": "hi\nthere\x00", "episode": 12, "feedID": 9})
    s.accrue(0)
    s.begin(*s.next_payment(0), 0)
    assert s.address_comment() == "bob: hi there | 12 | micropay stream 0123456789abcdef #1"
    bare = Stream.create("x", [Recipient("alice@example.com")], 1000, 60, None, 0, now=0)
    bare.accrue(0)
    bare.begin(*bare.next_payment(0), 0)
    assert bare.address_comment() == "micropay stream x #1"
    again = Stream.from_json(json.loads(json.dumps(s.to_json())))
    assert again.recipients[0].kind == "address" and again == s


# A stream as release 0.1.0 wrote it to the datastore (per-recipient accounts in parallel
# lists), produced by that release's micropay/streams.py: one payment to the host, one failure.
RELEASE_0_1_0_STREAM = '{"id": "s1", "recipients": [{"destination": "02aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "share": 1, "name": "host"}, {"destination": "03bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "share": 3, "name": "guest"}], "amount_msat": 10001, "interval_s": 60, "max_total_msat": 1000000, "max_fee_msat": 50, "created_at": 1000.0, "label": "pod", "metadata": {}, "state": "active", "reason": null, "next_due": 1060.0, "intervals": 1, "missed_intervals": 0, "owed": [0, 7500], "carry": [1, 3], "piece": [2501, 3750], "retry_at": [0.0, 1003.0], "consecutive_failures": [0, 1], "suspended": [false, false], "paid_msat": 2500, "fees_msat": 3, "paid_by_recipient": [2500, 0], "payments": 1, "failures": 1, "last_error": "no route", "seq": 2, "in_flight": null, "last_paid_at": 1001.0}'


def test_a_stream_persisted_by_release_0_1_0_resumes_with_its_accounts():
    s = Stream.from_json(json.loads(RELEASE_0_1_0_STREAM))
    host, guest = s.recipients
    assert (host.name, host.share, host.paid_msat, host.owed, host.carry, host.piece) == ("host", 1, 2500, 0, 1, 2501)
    assert (guest.owed, guest.carry, guest.piece, guest.retry_at, guest.consecutive_failures) == (7500, 3, 3750, 1003.0, 1)
    assert s.paid_msat == 2500 and s.fees_msat == 3 and s.seq == 2
    again = Stream.from_json(json.loads(json.dumps(s.to_json())))
    assert again.to_json() == s.to_json()
    assert "owed" not in s.to_json() and s.to_json()["recipients"][1]["owed"] == 7500
