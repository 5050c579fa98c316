"""The challenge service (micropay/seller/challenger.py), with no HTTP: freshness, limits, records."""
import asyncio
from typing import Callable

import pytest

from micropay.seller.challenger import Challenger, read_floor
from micropay.seller.config import ChallengeLimits
from micropay.core.errors import Overloaded, RateLimited
from micropay.lightning.sandbox import SandboxNetwork
from micropay.seller.pricing import RouteRule
from micropay.core.receipts import ReceiptSigner
from micropay.store.l402 import ChallengeStatus, L402Repository
from micropay.l402.tokens import RootKeyRing, TokenService

RULE = RouteRule(path="/a", price_msat=1000)


def challenger(store, tmp_path, **limits):
    net = SandboxNetwork(clock=lambda: 1_800_000_000)
    tokens = TokenService(RootKeyRing.load_or_create(tmp_path / "keys.json"), "svc", lambda: 1_800_000_000)
    c = Challenger(tokens=tokens, node=net.add_node("n"), l402=L402Repository(store),
                   limits=ChallengeLimits(**limits), receipts=ReceiptSigner.load_or_create(tmp_path / "rk"),
                   clock=lambda: 1_800_000_000)
    return c, net


def on_fake_clock(c, now: list[float]) -> None:
    """The challenger, its counts and its bucket all read now[0]."""
    c.clock = c.pending.clock = c.bucket.clock = lambda: now[0]


def stall_writes(c) -> Callable[[], None]:
    """Hold the challenge records' writes until the returned release is called."""
    gate, real_add = asyncio.Event(), c.l402.add_challenges

    async def stalled(records):
        await gate.wait()
        await real_add(records)
    c.l402.add_challenges = stalled

    def release() -> None:
        gate.set()
        c.l402.add_challenges = real_add
    return release


async def made_until_refused(c, client: str, made: int, bound: int = 5) -> int:
    """Challenges `client` until the per-client bound refuses it (within `bound` more):
    how many it then holds, counting the `made` before."""
    with pytest.raises(RateLimited, match="for this client"):
        for _ in range(bound):
            await c.challenge(client, RULE, 1000, "d", None)
            made += 1
    return made


async def test_every_challenge_is_new_even_for_a_client_holding_a_pending_one(store, tmp_path):
    """The Payment drafts: challenges MUST NOT be reused, a fresh invoice for every
    unauthenticated request. Asking again, before or after the first record is written,
    gets another invoice, payment hash, token and macaroon."""
    c, net = challenger(store, tmp_path)
    first = await c.challenge("1.2.3.4", RULE, 1000, "d", None)
    second = await c.challenge("1.2.3.4", RULE, 1000, "d", None)     # first not written yet
    await c.close()
    third = await c.challenge("1.2.3.4", RULE, 1000, "d", None)      # first two written
    records = (first, second, third)
    for field in ("payment_hash", "token_id", "bolt11", "macaroon"):
        assert len({getattr(r, field) for r in records}) == 3, field
    assert c.metrics.challenges[RULE.key] == 3
    assert [await c.node.has_invoice(r.payment_hash) for r in records] == [True] * 3   # three on the node


async def test_limits_refuse_before_any_invoice_is_made(store, tmp_path):
    c, net = challenger(store, tmp_path, max_pending=20, max_pending_per_client=2, per_client_per_minute=100)
    await c.challenge("a", RouteRule(path="/1", price_msat=1), 1, "d", None)
    await c.challenge("a", RouteRule(path="/2", price_msat=1), 1, "d", None)
    with pytest.raises(RateLimited, match="for this client"):
        await c.challenge("a", RouteRule(path="/3", price_msat=1), 1, "d", None)
    await c.close()                          # its records written: another process counts them
    c2, _ = challenger(store, tmp_path / "x", max_pending=2, per_client_per_minute=100)
    with pytest.raises(Overloaded):
        await c2.challenge("b", RULE, 1000, "d", None)
    c3, _ = challenger(store, tmp_path / "y", per_client_per_minute=1, max_pending=100)
    await c3.challenge("c", RouteRule(path="/p", price_msat=5), 5, "d", None)
    with pytest.raises(RateLimited, match="too many new invoices"):
        await c3.challenge("c", RouteRule(path="/q", price_msat=5), 5, "d", None)


