"""The L402 challenge as a service, with no HTTP in it: price -> admission -> invoice ->
token -> record, and what happens when such an invoice is paid.

Every challenge is new: a fresh invoice and token each time, never one handed out before
(the Payment drafts: challenges "MUST NOT be cached or reused", a fresh invoice for every
unauthenticated request; bLIP-26: a new credential for each challenge). What keeps the
node's invoice count finite is admission: a new challenge costs a token of the client's
bucket (per_client_per_minute), and is refused past the per-client and store-wide bounds
of unpaid challenges (client_share, max_pending), with 429 / 503 and Retry-After.

What a 402 costs (bench/bench_challenge.py): no store statement. The unpaid challenges
per client and store-wide are read in one statement at most once a second, and this
process's new challenges are added to them (PendingCounts); the record of a new challenge
is written after the 402 has gone out, by a writer that puts all records made meanwhile
in one transaction (RecordWriter). Until it is written, this process counts it. A crash
in those milliseconds loses the record, which is harmless: the token needs no record to
be verified or to spend its credits, so a payment made on it still buys what it says;
only the sidecar's own note of that payment (the "payment" receipt, the revenue counter)
is missing.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Callable

from .config import ChallengeLimits
from ..core.errors import NodeError, Overloaded, RateLimited
from ..lightning.base import Invoice, Node, Settlement
from ..core.metrics import Metrics
from .offer import Offer
from .pricing import RouteRule
from ..core.ratelimit import TokenBucket
from ..core.receipts import ReceiptSigner
from ..store.l402 import ChallengeRecord, L402Repository
from ..core.tasks import Backoff
from ..l402.tokens import TokenService, new_token_id

log = logging.getLogger("micropay.gate")
LABEL_PREFIX = "micropay-"     # invoice labels: micropay-<token id hex>
PENDING_COUNT_MAX_AGE_S = 1.0
MAX_UNWRITTEN = 100_000        # records the writer holds while the store is away; older ones are dropped
# How long the writer, starting after an idle spell, lets records gather before its first
# batch (later batches take what arrived during the one before): a busy gate then commits
# a few dozen at a time rather than a few (on SQLite a commit, with its transaction
# set-up, costs about as much as a row). Nothing waits on it: the 402s have gone out, a
# payment on one of them writes its record at once (Challenger.settled), and until
# written they count against their clients (PendingCounts).
RECORD_GATHER_S = 0.005


class PendingCounts:
    """Unpaid challenges, per client and store-wide, read in one statement at most once a
    second, plus what this process made since: the records it had not written when the
    read was asked for, and every challenge it made after. A 402 then costs no store
    read. What other replicas made since the read is seen at the next one (a second
    later), as for the store-wide count before. Within one process nothing is missed: the
    counts in use are swapped only once a read has come back, and a record written while
    the read runs is counted twice for that second (refusing early, never late).

    The read brings back only the clients that hold at least `floor` unpaid challenges;
    every other client is taken to hold `floor - 1`, which is never less than it holds.
    What comes back is then the clients near their bound (at most max_pending / floor),
    not every client that holds an invoice: with max_pending raised into the hundreds of
    thousands, keeping every one of them each second took a tenth of the loop and more.
    `floor` 1 reads every client."""

    def __init__(self, l402: L402Repository, writer: "RecordWriter", clock: Callable[[], float],
                 floor: int = 1) -> None:
        self.l402, self.writer, self.clock = l402, writer, clock
        self.floor = max(1, floor)
        self._absent = self.floor - 1               # what a client the read did not name holds, at most
        self._read_at = float("-inf")
        self._of: dict[str, int] = {}                # per client, as read (those holding >= floor)
        self._total = 0
        self._made: dict[str, int] = {}              # per client: unwritten at the read + made since
        self._made_total = 0
        self._during: dict[str, int] | None = None   # made while a read runs
        # What clients dropped from _made (or _during) had made, summed: past MAX_UNWRITTEN
        # clients between two reads the oldest is dropped, and every client is then counted
        # that much higher until the next read, so none is ever counted low (a client
        # dropped twice lost no more than the sum). Only a process that answers over
        # MAX_UNWRITTEN new clients between two reads drops any.
        self._lost = self._lost_during = 0

    def due(self) -> bool:
        """Whether refresh would read: the last read is a second old (or the clock went
        back), and none is under way."""
        return not 0 <= self.clock() - self._read_at < PENDING_COUNT_MAX_AGE_S and self._during is None

    async def refresh(self) -> None:
        """Read again if due (see `due`). One read at a time: a 402 arriving meanwhile uses
        the counts in hand; a read that fails raises, and the next 402 tries again."""
        if not self.due():
            return
        now = self.clock()
        pre = {client: len(records) for client, records in self.writer.unwritten_by_client().items()}
        self._during, self._lost_during = {}, 0
        try:
            total, of = await self.l402.pending_near_bound(int(now), self.floor)
            during = self._during
        finally:
            self._during = None
        for client, n in during.items():
            pre[client] = pre.get(client, 0) + n
        self._of, self._total = of, total
        self._made, self._made_total = pre, sum(pre.values())
        self._lost = self._lost_during
        self._read_at = now

    def total(self) -> int:
        return self._total + self._made_total

    def of(self, client: str) -> int:
        """Never less than what the client holds; more by up to `floor - 1` for a client
        the last read did not name (and by what a dropped client had made, see _lost)."""
        return self._of.get(client, self._absent) + self._made.get(client, 0) + self._lost

    def added(self, client: str) -> None:
        for counts in (self._made, self._during):
            if counts is not None:
                counts[client] = counts.get(client, 0) + 1
                if len(counts) > MAX_UNWRITTEN:      # bounded like the writer; the next read resets it
                    lost = counts.pop(next(iter(counts)))
                    if counts is self._made:
                        self._lost += lost
                    else:
                        self._lost_during += lost
        self._made_total += 1


def read_floor(limits: ChallengeLimits) -> int:
    """The least count a client must hold to be named by the once-a-second read
    (PendingCounts): its bound less what its bucket lets it make between two reads, with
    room to spare (the bucket's burst and three seconds of refill). A client the read does
    not name is taken to hold one less than this. While the store keeps up (reads come
    back, and records are written, within a few seconds), a client that keeps to its
    bucket is then never refused by that estimate: it reaches its bound only after a read
    has named it with its count. When the store falls behind, the estimate can refuse a
    client before its bound (never after it): a slow store makes fewer invoices, not more.
    1 (every client read) when the bucket's burst is as large as the bound."""
    burst = limits.per_client_per_minute + math.ceil(limits.per_client_per_minute / 60 * 3 * PENDING_COUNT_MAX_AGE_S)
    return max(1, limits.client_share - burst)


class RecordWriter:
    """Writes new challenge records soon after their 402: all made meanwhile in one
    transaction. Records not yet written are counted per client by `unwritten`."""

    def __init__(self, l402: L402Repository) -> None:
        self.l402 = l402
        self._queue: dict[str, ChallengeRecord] = {}              # by payment hash, in order
        self._by_client: dict[str, list[ChallengeRecord]] = {}
        self._task: asyncio.Task[None] | None = None
        self._writing: asyncio.Future[None] | None = None          # the writer's batch under way

    def put(self, record: ChallengeRecord) -> None:
        if len(self._queue) >= MAX_UNWRITTEN:
            oldest = next(iter(self._queue.values()))
            log.warning("the store has not taken challenge records for a while; dropping %s", oldest.payment_hash)
            self._forget([oldest])
        self._queue[record.payment_hash] = record
        self._by_client.setdefault(record.client_key, []).append(record)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="micropay-challenge-records")

    def unwritten(self, client_key: str) -> int:
        """How many of this client's records are not written yet."""
        return len(self._by_client.get(client_key, ()))

    def unwritten_by_client(self) -> dict[str, list[ChallengeRecord]]:
        return self._by_client

    def holds(self, payment_hash: str) -> bool:
        return payment_hash in self._queue

    async def write_now(self, payment_hash: str) -> None:
        """Write this one record at once, if it is still queued: a settlement does not wait
        behind the records of the 402s that keep coming. The writer may be writing it at
        the same moment; the insert is idempotent."""
        record = self._queue.get(payment_hash)
        if record is not None:
            await self.l402.add_challenges([record])
            self._forget([record])

    async def flush(self) -> None:
        """Write everything queued now: without waiting for the writer's gathering pause,
        only for a batch it is writing. Raises if the store does."""
        while self._queue:
            await self._write_batch()

    async def close(self) -> None:
        """Write everything queued, and stop the writer until the next record."""
        await self.flush()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def _drain(self) -> None:
        backoff = Backoff(first_s=0.1, max_s=5.0)
        await asyncio.sleep(RECORD_GATHER_S)   # let the 402s answered meanwhile join this batch
        while self._queue:
            try:
                await self._write_batch()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:          # the store is away: keep them, try again
                wait = backoff.next()
                log.warning("writing challenge records failed (%s); retrying in %.1fs", exc, wait)
                await asyncio.sleep(wait)

    async def _write_batch(self) -> None:
        """Write what is queued, one batch at a time (flush and the writer's task both
        call this: whoever comes second waits for the batch under way, then writes what
        is left)."""
        while self._writing is not None:
            await asyncio.shield(self._writing)
        if not self._queue:
            return
        self._writing = writing = asyncio.get_running_loop().create_future()
        try:
            batch = list(self._queue.values())
            await self.l402.add_challenges(batch)
            self._forget(batch)
        finally:
            self._writing = None
            writing.set_result(None)

    def _forget(self, records: list[ChallengeRecord]) -> None:
        for r in records:
            if self._queue.pop(r.payment_hash, None) is None:
                continue                      # written meanwhile by write_now
            mine = self._by_client.get(r.client_key)
            if mine is not None:
                mine.remove(r)
                if not mine:
                    del self._by_client[r.client_key]


