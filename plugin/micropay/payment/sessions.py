"""Payment sessions (draft-lightning-session) as a service, with no HTTP in it: open on a
paid deposit, spend per unit, top up, close with a refund of the unspent balance to the
client's return invoice, close idle sessions, finish closes a crash interrupted.

Spending per unit without a store write per unit. The store holds each session's
deposit and what is spent of it; a replica takes units from it in one atomic UPDATE
(`spent + n*unit <= deposit`) and serves them from memory: a *lease*. A session used
now and then takes one unit per request (the lease is empty as soon as it is served).
A busy one takes 2, 4, ... up to `max_lease_units` at a time while it keeps using
them up within `lease_s`. Units are never served past their lease's `lease_s`, and the
ones left then are given back to the store; so no more is ever served than was paid,
on any number of replicas, and a close waits at most `lease_s` (and only when some
replica took more than one unit lately) before it fixes the refund. The price of that:
a replica that is killed (not stopped) keeps the units it held unserved, at most
`max_lease_units` per busy session, and they are not refunded (docs/reliability.md).

A close (the client's, or the idle timer's): the session stops spending at once
(status closing), units held by this replica come back, other replicas' leases run out,
the refund is fixed (refunding, deposit - spent), and exactly one attempt pays it to the
return invoice with the node's `pay` (an amount on an amountless invoice), under the
label `micropay-refund-<session id>`. After a crash the node's own record of that
attempt decides, by the one rule in lightning/outcome.py: complete is succeeded, failed
(or dead: pending with no HTLC past the grace) is failed, pending is looked at again,
no record means the attempt never reached the node and is made now.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..core.errors import (BadRequest, NodeError, PaymentFailed, PaymentInsufficientBalance,
                           PaymentInvalidReturnInvoice, PaymentSchemeError, PaymentSessionClosed,
                           PaymentSessionNotFound, PaymentUnknown, PaymentUnknownChallenge)
from ..lightning.base import Node
from ..lightning.bolt11codec import InvalidInvoice, route_hint_fee_msat
from ..lightning.outcome import OrphanWatch, Outcome
from .scheme import SessionAction, network_of
from ..seller.pricing import SessionPolicy
from ..store.sessions import RefundStatus, SessionRecord, SessionRepository, SessionStatus

log = logging.getLogger("micropay.sessions")

LEASE_S = 1.0
MAX_LEASE_UNITS = 256
RESUME_AFTER_S = 120           # a close left unfinished this long ago is taken over (crash)
ACTIONS_KEPT_S = 86_400        # consumed challenges' responses, for retries (the draft: >= 5 min)


@dataclass(slots=True)
class _Lease:
    unit_msat: int
    size: int                        # units taken by the last reservation
    units: int                       # of them, not served yet
    taken_at: float                  # monotonic
    until: float                     # monotonic: none served after this


@dataclass
class CloseResult:
    session_id: str
    refund_msat: int
    refund_status: RefundStatus

    def body(self) -> dict[str, Any]:
        return {"status": "closed", "refundSats": self.refund_msat // 1000, "refundStatus": str(self.refund_status)}


@dataclass
class SessionLedger:
    repo: SessionRepository
    node: Node
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    lease_s: float = LEASE_S
    max_lease_units: int = MAX_LEASE_UNITS
    idle_timeouts: dict[str, int] = field(default_factory=dict)     # route key -> seconds
    refund_policies: dict[str, SessionPolicy] = field(default_factory=dict)   # route key -> its fee caps
    _leases: dict[str, _Lease] = field(default_factory=dict)
    _reserving: dict[str, asyncio.Future] = field(default_factory=dict)
    _topped: dict[str, asyncio.Event] = field(default_factory=dict)
    _closing: dict[str, asyncio.Task] = field(default_factory=dict)
    _orphans: OrphanWatch = field(init=False)

    def __post_init__(self) -> None:
        self._orphans = OrphanWatch(self.node)

    # -- opening and topping up ---------------------------------------------------
    async def open(self, act: SessionAction, now: int) -> None:
        """Open a session on a paid deposit (verified by payment_auth.verify_session), at
        the unit price its challenge named. An open credential is single use: presented
        again it is refused (the draft's Open Verification, step 1; docs/protocol.md)."""
        if await self.repo.get(act.session_id) is not None:
            raise PaymentUnknownChallenge("this deposit was already used to open the session: send its requests "
                                          "with action \"bearer\"")
        return_hash = await self._check_return_invoice(act)
        outcome = await self.repo.open(session_id=act.session_id, token_id=act.token_id, route_key=act.route,
                                       unit_msat=act.unit_msat, deposit_msat=act.deposit_msat,
                                       return_invoice=act.return_invoice, return_hash=return_hash, now=now,
                                       idle_timeout_s=self.idle_timeouts.get(act.route))
        if outcome == "ok":
            log.info("session %s opened: %d msat deposit, %d msat per unit (%s)", act.session_id,
                     act.deposit_msat, act.unit_msat, act.route)
            return
        if outcome == "return_taken":
            raise PaymentInvalidReturnInvoice("the return invoice is already named by another session: make a "
                                              "fresh one for each session (the deposit is still unused)")
        raise PaymentUnknownChallenge("this deposit was already used to open the session: send its requests "
                                      "with action \"bearer\"")

    async def _check_return_invoice(self, act: SessionAction) -> str:
        """The return invoice's payment hash, once it is shown to be usable for a refund."""
        try:
            decoded = await self.node.decode(act.return_invoice)
        except (NodeError, ValueError) as exc:
            raise PaymentInvalidReturnInvoice(f"the return invoice is not a BOLT11 invoice ({exc})") from None
        except Exception:    # a decoder's own error types: still not an invoice
            raise PaymentInvalidReturnInvoice("the return invoice is not a BOLT11 invoice") from None
        if decoded.amount_msat:
            raise PaymentInvalidReturnInvoice("the return invoice must not encode an amount: the refund's is "
                                              "fixed at close")
        if network_of(act.return_invoice) != network_of(act.deposit_invoice):
            raise PaymentInvalidReturnInvoice("the return invoice is for another network than the deposit")
        if decoded.expires_at <= self.clock():
            raise PaymentInvalidReturnInvoice("the return invoice has expired")
        cap = self.refund_fee_cap(act.route, act.deposit_msat)
        try:
            hint_fee = route_hint_fee_msat(act.return_invoice, act.deposit_msat)
        except InvalidInvoice:           # the node decoded it; its route hints are not readable here
            hint_fee = 0
        if hint_fee > cap:
            raise PaymentInvalidReturnInvoice(
                f"the return invoice's route hints charge {hint_fee} msat to carry a refund of the deposit; this "
                f"server pays at most {cap} msat of routing fees per refund: give an invoice reachable for less")
        if await self.repo.return_taken(decoded.payment_hash) not in (None, act.session_id):
            raise PaymentInvalidReturnInvoice("the return invoice is already named by another session: make a "
                                              "fresh one for each session (the deposit is still unused)")
        return decoded.payment_hash

    def refund_fee_cap(self, route_key: str, refund_msat: int) -> int:
        """The most the operator pays in routing fees for a refund of this size on this
        route (on top of the refund: the client gets the whole unspent balance)."""
        return self.refund_policies.get(route_key, SessionPolicy()).refund_fee_cap(refund_msat)

    async def top_up(self, act: SessionAction, now: int) -> dict[str, Any]:
        """Add a paid deposit to an open session; the response body. A retry of the same
        credential gets the first response again."""
        response = {"status": "ok"}
        outcome = await self.repo.top_up(session_id=act.session_id, token_id=act.token_id,
                                         deposit_msat=act.deposit_msat, now=now, challenge_id=act.challenge_id,
                                         response=response)
        if outcome == "ok":
            log.info("session %s topped up by %d msat", act.session_id, act.deposit_msat)
            event = self._topped.pop(act.session_id, None)
            if event is not None:
                event.set()               # streams of this process held for a top-up go on
            return response
        earlier = await self.repo.action_response(act.challenge_id, "topUp", act.session_id)
        if earlier is not None:
            return earlier
        if outcome == "used":
            raise PaymentUnknownChallenge("this deposit was already used")
        raise await self.refusal(act.session_id)

    async def refusal(self, session_id: str) -> PaymentSchemeError:
        """Why a session cannot be spent on: not found, closed, or empty."""
        rec = await self.repo.get(session_id)
        if rec is None:
            return PaymentSessionNotFound("no such session")
        if rec.status != SessionStatus.OPEN:
            return closed_error(rec)
        return PaymentInsufficientBalance(f"the session has {rec.balance_msat // 1000} sat left; one unit costs "
                                         f"{rec.unit_msat // 1000} sat: top it up", balance_msat=rec.balance_msat)

    # -- spending -----------------------------------------------------------------
    async def spend(self, session_id: str, unit_msat: int) -> bool:
        """Take one unit of an open session's balance. False: closed, or not enough left.
        `unit_msat` is the session record's own unit price (fixed when it opened): never
        one read from a request."""
        if self.take_leased(session_id, unit_msat):
            return True
        return await self._spend_reserving(session_id, unit_msat)

    def take_leased(self, session_id: str, unit_msat: int) -> bool:
        """Take one unit from this replica's lease, if it holds one taken at this price
        (no store, no await: the gate's hot path). False: `spend` has to reserve (or refuse)."""
        lease = self._leases.get(session_id)
        if lease is not None and lease.units and lease.unit_msat == unit_msat and self.monotonic() < lease.until:
            lease.units -= 1
            return True
        return False

    async def _spend_reserving(self, session_id: str, unit_msat: int) -> bool:
        while True:
            pending = self._reserving.get(session_id)
            if pending is not None:          # another request of this session is reserving: share it
                await asyncio.shield(pending)
            lease = self._leases.get(session_id)
            now = self.monotonic()
            if lease is not None and lease.units and lease.unit_msat == unit_msat and now < lease.until:
                lease.units -= 1
                return True
            if pending is None:
                break
        done = asyncio.get_running_loop().create_future()
        self._reserving[session_id] = done
        try:
            if lease is not None and lease.units:       # expired with units left: they go back first (at their price)
                left, lease.units = lease.units, 0
                await self._release(session_id, left * lease.unit_msat)
            busy = lease is not None and lease.unit_msat == unit_msat and now - lease.taken_at < self.lease_s
            size = min(lease.size * 2, self.max_lease_units) if busy and lease is not None else 1
            until_ms = math.ceil((self.clock() + self.lease_s) * 1000) if size > 1 else 0
            got = await self.repo.reserve(session_id, size * unit_msat, int(self.clock()), until_ms)
            if got is None and size > 1:
                size = 1
                got = await self.repo.reserve(session_id, unit_msat, int(self.clock()))
            if got is None:
                self._leases.pop(session_id, None)
                return False
            self._leases[session_id] = _Lease(unit_msat, size, size - 1, now, now + self.lease_s)
            return True
        finally:
            del self._reserving[session_id]
            done.set_result(None)

    async def give_back(self, session_id: str, unit_msat: int) -> None:
        """One unit taken (at `unit_msat`, the price `spend` took it at) for an event or a
        request that was not delivered goes back to the store at once, at that price (not
        into this replica's lease: a close on another replica would not wait for it)."""
        await self._release(session_id, unit_msat)

    async def _release(self, session_id: str, amount_msat: int) -> None:
        if not await self.repo.release(session_id, amount_msat):
            rec = await self.repo.get(session_id)
            if rec is not None and rec.status != SessionStatus.OPEN:
                log.warning("session %s: %d msat of units came back after its refund was made; they stay spent",
                            session_id, amount_msat)

    async def wait_for_balance(self, session_id: str, unit_msat: int, timeout_s: float,
                               gone: Callable[[], bool] = lambda: False) -> bool:
        """Spend one unit as soon as a top-up allows it (this process's top-ups wake the
        waiter at once; another replica's are seen within a second). False after
        `timeout_s`, once the session is no longer open, or as soon as `gone()` says the
        client the unit was for has left (checked every quarter second): nothing is spent
        for it then."""
        deadline = self.monotonic() + timeout_s
        while True:
            if gone():
                return False
            if await self.spend(session_id, unit_msat):
                return True
            rec = await self.repo.get(session_id)
            left = deadline - self.monotonic()
            if rec is None or rec.status != SessionStatus.OPEN or left <= 0:
                return False
            event = self._topped.setdefault(session_id, asyncio.Event())
            waited = self.monotonic()
            while not gone() and not event.is_set() and self.monotonic() - waited < min(1.0, left):
                try:
                    await asyncio.wait_for(event.wait(), 0.25)
                except TimeoutError:
                    pass

    async def flush_leases(self) -> None:
        """Give back the units of leases that ran out unserved (run every lease_s / 2)."""
        now = self.monotonic()
        for session_id, lease in list(self._leases.items()):
            if now < lease.until or session_id in self._reserving:
                continue
            del self._leases[session_id]
            if lease.units:
                await self._release(session_id, lease.units * lease.unit_msat)

    async def _release_local(self, session_id: str) -> None:
        pending = self._reserving.get(session_id)
        if pending is not None:
            await asyncio.shield(pending)
        lease = self._leases.pop(session_id, None)
        if lease is not None and lease.units:
            await self._release(session_id, lease.units * lease.unit_msat)

    # -- closing ----------------------------------------------------------------
    async def close(self, session_id: str, *, why: str = "client") -> CloseResult:
        """Close an open session and refund what is left of it, once. Raises
        PaymentSessionNotFound / PaymentSessionClosed if it is not open (a second close,
        even one racing the first, is refused: the draft's rule for closed sessions)."""
        if not await self.repo.begin_close(session_id, int(self.clock())):
            rec = await self.repo.get(session_id)
            if rec is None:
                raise PaymentSessionNotFound("no such session")
            raise closed_error(rec)
        log.info("session %s closing (%s)", session_id, why)
        task = asyncio.get_running_loop().create_task(self._finish(session_id),
                                                      name=f"micropay-session-close-{session_id[:12]}")
        self._closing[session_id] = task
        task.add_done_callback(lambda _t: self._closing.pop(session_id, None))
        return await asyncio.shield(task)      # a client that goes away does not stop the refund

    async def _finish(self, session_id: str) -> CloseResult:
        event = self._topped.pop(session_id, None)
        if event is not None:
            event.set()                    # held streams see the session closed
        await self._release_local(session_id)
        rec = await self.repo.get(session_id)
        assert rec is not None
        if rec.status == SessionStatus.CLOSING:
            wait = rec.lease_until_ms / 1000 + self.lease_s / 2 + 0.1 - self.clock()
            if wait > 0:                   # another replica may hold units: they come back meanwhile
                await asyncio.sleep(min(wait, 2 * self.lease_s + 1))
            await self.repo.fix_refund(session_id)
            rec = await self.repo.get(session_id)
            assert rec is not None
        if rec.refund_from is None:
            try:       # where the node's records stand; its amount is final from here on
                position = await self.node.sendpays_position() if rec.refund_msat else 0
            except NodeError as exc:
                raise PaymentUnknown(f"the node cannot be asked now ({exc}); the refund is made later") from None
            start, refund = await self.repo.start_refund(session_id, position)
        else:
            start, refund = rec.refund_from, rec.refund_msat or 0
        status = RefundStatus.SKIPPED if refund == 0 else await self._refund(rec, refund, start)
        if status is None:                 # outcome unknown: left as refunding, settled by resume()
            raise PaymentUnknown("the refund's outcome is not known yet; it is settled from the node's record")
        await self.repo.finish(session_id, status)
        result = CloseResult(session_id, refund, status)
        (log.warning if status == RefundStatus.FAILED else log.info)(
            "session %s closed: refund %d msat %s", session_id, refund, status)
        return result

    async def _refund(self, rec: SessionRecord, refund_msat: int, start: int) -> RefundStatus | None:
        """One attempt to pay the refund (or the outcome of the attempt made before a crash).
        The attempt is found by its own label, from where the node's payment records
        stood before it was made: another payment to the same invoice (another session
        naming it, or the payer itself) is never taken for this refund."""
        label = refund_label(rec.session_id)
        try:
            earlier = await self._orphans.settle(now=self.clock(), label=label, sendpays_start=start)
            if earlier.outcome == Outcome.SUCCEEDED:
                return RefundStatus.SUCCEEDED
            if earlier.outcome == Outcome.FAILED:
                # failed, or dead (recorded, no HTLC, past the grace): nothing of it left
                # the node, and the draft asks for one attempt, not retries
                if earlier.orphaned:
                    log.warning("session %s: the refund attempt died with its node (%s)", rec.session_id,
                                earlier.detail)
                return RefundStatus.FAILED
            if earlier.outcome == Outcome.IN_FLIGHT:
                raise PaymentUnknown(f"the refund is still pending at the node: {earlier.detail}")
            other = await self.node.payment_status((await self.node.decode(rec.return_invoice)).payment_hash)
            if other is not None and other.state != "failed":
                # Paid (or being paid) by another payment of this node: a node answers a
                # second payment of a paid invoice with the first one's success.
                log.warning("session %s: the return invoice was already paid by another payment; the refund of "
                            "%d msat cannot go there", rec.session_id, refund_msat)
                if other.state == "pending":
                    raise PaymentUnknown("another payment to the return invoice is pending")
                return RefundStatus.FAILED
            paid = await self.node.pay(rec.return_invoice, label=label, amount_msat=refund_msat,
                                       max_fee_msat=self.refund_fee_cap(rec.route_key, refund_msat))
            if paid.amount_msat != refund_msat:
                log.warning("session %s: the node reported a payment of %d msat for a refund of %d msat",
                            rec.session_id, paid.amount_msat, refund_msat)
                return RefundStatus.FAILED
            return RefundStatus.SUCCEEDED
        except PaymentUnknown as exc:
            log.warning("session %s: refund of %d msat in flight, outcome unknown (%s)", rec.session_id,
                        refund_msat, exc)
            return None
        except (PaymentFailed, BadRequest, ValueError) as exc:
            log.warning("session %s: refund of %d msat to the return invoice failed: %s", rec.session_id,
                        refund_msat, exc)
            return RefundStatus.FAILED
        except NodeError as exc:
            # the node went away (killed, restarted) while the refund may have been out:
            # its record decides later (resume), never a guess now
            log.warning("session %s: refund of %d msat: lost the node mid-attempt (%s); settled from its record "
                        "later", rec.session_id, refund_msat, exc)
            return None

    async def close_idle(self, limit: int = 100) -> int:
        """Close the sessions idle past their idle timeout (the draft: a server-side close
        refunds like the client's), at most `limit` of them, the earliest due first: each
        session's deadline is stored with it (active_at + the timeout of its route when it
        opened), so sessions with long timeouts never hold up the close of short ones.
        Returns how many."""
        if not self.idle_timeouts:
            return 0
        now = int(self.clock())
        # sessions without a deadline (opened before it was stored): their route's
        # timeout now, or the shortest one for a route no longer configured
        for route_key, timeout_s in self.idle_timeouts.items():
            await self.repo.set_idle_timeout(timeout_s, route_key)
        await self.repo.set_idle_timeout(min(self.idle_timeouts.values()))
        closed = 0
        for session_id in await self.repo.idle(now, limit):
            rec = await self.repo.get(session_id)
            if rec is None or rec.status != SessionStatus.OPEN:
                continue
            timeout = rec.idle_timeout_s or self.idle_timeouts.get(rec.route_key, min(self.idle_timeouts.values()))
            if rec.active_at + timeout >= now:
                await self.repo.refresh_due(session_id)      # its deadline fell behind its activity
                continue
            if session_id in self._leases:
                continue
            try:
                await self.close(session_id, why=f"idle for {now - rec.active_at} s")
                closed += 1
            except (PaymentSessionClosed, PaymentSessionNotFound):
                pass               # another replica closed it first
            except PaymentUnknown:
                pass
        return closed

    async def resume(self) -> int:
        """Finish closes that a crash interrupted (closing or refunding for a while)."""
        finished = 0
        for session_id in await self.repo.unfinished(int(self.clock()) - RESUME_AFTER_S):
            if session_id in self._closing:
                continue
            try:
                await self._finish(session_id)
                finished += 1
            except PaymentUnknown:
                pass
            except Exception as exc:      # one bad session must not stop the others
                log.error("session %s: finishing its close failed: %s", session_id, exc)
        return finished

    async def purge(self) -> None:
        await self.repo.purge_actions(int(self.clock()) - ACTIONS_KEPT_S)

    async def stop(self) -> None:
        """At shutdown: units held unserved go back, closes under way finish."""
        for task in list(self._closing.values()):
            try:
                await asyncio.wait_for(asyncio.shield(task), 30)
            except Exception:
                pass
        for session_id in list(self._leases):
            try:
                await self._release_local(session_id)
            except Exception as exc:
                log.warning("giving back session %s's unserved units failed: %s", session_id, exc)


def refund_label(session_id: str) -> str:
    """The node label of a session's refund payment."""
    return f"micropay-refund-{session_id}"


def closed_error(rec: SessionRecord) -> PaymentSessionClosed:
    """The refusal of any action on a session that is no longer open, with what became
    of its refund (so a client whose close answer was lost still learns it)."""
    if rec.status == SessionStatus.CLOSED:
        return PaymentSessionClosed("the session is closed; open a new one", sessionId=rec.session_id,
                                    refundSats=(rec.refund_msat or 0) // 1000,
                                    refundStatus=str(rec.refund_status or RefundStatus.SKIPPED))
    return PaymentSessionClosed("the session is closing; its refund is under way", sessionId=rec.session_id,
                                refundStatus="pending")


def periodic_jobs(ledger: SessionLedger) -> list[tuple[float, Callable[[], Awaitable[Any]], str]]:
    """The ledger's background work: (period, job, what), for tasks.every."""
    return [(ledger.lease_s / 2, ledger.flush_leases, "giving back unserved session units"),
            (10.0, ledger.close_idle, "closing idle sessions"),
            (30.0, ledger.resume, "finishing interrupted session closes"),
            (3600.0, ledger.purge, "purging old session actions")]