async def test_a_settlement_marks_the_challenge_paid_and_keeps_a_receipt(store, tmp_path):
    c, net = challenger(store, tmp_path)
    rec = await c.challenge("a", RULE, 1000, "d", None)
    payer = net.add_node("payer", 10**9)
    await payer.pay(rec.bolt11)
    (s,) = [s async for s in _first(c.node.settlements(0))]
    await c.settled(s)
    await c.settled(s)                         # handed over twice after a crash: counted once
    assert (await c.l402.get_challenge(rec.payment_hash)).status == ChallengeStatus.PAID
    assert c.metrics.settlements == 1 and c.metrics.revenue_msat == 1000


async def test_a_settlement_writes_its_record_at_once_while_the_writer_keeps_busy(store, tmp_path):
    """A payment on a challenge whose record is still gathering writes that record and
    marks it paid straight away, whatever else is queued; the writer's own batch, which
    may hold the same record, then writes the rest without a conflict."""
    c, net = challenger(store, tmp_path, per_client_per_minute=1000)
    rec = await c.challenge("a", RULE, 1000, "d", None)
    others = [await c.challenge(f"b{i}", RULE, 1000, "d", None) for i in range(5)]
    payer = net.add_node("payer", 10**9)
    await payer.pay(rec.bolt11)
    (s,) = [s async for s in _first(c.node.settlements(0))]
    assert c.writer.holds(rec.payment_hash)
    await c.settled(s)
    assert not c.writer.holds(rec.payment_hash)
    assert all(c.writer.holds(o.payment_hash) for o in others)    # not waited for
    assert (await c.l402.get_challenge(rec.payment_hash)).status == ChallengeStatus.PAID
    await c.close()
    assert await c.l402.count_pending(1_800_000_000) == 5
    assert c.writer.unwritten("a") == 0 and all(c.writer.unwritten(f"b{i}") == 0 for i in range(5))


async def _first(it):
    async for s in it:
        yield s
        return


async def test_records_not_written_yet_count_against_the_client_and_are_written_at_close(store, tmp_path):
    c, _ = challenger(store, tmp_path, max_pending_per_client=3, per_client_per_minute=100)
    first = await c.challenge("a", RULE, 1000, "d", None)
    assert c.writer.holds(first.payment_hash)                        # not written yet ...
    await c.challenge("a", RULE, 1000, "d", None)                     # (a new one each time)
    await c.close()                                                   # two written,
    await c.challenge("a", RULE, 1000, "d", None)                     # one not yet:
    with pytest.raises(RateLimited, match="for this client"):          # all three counted
        await c.challenge("a", RULE, 1000, "d", None)
    await c.close()
    assert not c.writer.holds(first.payment_hash)
    assert (await c.l402.get_challenge(first.payment_hash)) == first
    assert await c.l402.count_pending_of("a", 1_800_000_000) == 3
    assert await c.l402.count_pending_of("b", 1_800_000_000) == 0


async def test_the_same_client_is_held_by_its_bucket_with_a_retry_after(store, tmp_path):
    """Without reuse, what bounds the invoices one client makes is its token bucket
    (per_client_per_minute): past it, RateLimited with the seconds to wait."""
    c, _ = challenger(store, tmp_path, per_client_per_minute=3, max_pending_per_client=50)
    made = [await c.challenge("a", RULE, 1000, "d", None) for _ in range(3)]
    with pytest.raises(RateLimited, match="too many new invoices") as refused:
        await c.challenge("a", RULE, 1000, "d", None)
    assert 1 <= refused.value.detail["retry_after_s"] <= 21
    assert len({r.payment_hash for r in made}) == 3
    await c.challenge("b", RULE, 1000, "d", None)                   # another client is not held