class Challenger:
    def __init__(self, *, tokens: TokenService, node: Node, l402: L402Repository, limits: ChallengeLimits,
                 receipts: ReceiptSigner, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.tokens, self.node, self.l402, self.limits = tokens, node, l402, limits
        self.receipts, self.clock = receipts, clock
        self.service = tokens.service
        self.metrics = metrics or Metrics()
        self.bucket = TokenBucket(limits.per_client_per_minute)
        self.writer = RecordWriter(l402)
        self.pending = PendingCounts(l402, self.writer, clock, read_floor(limits))
        self._client_share = limits.client_share
        # A node that can hand out an invoice without waiting (the fleet's reserve) says so
        # by having ready_invoice (looked up once: a node wrapped later is not asked).
        self._ready_invoice: Callable[..., Invoice | None] | None = getattr(node, "ready_invoice", None)

    async def challenge(self, client: str, rule: RouteRule, price_msat: int, description: str,
                        query: str | None, offer: Offer | None = None) -> ChallengeRecord:
        """A new unpaid challenge for `client` to buy `rule` at `price_msat`: a new invoice
        and token, never one handed out before. Raises RateLimited, Overloaded, NodeError.
        `offer`: the route's Offer at this price, whose caveats the token gets (else
        rule.caveats for `query`); it must be `rule`'s, at `price_msat`."""
        if offer is not None and (offer.rule is not rule or offer.price_msat != price_msat):
            raise ValueError("the Offer given is another rule's or another price's")
        now = int(self.clock())
        wait = self.bucket.take(client)
        if wait:
            raise RateLimited("too many new invoices requested; pay or wait", retry_after_s=int(wait) + 1)
        if self.pending.due():
            await self.pending.refresh()
        if self.pending.total() >= self.limits.max_pending:
            raise Overloaded("too many unpaid invoices outstanding; try again later", retry_after_s=30)
        if self.pending.of(client) >= self._client_share:
            raise RateLimited("too many unpaid invoices for this client", retry_after_s=60)
        token_id = new_token_id()
        label = f"{LABEL_PREFIX}{token_id.hex()}"
        try:
            invoice = None if self._ready_invoice is None else \
                self._ready_invoice(price_msat, label, description, self.limits.expiry_s)
            if invoice is None:
                invoice = await self.node.create_invoice(price_msat, label=label, description=description,
                                                         expiry_s=self.limits.expiry_s)
        except NodeError as exc:
            log.error("creating an invoice failed: %s", exc)
            raise
        caveats = tuple(map(str.encode, rule.caveats(self.service, now, query))) if offer is None \
            else offer.caveats_at(now)
        macaroon = self.tokens.mint_serialized(bytes.fromhex(invoice.payment_hash), caveats, token_id)
        record = ChallengeRecord(invoice.payment_hash, token_id.hex(), rule.key, client, price_msat,
                                 invoice.bolt11, macaroon, now, invoice.expires_at, rule.credits)
        self.writer.put(record)          # written after the 402 has gone out (see above)
        self.pending.added(client)
        self.metrics.challenges[rule.key] += 1
        return record

    async def settled(self, s: Settlement) -> None:
        """One of our invoices was paid: the challenge is marked paid and a payment receipt
        kept. Each step is idempotent: a crash between them only repeats work."""
        await self.writer.write_now(s.payment_hash)
        record = await self.l402.get_challenge(s.payment_hash)
        if await self.l402.mark_paid(s.payment_hash, s.amount_msat, s.paid_at):
            self.metrics.record_settlement(s.amount_msat)
            log.info("paid: %s msat for %s (payment_hash %s)", s.amount_msat,
                     record.route_key if record else "?", s.payment_hash)
        if record is not None:
            receipt = self.receipts.sign({
                "v": 1, "type": "payment", "service": self.service, "payment_hash": s.payment_hash,
                "token_id": record.token_id, "route": record.route_key, "amount_msat": s.amount_msat,
                "paid_at": s.paid_at})
            await self.l402.add_receipt(s.payment_hash, receipt, s.paid_at)

    async def close(self) -> None:
        """At shutdown: the records not written yet are written now."""
        await self.writer.close()

    async def purge_expired(self) -> None:
        n = await self.l402.purge_expired(int(self.clock()) - 60)
        if n:
            log.info("purged %d expired unpaid challenges", n)
