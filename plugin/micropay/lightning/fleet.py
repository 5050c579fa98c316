"""Fleet mode's receiving side for sidecars (issue 20): invoices come from the shared
store, never from a node. The sidecar holds no node rights and opens no connection to
any node: this adapter only reads and writes the store (store/fleet.py).

- `create_invoice` claims a pooled invoice of a node with a fresh heartbeat, bound to
  the caller's label (idempotent by label). A miss also tells the agents that this
  (amount, description) is wanted, so repeated prices get a pool. Without a pooled
  invoice (a new or dynamic price, an amountless invoice) it asks one live node's agent
  for an invoice on demand and waits, bounded by `ask_timeout_s`; then NoInvoiceInTime
  (503 with Retry-After), never a hang.
- The reserve: the gate's challenge labels (`micropay-<token id>`) are single-use and
  never looked up again, so their invoices come from a reserve this process claimed
  `reserve` at a time in one statement (each bound to `micropay-r<process tag>-<claim
  time>-<payment hash>`, which routes its settlement to the gate like any challenge
  label). A 402 then costs no store round trip; the reserve is topped up in the
  background when it runs half empty. A 402 that finds it empty while a top-up is under
  way waits for that one statement (bounded by REFILL_WAIT_S) rather than claiming
  alone, and the price's reserve doubles, up to RESERVE_GROWTH times `reserve`: a busy
  price gets batches that outlast the top-up's round trip. At hand-out an invoice whose
  node's heartbeat (as last read, at most a second ago) is stale, or that would not stay
  payable long enough, is skipped. A crash
  leaves the reserve's invoices bound and unhanded: they expire unpaid, nothing is owed;
  `close` gives them back to the pool.
- `settlements` follows the agents' settlement feed in order. Sequence numbers of
  PostgreSQL can become visible out of order (two agents committing at once): a gap is
  waited for up to `gap_grace_s` before it is taken to be a number never used, so a
  late settlement is not stepped over by a persisted cursor.

- Paying (session refunds, payouts) goes through the store's payment queue
  (fleet_payments.py); BOLT12 offers are not paid from it (`pays_offers` is False).
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import re
import time
from typing import Any, AsyncIterator, Callable

from ..core.errors import NoInvoiceInTime, PaymentFailed
from ..core.metrics import gauge_lines
from ..store.fleet import (ANSWERS_CHANNEL, ASKS_CHANNEL, PAID_CHANNEL, SETTLED_CHANNEL, FleetRepository,
                           NodeBeat, PooledInvoice, Want)
from .base import DecodedInvoice, Invoice, Liquidity, Payment, PaymentStatus, Settlement
from .bolt11codec import decode_invoice
from .fleet_payments import FleetPayments

log = logging.getLogger("micropay.fleet")

SINGLE_USE = re.compile(r"micropay-[0-9a-f]{64}")    # the gate's challenge labels (seller/challenger.py)
MAX_RESERVED_KEYS = 256      # prices with a reserve; the least recently used one goes back to the pool
MAX_REFILLS = 64             # top-ups running at once
RESERVE_GROWTH = 8           # a busy price's reserve grows to at most this many times `reserve`
REFILL_WAIT_S = 0.1          # a 402 that found the reserve empty waits this long for the top-up under way


# The nodes a reserved invoice may come from: the live ones by id, the least heartbeat (ms)
# that is still fresh, and the amount the node must be able to receive.
Receivers = tuple[dict[str, NodeBeat], int, int]


class FleetBackend:
    pays_offers = False

    def __init__(self, repo: FleetRepository, *, network: str = "regtest", heartbeat_timeout_s: float = 15.0,
                 claim_min_left_s: int = 60, pool_depth: int = 50, pool_expiry_s: int = 3600,
                 ask_timeout_s: float = 2.0, poll_s: float = 0.05, gap_grace_s: float = 2.0,
                 reserve: int = 32, clock: Callable[[], float] = time.time) -> None:
        self.repo = repo
        self.network = network
        self._other_network: set[str] = set()     # nodes said to be on another network (logged once)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.claim_min_left_s = claim_min_left_s
        self.pool_depth = pool_depth
        self.pool_expiry_s = pool_expiry_s
        self.ask_timeout_s = ask_timeout_s
        self.poll_s = poll_s
        self.gap_grace_s = gap_grace_s
        self.clock = clock
        self._wanted: dict[tuple[int, str], float] = {}       # (amount, description) -> last told
        self._misses: dict[tuple[int, str], int] = {}         # not wanted yet: misses so far
        self._turn = itertools.count()
        self._live: tuple[tuple[float, float], list[NodeBeat]] = ((0.0, 0.0), [])  # ((read at), live nodes), kept 1 s
        self._beats: tuple[list[NodeBeat], dict[str, NodeBeat]] = ([], {})  # a live list, its nodes by id
        self._answered = asyncio.Event()
        self._settled = asyncio.Event()
        self.payments = FleetPayments(repo, poll_s=poll_s, clock=clock)
        self._stops: list[Callable[[], Any]] = []
        self.reserve = reserve                 # invoices claimed at once per price (0: one per 402)
        self._reserve_prefix = f"micropay-r{os.urandom(4).hex()}-"
        self._reserved: collections.OrderedDict[tuple[int, str], collections.deque[PooledInvoice]] = \
            collections.OrderedDict()
        self._refills: dict[tuple[int, str], asyncio.Task[None]] = {}
        self._to_release: list[PooledInvoice] = []              # waiting for the give-back task
        self._releaser: asyncio.Task[None] | None = None       # the give-back task, if one runs
        self._dry_until: dict[tuple[int, str], float] = {}     # keys of _reserved whose last top-up found none
        self._size: dict[tuple[int, str], int] = {}            # a busy price's grown reserve (default: reserve)
        self._waiting: dict[tuple[int, str], int] = {}         # 402s waiting for a price's top-up
        self.reserve_waits = 0                                 # 402s that waited for a top-up (for tests, benchmarks)
        self._closed = False

    @property
    def cursor_namespace(self) -> str:
        return "fleet"

    async def start(self) -> None:
        """Listen for the agents' notifications (PostgreSQL); without them, polling."""
        self._stops.append(await self.repo.store.listen(ANSWERS_CHANNEL, self._answered.set))
        self._stops.append(await self.repo.store.listen(SETTLED_CHANNEL, self._settled.set))
        self._stops.append(await self.repo.store.listen(PAID_CHANNEL, self.payments.paid.set))

    async def close(self) -> None:
        self._closed = True                    # no 402 takes from the reserve any more
        for stop in self._stops:
            await stop()
        self._stops.clear()
        # let top-ups in flight finish (a batch claimed but not yet queued would be lost),
        # within a bound; then whatever the reserve holds goes back to the pool
        pending = [t for t in (*self._refills.values(), self._releaser) if t is not None and not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=5)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        unhanded = [p for q in self._reserved.values() for p in q] + self._to_release
        self._reserved.clear()
        self._to_release = []
        await self._release(unhanded)

    async def _release(self, invoices: list[PooledInvoice]) -> None:
        """Give reserved invoices nobody was handed back to the pool (an agent drops them
        there if they are about to expire); on failure they expire unpaid, nothing is owed."""
        if not invoices:
            return
        try:
            n = await self.repo.release([p.claim_label for p in invoices if p.claim_label])
            log.info("gave %d reserved invoices back to the pool", n)
        except Exception as exc:
            log.warning("could not give %d reserved invoices back to the pool (%s); they expire unpaid",
                        len(invoices), exc)

    def _release_soon(self, invoices: list[PooledInvoice]) -> None:
        """Give `invoices` back to the pool in the background: they join the list one
        task works through (whatever gathered while its last give-back ran, at once), so
        a burst of give-backs (a node gone stale, prices pushed out of the reserve) drops
        none and never runs more than one give-back at once. What is still waiting when
        the sidecar stops goes back in close()."""
        if not invoices:
            return
        self._to_release.extend(invoices)
        if (self._releaser is None or self._releaser.done()) and not self._closed:
            self._releaser = asyncio.get_running_loop().create_task(self._release_all(),
                                                                    name="micropay-fleet-release")

    async def _release_all(self) -> None:
        while self._to_release and not self._closed:
            batch, self._to_release = self._to_release, []
            await self._release(batch)

    async def node_id(self) -> str:
        return "fleet"

    # -- receiving -------------------------------------------------------------------
    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _fresh_since_ms(self) -> int:
        return self._now_ms() - int(self.heartbeat_timeout_s * 1000)

    async def create_invoice(self, amount_msat: int | None, label: str, description: str,
                             expiry_s: int, *, hash_description: bool = False) -> Invoice:
        if hash_description:   # never pooled (each LNURL-pay metadata or zap request is its own): asked for
            return _as_invoice(await self._ask(label, amount_msat, description, expiry_s, next(self._turn),
                                               hashed=True), label)
        now = self.clock()
        payable_after = int(now) + min(expiry_s, self.claim_min_left_s)
        reservable = self._reservable(amount_msat, label)
        if reservable and (amount_msat, description) in self._reserved:
            reserved = await self._from_reserve(amount_msat, description, payable_after)  # type: ignore[arg-type]
            if reserved is not None:
                return _as_invoice(reserved, label)
        turn = next(self._turn)                  # round robin: one step per invoice handed out
        if amount_msat is not None:
            pooled = await self.repo.claim(label, amount_msat, description, now_ms=self._now_ms(),
                                           payable_after=payable_after, fresh_since_ms=self._fresh_since_ms(),
                                           nodes=[n.node_id for n in await self._rotation(amount_msat, turn)])
            await self._tell_wanted(amount_msat, description, hit=pooled is not None)
            if pooled is not None:
                if reservable and (amount_msat, description) not in self._reserved:
                    # a price some pool holds: from now on its 402s come from a reserve
                    # (a one-off price never gets one, so no reserve is stranded on it)
                    await self._from_reserve(amount_msat, description, payable_after, take=False)
                return _as_invoice(pooled, label)
        return _as_invoice(await self._ask(label, amount_msat, description, expiry_s, turn), label)

    def ready_invoice(self, amount_msat: int | None, label: str, description: str,
                      expiry_s: int) -> Invoice | None:
        """What create_invoice would answer, when that needs no wait: a reserved invoice of
        this price, with the live nodes read less than a second ago. None: call
        create_invoice (it claims, asks, or waits for a top-up). Saves a 402 the
        coroutines of the store's path; the reserve is taken from the same way."""
        key = (amount_msat, description)
        if key not in self._reserved or not self._reservable(amount_msat, label):
            return None
        live = self._live_if_fresh()
        if live is None:
            return None
        payable_after = int(self.clock()) + min(expiry_s, self.claim_min_left_s)
        found = self._take_reserved(key, live, payable_after)[0]   # type: ignore[arg-type]
        return None if found is None else _as_invoice(found, label)

    def _reservable(self, amount_msat: int | None, label: str) -> bool:
        return (amount_msat is not None and self.reserve > 0 and not self._closed
                and SINGLE_USE.fullmatch(label) is not None)

    # -- the reserve ----------------------------------------------------------------------
    async def _from_reserve(self, amount_msat: int, description: str, payable_after: int,
                            take: bool = True) -> PooledInvoice | None:
        """The next reserved invoice for this price that its node can still settle, without
        waiting on the store (but for the live nodes, read at most once a second); None when
        the reserve has none (the caller claims one). Only a price this sidecar wants a pool
        for is reserved (a one-off price would strand a reserve). A reserve running low is
        topped up in the background; invoices skipped here (their node went stale, or they
        would not stay payable long enough) go back to the pool."""
        live = await self._live_nodes()
        if self._closed:
            return None
        key = (amount_msat, description)
        found, queue, receivers = self._take_reserved(key, live, payable_after, take)
        waits, deadline = 0, 0.0
        while found is None and take and not self._closed and waits < 3:
            # empty: a top-up (one statement, sized for the waiters too) brings more sooner
            # than a claim of our own would, and this price's next top-ups are larger
            refill = self._refills.get(key) or self._start_refill(key, payable_after)
            if refill is None:
                break
            if waits == 0:
                deadline = time.monotonic() + REFILL_WAIT_S
                self._size[key] = min(self._size.get(key, self.reserve) * 2, self.reserve * RESERVE_GROWTH)
                self.reserve_waits += 1
            left = deadline - time.monotonic()
            if left <= 0:
                break
            waits += 1
            self._waiting[key] = self._waiting.get(key, 0) + 1
            try:
                await asyncio.wait_for(asyncio.shield(refill), left)
            except Exception:                       # timed out or failed: the caller claims or asks instead
                break
            finally:
                left_waiting = self._waiting.get(key, 0) - 1
                if left_waiting > 0:
                    self._waiting[key] = left_waiting
                else:
                    self._waiting.pop(key, None)
            queue = self._reserved.get(key)
            if queue is None:
                break
            found = self._take_live(queue, receivers, payable_after)
        return found

    def _take_reserved(self, key: tuple[int, str], live: list[NodeBeat], payable_after: int, take: bool = True,
                       ) -> tuple[PooledInvoice | None, collections.deque[PooledInvoice], Receivers]:
        """Without waiting: the first invoice of `key`'s reserve (made if new) whose node is
        live and able to receive it (None if none, or if not `take`), the reserve, and what
        tells those nodes (for _take_live). A reserve at half its size or less is topped up
        in the background."""
        amount_msat = key[0]
        queue = self._reserved.get(key)
        if queue is None:
            queue = self._reserved[key] = collections.deque()
            while len(self._reserved) > MAX_RESERVED_KEYS:      # bounded: the least recently used price's go back
                old_key, old_queue = self._reserved.popitem(last=False)
                self._dry_until.pop(old_key, None)
                self._size.pop(old_key, None)
                self._waiting.pop(old_key, None)
                self._release_soon(list(old_queue))
        else:
            self._reserved.move_to_end(key)
        if self._beats[0] is not live:                       # a new read (once a second)
            self._beats = (live, {n.node_id: n for n in live})
        receivers = (self._beats[1], self._fresh_since_ms(), amount_msat)
        found = self._take_live(queue, receivers, payable_after) if take else None
        if len(queue) <= self._size.get(key, self.reserve) // 2:
            self._start_refill(key, payable_after)
        return found, queue, receivers

    def _start_refill(self, key: tuple[int, str], payable_after: int) -> asyncio.Task[None] | None:
        """Top up `key`'s reserve in the background (one at a time per price, MAX_REFILLS in
        all, none for a second after one found the pools dry); the task, or None."""
        if (key in self._refills or len(self._refills) >= MAX_REFILLS
                or self._dry_until.get(key, 0.0) > time.monotonic()):
            return self._refills.get(key)
        task = self._refills[key] = asyncio.get_running_loop().create_task(
            self._refill(key, payable_after), name="micropay-fleet-reserve")
        return task

    def _take_live(self, queue: collections.deque[PooledInvoice], receivers: Receivers,
                   payable_after: int) -> PooledInvoice | None:
        """The first invoice of `queue` whose node can receive it (`receivers`: the live
        nodes by id, the least heartbeat that is fresh, the amount) and that stays payable
        long enough; the ones skipped go back to the pool (never handed out from here)."""
        beats, fresh_since, amount_msat = receivers
        found, skipped = None, []
        while queue:
            p = queue.popleft()
            beat = beats.get(p.node_id)
            if (beat is not None and beat.heartbeat_ms >= fresh_since and beat.inbound_msat >= amount_msat
                    and p.expires_at > payable_after):
                found = p
                break
            skipped.append(p)
        if skipped:
            self._release_soon(skipped)
        return found

    async def _live_nodes(self) -> list[NodeBeat]:
        """The live nodes as read at most a second ago (by the monotonic clock and by
        `clock`, so a clock that jumps also rereads)."""
        live = self._live_if_fresh()
        if live is None:
            live = await self._read_live()
            self._live = ((time.monotonic(), self.clock()), live)
        return live

    async def _read_live(self) -> list[NodeBeat]:
        """The nodes whose heartbeat is fresh and whose agent reports this sidecar's
        network: a node on another network gets no claims or asks from here, nor counts in
        its liquidity (its invoices would name a chain the clients' wallets are not on).
        Said once per node. (The payment queue is not split by network: a store is meant
        for one network's fleet.)"""
        live = await self.repo.live_nodes(self._fresh_since_ms())
        if all(n.network == self.network for n in live):
            return live
        for n in live:
            if n.network != self.network and n.node_id not in self._other_network \
                    and len(self._other_network) < 1024:      # (past that many, no more is said)
                self._other_network.add(n.node_id)
                log.warning("node %s reports network %r, and this sidecar is on %r ([backend] network): it gets "
                            "no claims from this sidecar", n.node_id, n.network, self.network)
        return [n for n in live if n.network == self.network]

    def _live_if_fresh(self) -> list[NodeBeat] | None:
        """The live nodes if read less than a second ago, else None."""
        (mono, wall), live = self._live
        return live if 0 <= time.monotonic() - mono < 1.0 and 0 <= self.clock() - wall < 1.0 else None

    async def _refill(self, key: tuple[int, str], payable_after: int) -> None:
        """Claim up to `reserve` invoices for `key`, spread over the live nodes in turn;
        each node's batch joins the reserve as soon as it is claimed."""
        amount_msat, description = key
        try:
            nodes = await self._rotation(amount_msat, next(self._turn))
            want = (self._size.get(key, self.reserve) + self._waiting.get(key, 0)
                    - len(self._reserved.get(key, ())))
            claimed = 0
            for i, node in enumerate(nodes):
                n = want // len(nodes) + (i < want % len(nodes))
                if n <= 0:
                    continue
                now_ms = self._now_ms()
                # the claim time (fixed-width hex) before the payment hash: one batch's
                # labels sit side by side in the store's claim_label index, and later
                # batches after them, instead of each label on a random page of it
                batch = await self.repo.claim_many(
                    f"{self._reserve_prefix}{now_ms:012x}-", amount_msat, description, now_ms=now_ms,
                    payable_after=payable_after, fresh_since_ms=self._fresh_since_ms(), node=node.node_id, n=n)
                queue = self._reserved.get(key)
                if queue is None or self._closed:
                    # given up meanwhile: straight back to the pool, before this top-up ends
                    # (close waits for top-ups, not for releases they would start)
                    await self._release(batch)
                    continue
                # round robin: interleave with what the queue holds of the other nodes
                merged = [p for pair in itertools.zip_longest(queue, batch) for p in pair if p is not None]
                queue.clear()
                queue.extend(merged)
                claimed += len(batch)
            if claimed:
                await self._tell_wanted(amount_msat, description, hit=True)    # keeps the pool wanted
            elif key in self._reserved:
                # the pools are dry: no top-up for a second (each 402 claims or asks itself)
                self._dry_until[key] = time.monotonic() + 1.0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("topping up the invoice reserve failed (%s); 402s claim one at a time", exc)
        finally:
            self._refills.pop(key, None)

    async def _rotation(self, amount_msat: int | None, turn: int) -> list[NodeBeat]:
        """The live nodes that can receive `amount_msat`, starting with the next in turn
        (round robin). The list is read at most once a second; the claim statement itself
        checks each node's heartbeat again, so a node that just went stale gets nothing."""
        able = _able(await self._live_nodes(), amount_msat)
        if not able:
            return []
        start = turn % len(able)
        return able[start:] + able[:start]

    async def _tell_wanted(self, amount_msat: int, description: str, hit: bool) -> None:
        """Keep this pool wanted (at most once a minute per pool); with pool_depth 0 this
        sidecar wants no pools. A price is first wanted on its second miss: a one-off
        (a dynamic price, a path of its own in the description) gets its invoice on
        demand and costs the nodes no pool."""
        if self.pool_depth <= 0:
            return
        key = (amount_msat, description)
        if not hit and key not in self._wanted:
            misses = self._misses.pop(key, 0) + 1
            if misses < 2:
                self._misses[key] = misses
                if len(self._misses) > 10_000:      # bounded, oldest first
                    self._misses.pop(next(iter(self._misses)))
                return
        now = self.clock()
        if now - self._wanted.get(key, 0.0) < 60:
            return
        self._wanted[key] = now
        if len(self._wanted) > 10_000:          # bounded: dynamic prices may be many
            self._wanted.pop(next(iter(self._wanted)))
        await self.repo.want(Want(amount_msat, description, self.pool_depth, self.pool_expiry_s), self._now_ms())

    async def _ask(self, label: str, amount_msat: int | None, description: str, expiry_s: int,
                   turn: int, *, hashed: bool = False) -> PooledInvoice:
        found = await self.repo.by_claim(label)
        if found is not None:
            return found
        live = await self._read_live()
        if not live:
            raise NoInvoiceInTime("no Lightning node of the fleet is up (no fresh heartbeat)", retry_after_s=5)
        able = _able(live, amount_msat)
        if not able:
            raise NoInvoiceInTime(f"no live node of the fleet can receive {amount_msat} msat now "
                                  "(inbound liquidity)", retry_after_s=5)
        node = able[turn % len(able)]          # round robin over nodes that can receive it (read now, not cached)
        await self.repo.ask(label, node.node_id, amount_msat, description, expiry_s, self._now_ms(),
                            hash_description=hashed)
        await self.repo.store.notify(ASKS_CHANNEL)
        deadline = time.monotonic() + self.ask_timeout_s
        while True:
            found = await self.repo.by_claim(label)
            if found is not None:
                return found
            error = await self.repo.ask_error(label)
            if error is not None:
                raise NoInvoiceInTime(f"the node could not make the invoice: {error}", retry_after_s=1)
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoInvoiceInTime(f"no invoice from the fleet within {self.ask_timeout_s:g} s",
                                      retry_after_s=1)
            self._answered.clear()
            try:
                await asyncio.wait_for(self._answered.wait(), min(left, self.poll_s))
            except asyncio.TimeoutError:
                pass

    async def has_invoice(self, payment_hash: str) -> bool:
        return await self.repo.by_hash(payment_hash) is not None

    async def settlements(self, after_pay_index: int) -> AsyncIterator[Settlement]:
        cursor = after_pay_index
        gap_since: float | None = None
        while True:
            batch = await self.repo.settlements_after(cursor)
            progressed = False
            for s in batch:
                if s.seq != cursor + 1:
                    if gap_since is None:
                        gap_since = time.monotonic()
                    if time.monotonic() - gap_since < self.gap_grace_s:
                        break                                 # wait for the missing number
                    log.debug("settlement feed: numbers %d..%d never used", cursor + 1, s.seq - 1)
                gap_since = None
                cursor = s.seq
                progressed = True
                if s.claim_label is not None:
                    yield Settlement(s.seq, s.claim_label, s.payment_hash, s.amount_msat, s.preimage, s.paid_at)
            if progressed and len(batch) >= 500:
                continue
            self._settled.clear()
            try:
                await asyncio.wait_for(self._settled.wait(), self.poll_s if gap_since is None else
                                       min(self.poll_s, self.gap_grace_s / 4))
            except asyncio.TimeoutError:
                pass

    async def list_invoices(self, index: str, start: int, limit: int) -> list[dict[str, Any]]:
        return []

    async def decode(self, bolt11: str) -> DecodedInvoice:
        return decode_invoice(bolt11)

    # -- paying: through the queue, by the node agents (fleet_payments.py) ---------------------
    async def delete_invoice(self, label: str) -> bool:
        return False

    async def pay(self, bolt11: str, max_fee_msat: int | None = None, label: str | None = None,
                  retry_for_s: int | None = None, amount_msat: int | None = None, subject: str = "") -> Payment:
        return await self.payments.pay(bolt11, max_fee_msat, label, retry_for_s, amount_msat, subject)

    async def keysend(self, destination: str, amount_msat: int, *, label: str | None = None,
                      max_fee_msat: int | None = None, extratlvs: dict[str, str] | None = None,
                      retry_for_s: int | None = None, subject: str = "") -> Payment:
        return await self.payments.keysend(destination, amount_msat, label=label, max_fee_msat=max_fee_msat,
                                           extratlvs=extratlvs, retry_for_s=retry_for_s, subject=subject)

    async def fetch_invoice(self, offer: str, amount_msat: int) -> tuple[str, str]:
        raise PaymentFailed("fleet mode: offers are not paid through the payment queue")

    async def payment_status(self, payment_hash: str) -> PaymentStatus | None:
        return await self.payments.status_by_hash(payment_hash)

    async def sendpays_position(self) -> int:
        return 0

    async def lookup_payment(self, label: str, start: int) -> PaymentStatus | None:
        return await self.payments.status_by_label(label)

    async def htlc_in_flight(self, payment_hash: str) -> bool:
        return await self.payments.in_flight(payment_hash)

    async def liquidity(self) -> Liquidity:
        """The fleet's live nodes together, as their agents last reported."""
        live = await self._read_live()
        return Liquidity(sum(n.inbound_msat for n in live), sum(n.outbound_msat for n in live))

    async def metrics_text(self) -> str:
        """Fleet gauges for /metrics: per node its heartbeat age, liquidity and ready
        pooled invoices; the payment queue's size and oldest age by state; open asks and the
        oldest one's age."""
        now_ms = self._now_ms()
        st = await self.repo.stats(now_ms)
        lines = gauge_lines("micropay_fleet_heartbeat_age_seconds", "Seconds since the node's agent last beat.",
                            [({"node": n.node_id}, round((now_ms - n.heartbeat_ms) / 1000, 3)) for n in st.nodes])
        lines += gauge_lines("micropay_fleet_node_live", f"1 if the heartbeat is under {self.heartbeat_timeout_s:g} s "
                             "old and the node is on this sidecar's network (the node gets claims), else 0.",
                             [({"node": n.node_id}, int(n.heartbeat_ms >= self._fresh_since_ms()
                                                        and n.network == self.network)) for n in st.nodes])
        lines += gauge_lines("micropay_fleet_inbound_msat", "Inbound liquidity the agent last reported.",
                             [({"node": n.node_id}, n.inbound_msat) for n in st.nodes])
        lines += gauge_lines("micropay_fleet_outbound_msat", "Outbound liquidity the agent last reported.",
                             [({"node": n.node_id}, n.outbound_msat) for n in st.nodes])
        lines += gauge_lines("micropay_fleet_pool_ready", "Pooled invoices not claimed and not expired.",
                             [({"node": n.node_id}, st.ready.get(n.node_id, 0)) for n in st.nodes])
        states = ("queued", "leased", "sending")
        lines += gauge_lines("micropay_fleet_queue_payments", "Payments in the queue, by state.",
                             [({"state": s}, st.queue.get(s, (0, 0))[0]) for s in states])
        lines += gauge_lines("micropay_fleet_queue_oldest_age_seconds", "Age of the oldest payment in each state "
                             "(0 when none).", [({"state": s}, round((now_ms - st.queue[s][1]) / 1000, 3)
                                                  if s in st.queue else 0) for s in states])
        lines += gauge_lines("micropay_fleet_open_asks", "On-demand invoice asks not answered yet.",
                             [({}, st.open_asks)])
        lines += gauge_lines("micropay_fleet_oldest_ask_age_seconds", "Age of the oldest on-demand ask not answered "
                             "yet, of the last minute's (0 when none).",
                             [({}, 0 if st.oldest_ask_ms is None else round((now_ms - st.oldest_ask_ms) / 1000, 3))])
        return "\n".join(lines) + "\n"

    async def wait_until_ready(self, timeout_s: float) -> bool:
        return bool(await self._read_live())


def _able(live: list[NodeBeat], amount_msat: int | None) -> list[NodeBeat]:
    """The live nodes that reported the inbound liquidity to receive `amount_msat`."""
    return [n for n in live if amount_msat is None or n.inbound_msat >= amount_msat]


def _as_invoice(p: PooledInvoice, label: str) -> Invoice:
    return Invoice(p.bolt11, p.payment_hash, None if p.amount_msat < 0 else p.amount_msat, p.expires_at, label)