async def test_records_made_together_are_written_in_one_transaction(store, tmp_path):
    c, _ = challenger(store, tmp_path, per_client_per_minute=1000)
    real, batches = c.l402.add_challenges, []

    async def counting(records):
        batches.append(len(records))
        await real(records)
    c.l402.add_challenges = counting
    await asyncio.gather(*(c.challenge(f"client-{i}", RULE, 1000, "d", None) for i in range(50)))
    await c.close()
    assert sum(batches) == 50 and len(batches) < 10
    assert (await c.l402.count_pending(1_800_000_000)) == 50


async def test_a_402_reads_the_store_at_most_once_a_second_and_replicas_share_the_client_bound(store, tmp_path):
    """The unpaid counts per client and store-wide are one statement a second, not one
    per 402; what another replica made is counted from its next read on, so a client
    spreading its requests over two replicas still meets one bound."""
    now = [1_800_000_000.0]
    def make(sub):
        net = SandboxNetwork(clock=lambda: 1_800_000_000)
        tokens = TokenService(RootKeyRing.load_or_create(tmp_path / "keys.json"), "svc", lambda: 1_800_000_000)
        return Challenger(tokens=tokens, node=net.add_node(sub), l402=L402Repository(store),
                          limits=ChallengeLimits(max_pending_per_client=4, per_client_per_minute=100),
                          receipts=ReceiptSigner.load_or_create(tmp_path / "rk"), clock=lambda: now[0])
    first, second = make("a"), make("b")
    reads = []
    real = first.l402.pending_near_bound
    async def counting(t, at_least):
        reads.append(t)
        return await real(t, at_least)
    first.l402.pending_near_bound = counting
    for i in range(3):
        await first.challenge("c", RULE, 1000, "d", None)
        await first.challenge(f"other-{i}", RULE, 1000, "d", None)
    assert len(reads) == 1, "a 402 read the unpaid counts from the store"
    await first.close()                       # its three records for "c" are written
    now[0] += 1.5                             # the second replica reads after they are
    await second.challenge("c", RULE, 1000, "d", None)
    with pytest.raises(RateLimited, match="for this client"):
        await second.challenge("c", RULE, 1000, "d", None)
    await second.writer.flush()               # written a moment after its 402
    now[0] += 1.5
    with pytest.raises(RateLimited, match="for this client"):       # and the first sees the second's
        await first.challenge("c", RULE, 1000, "d", None)
    assert len(reads) == 2
    await second.close()


async def test_challenges_made_while_the_counts_are_read_are_counted(store, tmp_path):
    """The unpaid counts are read in the background of the 402s that arrive meanwhile:
    those 402s use the counts in hand, and what they made is counted after the read, so
    the count a client is held to is never below what it holds (it may be above for the
    second a record was written while the read ran: refusing early, never late)."""
    now = [1_800_000_000.0]
    c, _ = challenger(store, tmp_path, max_pending_per_client=50, per_client_per_minute=100)
    c.clock = c.pending.clock = lambda: now[0]
    made = [await c.challenge("c", RULE, 1000, "d", None)]          # the first read, then one made
    await c.close()
    gate = asyncio.Event()
    real = c.l402.pending_near_bound
    async def slow(t, at_least):
        await gate.wait()
        return await real(t, at_least)
    c.l402.pending_near_bound = slow
    now[0] += 1.5
    reading = asyncio.create_task(c.challenge("c", RULE, 1000, "d", None))     # starts the second read
    for _ in range(200):
        if c.pending._during is not None:
            break
        await asyncio.sleep(0.01)
    for _ in range(3):                                               # made while it runs
        made.append(await c.challenge("c", RULE, 1000, "d", None))
    assert c.pending.of("c") >= 4, "while the read ran, a client's challenges went uncounted"
    await asyncio.sleep(0.05)                                        # (their records may be written meanwhile)
    gate.set()
    made.append(await reading)
    held = await c.l402.count_pending_of("c", int(now[0])) + c.writer.unwritten("c")
    assert held == len(made) == 5
    assert held <= c.pending.of("c") <= held + 3, c.pending.of("c")
    await c.close()


