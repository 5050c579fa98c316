"""Runs streams against a node (the Node port), persisting every step in the records the
node keeps (the RecordStore port: lightningd's datastore on Core Lightning).

Per payment: (1) the stream record, with the payment as `in_flight` (label, amount,
sequence, where to look in listsendpays), is written with generation compare-and-swap;
(2) the payment is sent (`xkeysend` with the bLIP-10 record, `fetchinvoice` + `xpay`
for an offer, or an LNURL-pay invoice + `xpay` for a Lightning Address) under that
label; (3) the outcome is written. After a restart an `in_flight` payment is reconciled from the node's record of the payment (listsendpays,
by its label) before anything new is paid:
by the rule every payer shares (lightning/outcome.py):
    complete -> counted;
    pending  -> waited for, unless no HTLC carries it for ORPHAN_GRACE_S: then it is dead
                and counted as failed (its sequence is never paid again; what it owed is
                paid under a new one);
    failed   -> counted as a failure;
    absent   -> it never left: retried under a new label, at once if lightningd itself
                started after it (no xpay of an earlier run can still be routing it), else
                after RECONCILE_GRACE_S (a new label is a new payment: this wait is the
                streams' own).
After start-up, payments wait (up to READY_TIMEOUT_S) for a usable channel.

One record per stream (not per payment) keeps the datastore small for long streams.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import os
import time
from typing import Any, Awaitable, Callable

from ..core.errors import BadRequest, NodeError, NotFound, PaymentFailed
from ..lightning.base import Node, RecordStore, StaleRecord
from ..lightning.outcome import ORPHAN_GRACE_S, OrphanWatch, Outcome
from ..core.params import MAX_MSAT, int_param, msat_param
from .schedule import STATES, Stream, parse_recipients

log = logging.getLogger("micropay.streams")
RETRY_FOR_S = 30                 # xkeysend/xpay retry window; also bounds reconcile waits
RECONCILE_GRACE_S = RETRY_FOR_S + 30
READY_TIMEOUT_S = 60             # after start-up, how long payments wait for a usable channel
SCHEDULE_SLACK_S = 0.05
Notify = Callable[[str, dict[str, Any]], None]
# (address, amount_msat, comment) -> (bolt11, payment_hash): an invoice for exactly that
# amount from a Lightning Address, checked; PaymentFailed (nothing paid) when there is none.
AddressInvoices = Callable[[str, int, "str | None"], Awaitable[tuple[str, str]]]


class StreamRunner:
    def __init__(self, node: Node, datastore: RecordStore, *, clock: Callable[[], float] = time.time,
                 notify: Notify | None = None, min_interval_s: Callable[[], int] = lambda: 1,
                 max_total_limit_msat: Callable[[], int | None] = lambda: None,
                 node_started_at: float | None = None, ready_timeout_s: float = READY_TIMEOUT_S,
                 address_invoices: AddressInvoices | None = None) -> None:
        """The limits are callables, read on each use, since their plugin options are dynamic.
        `node_started_at`: when lightningd started, if this run began with it.
        `address_invoices`: fetches the invoice of a payment to a Lightning Address
        (creators.lnurl_client.AddressPayer.invoice); without it such streams are refused."""
        self.node, self.ds, self.clock = node, datastore, clock
        self.address_invoices = address_invoices
        self.node_started_at, self.ready_timeout_s = node_started_at, ready_timeout_s
        self._outcomes = OrphanWatch(node, grace_s=ORPHAN_GRACE_S)
        self.notify = notify or (lambda topic, payload: None)
        self.min_interval_s, self.max_total_limit_msat = min_interval_s, max_total_limit_msat
        self.streams: dict[str, Stream] = {}
        self._gen: dict[str, int] = {}
        self._saving: dict[str, asyncio.Lock] = {}
        self._heap: list[tuple[float, str]] = []
        self._wake_fut: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        await self.load()
        self._task = asyncio.create_task(self._run(), name="micropay-streams")

    async def load(self) -> None:
        """Read every stream from the datastore (at start-up)."""
        for key, doc, gen in await self.ds.list(("stream",)):
            s = Stream.from_json(doc)
            self.streams[s.id], self._gen[s.id] = s, gen
            self._schedule(s)
        log.info("loaded %d streams", len(self.streams))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    # -- RPC-facing operations -----------------------------------------------------
    async def create(self, destination: Any, amount_msat: Any, interval_s: Any, max_total_msat: Any,
                     max_fee_msat: Any = None, splits: Any = None, metadata: Any = None,
                     label: Any = None) -> dict[str, Any]:
        recipients = parse_recipients(destination, splits)
        own = await self.node.node_id()
        if any(r.destination == own for r in recipients):
            raise BadRequest("a stream cannot pay this node itself")
        if self.address_invoices is None and any(r.kind == "address" for r in recipients):
            raise BadRequest("this node cannot pay Lightning Addresses (no LNURL-pay client is wired in)")
        amount = msat_param(amount_msat, "amount_msat")
        interval = int_param(interval_s, "interval_s", self.min_interval_s(), 365 * 86400)
        if max_total_msat is None:
            raise BadRequest("max_total_msat is required: every stream has a hard budget")
        cap = msat_param(max_total_msat, "max_total_msat")
        limit = self.max_total_limit_msat()
        if limit is not None and cap > limit:
            raise BadRequest(f"max_total_msat must be at most {limit} on this node "
                             "(option micropay-stream-max-total-msat)")
        fee = 1000 + amount // 100 if max_fee_msat is None else int_param(max_fee_msat, "max_fee_msat", 0, MAX_MSAT)
        if cap < amount + fee:
            raise BadRequest("max_total_msat must cover at least one interval's amount plus max_fee_msat")
        meta = {} if metadata is None else metadata
        if not isinstance(meta, dict):
            raise BadRequest("metadata must be a JSON object")
        if label is not None and (not isinstance(label, str) or len(label) > 200):
            raise BadRequest("label must be a string of at most 200 characters")
        if label and any(s.label == label for s in self.streams.values()):
            existing = next(s for s in self.streams.values() if s.label == label)
            return existing.status(self.clock())       # same label: the same stream
        s = Stream.create(os.urandom(16).hex(), recipients, amount, interval, cap, fee, self.clock(),
                          label or "", meta)
        self._gen[s.id] = await self.ds.create(("stream", s.id), s.to_json())
        self.streams[s.id] = s
        self._state_changed(s)
        self._schedule(s)
        return s.status(self.clock())

    async def list(self, state: Any = None, label_prefix: Any = None) -> dict[str, Any]:
        if state is not None and state not in STATES:
            raise BadRequest(f"state must be one of {', '.join(STATES)}")
        if label_prefix is not None and not isinstance(label_prefix, str):
            raise BadRequest("label_prefix must be a string")
        now = self.clock()
        return {"streams": [s.status(now) for s in self.streams.values()
                            if (state is None or s.state == state)
                            and (label_prefix is None or s.label.startswith(label_prefix))]}

    async def status(self, stream_id: Any = None, label: Any = None) -> dict[str, Any]:
        return self.get(stream_id, label).status(self.clock())

    def get(self, stream_id: Any = None, label: Any = None) -> Stream:
        """A stream by its id, or by its label (so a rune can limit a caller to the
        streams whose labels it chose: pnamelabel^<prefix>)."""
        if (stream_id is None) == (label is None):
            raise BadRequest("give a stream's id or its label, not both")
        if label is not None:
            found = next((s for s in self.streams.values() if isinstance(label, str) and label and s.label == label),
                         None)
            if found is None:
                raise NotFound("no stream has that label")
            return found
        if not isinstance(stream_id, str):
            raise BadRequest("id must be a stream id (a string)")
        if stream_id not in self.streams:
            raise NotFound("no stream with that id")
        return self.streams[stream_id]

    async def change(self, stream_id: Any, action: str, label: Any = None) -> dict[str, Any]:
        s = self.get(stream_id, label)
        now = self.clock()
        {"pause": lambda: s.pause("paused by request"), "resume": lambda: s.resume(now),
         "stop": s.stop}[action]()
        await self._save(s)
        self._state_changed(s)
        self._schedule(s)
        return s.status(now)

    # -- the loop --------------------------------------------------------------------
    def _schedule(self, s: Stream) -> None:
        t = s.wake_at()
        if s.in_flight is not None:
            t = self.clock()
        if t is not None:
            earliest = self._heap[0][0] if self._heap else None
            heapq.heappush(self._heap, (t, s.id))
            if (earliest is None or t < earliest) and self._wake_fut is not None:
                _resolve(self._wake_fut)

    async def _run(self) -> None:
        if not await self.node.wait_until_ready(self.ready_timeout_s):
            log.warning("no usable channel after %.0fs; streams go on regardless", self.ready_timeout_s)
        while True:
            now = self.clock()
            while self._heap and self._heap[0][0] <= now:
                _, sid = heapq.heappop(self._heap)
                s = self.streams.get(sid)
                if s is None:
                    continue
                try:
                    await self._step(s)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:   # keep the other streams going
                    log.error("stream %s: %s", sid, exc)
                    heapq.heappush(self._heap, (self.clock() + 5, sid))
                now = self.clock()
            # Sleep until the earliest due stream, plus a little slack so that streams due
            # close together are handled in one wake-up (payments may be up to
            # SCHEDULE_SLACK_S late, never early).
            delay = (self._heap[0][0] - now + SCHEDULE_SLACK_S) if self._heap else 3600.0
            await self._sleep(max(0.0, delay))

    async def _sleep(self, delay: float) -> None:
        """Sleep `delay` seconds or until _schedule() wakes us (cheaper than wait_for)."""
        loop = asyncio.get_running_loop()
        self._wake_fut = fut = loop.create_future()
        timer = loop.call_later(delay, _resolve, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._wake_fut = None

    async def _step(self, s: Stream) -> None:
        if s.in_flight is not None and not await self._reconcile(s):
            heapq.heappush(self._heap, (self.clock() + 2, s.id))   # still pending: look again soon
            return
        dirty = bool(s.accrue(self.clock()))
        sendpays_start = None
        while (plan := s.next_payment(self.clock())) is not None:
            if sendpays_start is None:    # one look-up per batch: a lower start only widens the search
                sendpays_start = await self.node.sendpays_position()
            # Saving the new in-flight payment also saves the previous payment's outcome.
            dirty = await self._pay(s, *plan, sendpays_start=sendpays_start)
        if dirty or s.state != "active":
            await self._save(s)
        if s.state != "active":
            self._state_changed(s)
        self._schedule(s)

    async def _pay(self, s: Stream, recipient: int, amount: int, sendpays_start: int) -> bool:
        """Pay one piece. Returns True when the outcome still has to be saved (it is
        saved together with the next payment's record, or at the end of the batch)."""
        flight = s.begin(recipient, amount, self.clock(), sendpays_start)
        await self._save(s)                       # persisted before it is paid
        r = s.recipients[recipient]
        try:
            if r.kind == "node":
                p = await self.node.keysend(r.destination, amount, label=flight.label,
                                            max_fee_msat=s.max_fee_msat, extratlvs=s.tlv_record(),
                                            retry_for_s=RETRY_FOR_S)
            else:
                if r.kind == "offer":
                    invoice, _ = await self.node.fetch_invoice(r.destination, amount)
                else:
                    invoice = await self._address_invoice(r.destination, amount, s.address_comment())
                p = await self.node.pay(invoice, max_fee_msat=s.max_fee_msat, label=flight.label,
                                        retry_for_s=RETRY_FOR_S)
        except PaymentFailed as exc:
            # lightningd's own verdict. Anything else (the connection to it dropped) leaves
            # the payment in flight, to be settled from lightningd's record.
            s.failed(exc.message, isinstance(exc, PaymentFailed) and exc.no_liquidity, self.clock())
            log.info("stream %s seq %d to %s failed: %s", s.id, flight.seq, r.destination[:16], exc.message)
            self._payment_event(s, flight, "failed", 0, exc.message)
            return True
        s.succeeded(p.fee_msat, self.clock())
        self._payment_event(s, flight, "complete", p.fee_msat, None)
        return True

    async def _address_invoice(self, address: str, amount: int, comment: str) -> str:
        """The invoice of a payment to a Lightning Address. Nothing is paid yet, so any
        failure to get one is a failed payment (PaymentFailed), never one left in flight."""
        if self.address_invoices is None:
            raise PaymentFailed(f"lightning address {address}: this node has no LNURL-pay client wired in")
        try:
            invoice, _ = await self.address_invoices(address, amount, comment)
        except PaymentFailed:
            raise
        except Exception as exc:      # a bug of the fetcher: still nothing was paid
            log.exception("lightning address %s: fetching an invoice failed", address)
            raise PaymentFailed(f"lightning address {address}: {type(exc).__name__}: {exc}") from exc
        return invoice

    async def _reconcile(self, s: Stream) -> bool:
        """Settle an in-flight payment from an earlier run. False while it is pending."""
        f = s.in_flight
        assert f is not None
        now = self.clock()
        settled = await self._outcomes.settle(label=f.label, sendpays_start=f.sendpays_start, now=now)
        if settled.outcome is Outcome.SUCCEEDED:
            fee = settled.payment.fee_msat if settled.payment is not None else 0
            log.info("stream %s seq %d: found complete after restart; not paying again", s.id, f.seq)
            s.succeeded(fee, now)
            self._payment_event(s, f, "complete", fee, None)
        elif settled.outcome is Outcome.IN_FLIGHT:
            return False
        elif settled.orphaned:
            log.warning("stream %s seq %d: %s; counted as failed, not paid again", s.id, f.seq, settled.detail)
            s.failed(settled.detail, False, now)
            self._payment_event(s, f, "failed", 0, settled.detail)
        elif settled.outcome is Outcome.FAILED:
            s.failed("failed (found after restart)", False, now)
            self._payment_event(s, f, "failed", 0, "failed before restart")
        elif (self.node_started_at is None or f.started_at >= self.node_started_at) \
                and now - f.started_at < RECONCILE_GRACE_S:
            return False          # an xpay of this node may still be routing it; wait before concluding
        else:
            log.info("stream %s seq %d never left; paying what it owed under a new label", s.id, f.seq)
            s.abandon()
        await self._save(s)
        return True

    async def _save(self, s: Stream) -> None:
        """Write the stream's record. This process's writes of one stream go one at a time:
        an RPC (stop, pause) and the payment loop both change the same in-memory stream,
        and two writes from the same generation would make one of them stale (seen on
        regtest: a stop refused while the loop was recording a payment). The later write
        carries both changes. StaleRecord then means another process wrote it."""
        async with self._saving.setdefault(s.id, asyncio.Lock()):
            try:
                self._gen[s.id] = await self.ds.replace(("stream", s.id), s.to_json(), self._gen[s.id])
            except StaleRecord:
                raise NodeError(f"stream {s.id} was changed by someone else; refusing to overwrite") from None

    def _payment_event(self, s: Stream, f, status: str, fee: int, error: str | None) -> None:
        self.notify("streampay_payment", {
            "stream_id": s.id, "seq": f.seq, "destination": s.recipients[f.recipient].destination,
            "amount_msat": f.amount_msat, "fee_msat": fee, "status": status, "error": error,
            "paid_msat": s.paid_msat, "fees_msat": s.fees_msat})

    def _state_changed(self, s: Stream) -> None:
        log.info("stream %s is %s%s", s.id, s.state, f": {s.reason}" if s.reason else "")
        self.notify("streampay_state", {"stream_id": s.id, "state": s.state, "reason": s.reason})


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


__all__ = ["AddressInvoices", "StreamRunner"]