def test_the_read_names_only_clients_a_bucket_cannot_bring_to_their_bound_unread():
    """With the defaults (50 unpaid per client, 30 new invoices a minute) a client must
    hold 18 to be named by the once-a-second read: below that, its bucket's burst and three
    seconds of refill (32) cannot take it to 50 before the next read names it. A bucket
    whose burst reaches the bound makes every client that holds one be read, as before."""
    assert read_floor(ChallengeLimits()) == 18
    assert read_floor(ChallengeLimits(max_pending_per_client=50, per_client_per_minute=60)) == 1
    assert read_floor(ChallengeLimits(max_pending_per_client=500, per_client_per_minute=60)) == 437
    # the share is also capped at a tenth of max_pending
    assert read_floor(ChallengeLimits(max_pending=100, max_pending_per_client=500, per_client_per_minute=6)) == 10 - 7


async def test_pending_near_bound_counts_everyone_and_names_the_clients_near_theirs(store, tmp_path):
    """One statement: the store-wide count of unpaid, unexpired challenges, and per client
    only those holding at least the floor. Paid and expired ones count for no one."""
    c, net = challenger(store, tmp_path, max_pending=100_000, max_pending_per_client=1000,
                        per_client_per_minute=10_000)
    made = [await c.challenge(f"10.0.{i // 256}.{i % 256}", RULE, 1000, "d", None) for i in range(300)]
    heavy = [await c.challenge("heavy", RULE, 1000, "d", None) for _ in range(20)]
    for _ in range(5):
        await c.challenge("edge", RULE, 1000, "d", None)
    await c.close()
    now = 1_800_000_000
    assert await c.l402.pending_near_bound(now, 5) == (325, {"heavy": 20, "edge": 5})
    assert await c.l402.pending_near_bound(now, 6) == (325, {"heavy": 20})
    assert await c.l402.pending_near_bound(now, 21) == (325, {})
    everyone = await c.l402.pending_near_bound(now, 1)
    assert everyone[0] == 325 and len(everyone[1]) == 302 and everyone[1] == await c.l402.pending_by_client(now)
    assert await c.l402.mark_paid(heavy[0].payment_hash, 1000, now)
    assert await c.l402.pending_near_bound(now, 20) == (324, {})        # a paid one is not pending
    assert await c.l402.pending_near_bound(made[0].expires_at, 1) == (0, {})   # nor an expired one
    assert await c.l402.pending_near_bound(now, 0) == await c.l402.pending_near_bound(now, 1)


async def test_a_client_the_read_does_not_name_is_never_counted_below_what_it_holds(store, tmp_path):
    """The defaults (floor 18). A client holding 17 is not named and is taken to hold 17;
    one holding 1 is taken to hold 17 too, and neither is refused while its bucket lets
    it ask: the bucket runs dry first (30 a minute), and by the time a client could hold
    50 the read names it with its exact count, so the 51st is refused, never the 50th or
    the 52nd."""
    now = [1_800_000_000.0]
    c, _ = challenger(store, tmp_path)
    on_fake_clock(c, now)
    assert c.pending.floor == 18
    for _ in range(17):
        await c.challenge("a", RULE, 1000, "d", None)
    await c.challenge("b", RULE, 1000, "d", None)
    await c.writer.flush()
    now[0] += 1.5
    await c.challenge("z", RULE, 1000, "d", None)          # the next read: a and b hold fewer than 18
    assert "a" not in c.pending._of and "b" not in c.pending._of
    assert c.pending.of("a") == 17 and c.pending.of("b") == 17 and c.pending.of("nobody") == 17
    held = {"a": 17}
    refused = []
    # a keeps to its bucket (13 left of its burst, then one each 2 s); reads come each 1.5 s
    for step in range(200):
        try:
            await c.challenge("a", RULE, 1000, "d", None)
            held["a"] += 1
        except RateLimited as err:
            refused.append((held["a"], str(err)))
            if "for this client" in str(err):
                break
        await c.writer.flush()
        assert c.pending.of("a") >= held["a"], "a client was counted below what it holds"
        now[0] += 1.5 if refused and "too many new invoices" in refused[-1][1] else 0.01
    assert held["a"] == 50 == await c.l402.count_pending_of("a", int(now[0]))
    assert refused[-1][0] == 50 and "for this client" in refused[-1][1]
    assert all("too many new invoices" in why for _, why in refused[:-1]), "refused early by the estimate"
    await c.close()


async def test_a_read_of_many_small_clients_brings_back_only_the_near_ones(store, tmp_path):
    """Thousands of clients holding one invoice each: the read keeps none of them in
    memory, and the store-wide bound still counts every one (503 at max_pending)."""
    now = [1_800_000_000.0]
    c, _ = challenger(store, tmp_path, max_pending=2000)
    c.clock = c.pending.clock = lambda: now[0]
    for i in range(1999):
        await c.challenge(f"10.1.{i // 256}.{i % 256}", RULE, 1000, "d", None)
    await c.close()
    now[0] += 1.5
    await c.challenge("last", RULE, 1000, "d", None)
    assert c.pending._of == {} and c.pending.total() == 2000
    with pytest.raises(Overloaded):
        await c.challenge("one-more", RULE, 1000, "d", None)
    await c.close()


async def test_a_fresh_client_spending_its_whole_burst_at_once_is_refused_at_its_bound(store, tmp_path):
    """The defaults, reads each second as the gate makes them. A client that held nothing
    at the last read spends its whole burst (30) in one go: taken to hold 17 + 30 = 47, it
    is not refused. After that its bucket gives one a 2 s, its records are in the store,
    and each read names it with what it holds, so the refusal comes at 50 exactly."""
    now = [1_800_000_000.0]
    c, _ = challenger(store, tmp_path)
    on_fake_clock(c, now)
    await c.challenge("z", RULE, 1000, "d", None)          # a read: v holds nothing
    held, why = 0, ""
    for _ in range(400):
        try:
            await c.challenge("v", RULE, 1000, "d", None)
            held += 1
        except RateLimited as err:
            why = str(err)
            if "for this client" in why:
                break
            now[0] += 1.0
        await c.writer.flush()
    assert held == 50 and "for this client" in why, (held, why)
    await c.close()


async def test_records_unwritten_when_a_read_starts_count_after_it(store, tmp_path):
    """A read cannot see records the writer still holds; they count after it. 'w' has 20
    written and 6 held by a stalled writer when the read runs: it is held to 26."""
    now = [1_800_000_000.0]
    c, _ = challenger(store, tmp_path, per_client_per_minute=1000)    # floor 1: every client read
    on_fake_clock(c, now)
    for _ in range(20):
        await c.challenge("w", RULE, 1000, "d", None)
    await c.writer.flush()
    release = stall_writes(c)
    for _ in range(6):
        await c.challenge("w", RULE, 1000, "d", None)
    now[0] += 1.5
    await c.challenge("z", RULE, 1000, "d", None)          # the read: w's last 6 not written
    assert c.pending.of("w") >= 26, c.pending.of("w")
    release()
    await c.close()
    assert await c.l402.count_pending_of("w", int(now[0])) == 26


async def test_a_client_dropped_from_the_counts_between_reads_is_never_counted_low(store, tmp_path, monkeypatch):
    """Between two reads this process counts what each client made, for at most
    MAX_UNWRITTEN clients: past that the oldest is dropped. What it had made must still
    count, or it could make its bound's worth again: every client is counted that much
    higher until the next read. Here the bound is 5 and 'busy' made 4 (its records held
    by a stalled writer) before 5 other clients pushed it out of a 5-client table."""
    from micropay.seller import challenger as module
    monkeypatch.setattr(module, "MAX_UNWRITTEN", 5)
    c, _ = challenger(store, tmp_path, max_pending_per_client=5, per_client_per_minute=1000)   # floor 1
    release = stall_writes(c)
    for _ in range(4):
        await c.challenge("busy", RULE, 1000, "d", None)
    for i in range(5):
        await c.challenge(f"other-{i}", RULE, 1000, "d", None)
    assert "busy" not in c.pending._made
    made = await made_until_refused(c, "busy", 4)
    assert made <= 5, f"busy made {made} against a bound of 5"
    release()
    await c.close()       # (the writer, bounded by the same constant, dropped records too)


async def test_a_client_dropped_while_a_read_runs_is_never_counted_low_after_it(store, tmp_path, monkeypatch):
    """The same while a read runs: what the read cannot see (made after it started, and
    not yet written) is kept for after it, for at most MAX_UNWRITTEN clients; a client
    dropped there still counts once the read's counts are in use."""
    from micropay.seller import challenger as module
    monkeypatch.setattr(module, "MAX_UNWRITTEN", 5)
    now = [1_800_000_000.0]
    c, _ = challenger(store, tmp_path, max_pending_per_client=5, per_client_per_minute=1000)   # floor 1
    on_fake_clock(c, now)
    await c.challenge("first", RULE, 1000, "d", None)        # the first read
    await c.writer.flush()
    release_writes, reads = stall_writes(c), asyncio.Event()
    real_read = c.l402.pending_near_bound
    async def stalled_read(t, at_least):
        result = await real_read(t, at_least)                 # the store as it is when the read starts
        await reads.wait()
        return result
    c.l402.pending_near_bound = stalled_read
    now[0] += 1.5
    reading = asyncio.create_task(c.challenge("z", RULE, 1000, "d", None))
    for _ in range(200):
        if c.pending._during is not None:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)                                 # the read has seen the store
    for _ in range(3):
        await c.challenge("busy", RULE, 1000, "d", None)
    for i in range(5):
        await c.challenge(f"other-{i}", RULE, 1000, "d", None)
    reads.set()
    await reading                                             # the read's counts are in use now
    assert c.pending._during is None and "busy" not in c.pending._made
    made = await made_until_refused(c, "busy", 3)
    assert made <= 5, f"busy made {made} against a bound of 5"
    release_writes()
    c.l402.pending_near_bound = real_read
    await c.close()


async def test_a_challenge_takes_only_its_own_rules_offer_at_its_price(store, tmp_path):
    """The token's caveats come from the Offer and the record's route and price from the
    arguments: an Offer of another rule, or of another price, is refused before any
    invoice is made."""
    from micropay.seller.offer import Offer
    c, _ = challenger(store, tmp_path)
    other = RouteRule(path="/b", price_msat=1000)
    offer = Offer(RULE, service="svc", method="GET", path="/a", price_msat=1000)
    for rule, price, given in ((RULE, 1000, Offer(other, service="svc", method="GET", path="/b", price_msat=1000)),
                               (RULE, 2000, offer)):
        with pytest.raises(ValueError, match="another rule's or another price's"):
            await c.challenge("c1", rule, price, "d", None, given)
    record = await c.challenge("c1", RULE, 1000, "d", None, offer)
    assert record.route_key == RULE.key and record.price_msat == 1000
    assert c.metrics.challenges[RULE.key] == 1            # the refused ones made nothing
