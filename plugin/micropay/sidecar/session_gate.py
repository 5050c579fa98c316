"""The gate for session routes: the Payment scheme's session intent over HTTP
(draft-lightning-session). The bookkeeping is sessions.SessionLedger's; this module
speaks the wire.

    no credential      402, `WWW-Authenticate: Payment ... intent="session"` with a
                       deposit invoice (price_msat x deposit_units)
    action="open"      the deposit's preimage and an amountless return invoice: the
                       session opens and this request is served as its first unit
    action="bearer"    the session's preimage: served, one unit per request, or one per
                       event of an SSE response (see SessionMeter)
    action="topUp"     a new deposit's preimage: 200 {"status":"ok"}; held streams go on
    action="close"     200 {"status":"closed","refundSats":N,"refundStatus":...}

A refused credential gets a 402 with a fresh challenge and the draft's problem type.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Awaitable, Callable

from aiohttp import hdrs, web

from ..seller.challenger import Challenger
from ..core.errors import (MicropayError, PaymentCredentialMalformed, PaymentInvalidPreimage,
                           PaymentSchemeError, PaymentSessionNotFound, PaymentUnknownChallenge)
from ..http.problems import problem_response
from ..l402.wire import PROBLEM_CONTENT_TYPE, problem_body
from ..core.metrics import Metrics
from ..payment.scheme import (Binder, SessionAction, is_payment, parse_credential, session_challenge,
                              session_receipt, sse_event, verify_session)
from ..seller.pricing import RouteRule
from ..core.receipts import RECEIPT_HEADER
from ..payment.sessions import SessionLedger, closed_error
from ..store.sessions import SessionRecord, SessionStatus
from .cache import BoundedCache, request_key
from .paid import Paid

log = logging.getLogger("micropay.gate")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BEARER_CACHE_SIZE = 100_000
BEARER_CACHE_BYTES = 32 * 1024 ** 2     # and bytes (cache.py)
SSE_TYPE = "text/event-stream"


class SessionMeter:
    """Spends a session's units for one admitted request, at the session's own unit
    price. The request's first unit is paid at admission; a streamed response calls
    `charge` before each further event (proxy.py does it per SSE event) and `undelivered`
    when writing that event failed. When the balance runs out, `charge` emits the
    `payment-need-topup` event and holds the stream until a top-up (True) or `hold_s`
    (a `session-timeout` event, then False: end the response); a client that leaves
    during the hold ends it at once, with nothing spent for it."""

    __slots__ = ("ledger", "session_id", "unit_msat", "hold_s", "units", "_prepaid", "clock", "_request")

    def __init__(self, ledger: SessionLedger, session_id: str, unit_msat: int, hold_s: float,
                 clock: Callable[[], float], request: web.Request | None = None) -> None:
        self.ledger, self.session_id, self.unit_msat, self.hold_s = ledger, session_id, unit_msat, hold_s
        # units: what this request has spent, the admission's unit included
        self.units, self._prepaid, self.clock, self._request = 1, True, clock, request

    def client_gone(self) -> bool:
        """The client of this request closed its connection."""
        if self._request is None:
            return False
        transport = self._request.transport
        return transport is None or transport.is_closing()

    async def charge(self, response: web.StreamResponse) -> bool:
        if self._prepaid:
            self._prepaid = False            # the admission's unit pays for the first event
            return True
        if not await self.ledger.spend(self.session_id, self.unit_msat):
            await response.write(sse_event("payment-need-topup", await self._balance()))
            if not await self.ledger.wait_for_balance(self.session_id, self.unit_msat, self.hold_s,
                                                      self.client_gone):
                if self.client_gone():
                    raise ClientGone("the client disconnected while its stream waited for a top-up")
                await response.write(sse_event("session-timeout", await self._balance()))
                return False
        self.units += 1
        return True

    async def undelivered(self) -> None:
        """The event `charge` was last called for never reached the client: its unit goes
        back, at the price it was taken at."""
        self.units -= 1
        await self.ledger.give_back(self.session_id, self.unit_msat)

    async def give_back(self) -> None:
        """The request never reached the upstream: its unit goes back to the session."""
        if self._prepaid and self.units == 1:
            self._prepaid, self.units = False, 0
            await self.ledger.give_back(self.session_id, self.unit_msat)

    async def _balance(self) -> dict[str, object]:
        rec = await self.ledger.repo.get(self.session_id)
        spent = rec.spent_msat // 1000 if rec is not None else 0
        return {"sessionId": self.session_id, "balanceSpent": spent, "balanceRequired": self.unit_msat // 1000}

    def receipt_event(self) -> bytes:
        """The final `payment-receipt` event of a stream (before its `[DONE]`)."""
        return sse_event("payment-receipt", {
            "method": "lightning", "reference": self.session_id, "status": "success",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.clock())),
            "spent": self.units * self.unit_msat // 1000, "units": self.units})


class ClientGone(ConnectionResetError):
    """The client of a metered stream left: nothing more is charged or written."""


SESSION_METER = web.RequestKey("micropay_session_meter", SessionMeter) if hasattr(web, "RequestKey") \
    else "micropay_session_meter"


class Bearer:
    """A session credential admitted before for one method and raw path (the gate's
    bearer cache), with the Paid record its requests get, remade once a second (the
    receipt's timestamp is in whole seconds)."""

    __slots__ = ("rule", "session_id", "unit_msat", "hold_s", "_second", "_paid")

    def __init__(self, rule: RouteRule, session_id: str, unit_msat: int) -> None:
        """`unit_msat`: the session record's unit price, never a request's."""
        assert rule.session is not None
        self.rule, self.session_id, self.unit_msat = rule, session_id, unit_msat
        self.hold_s = rule.session.hold_s
        self._second, self._paid = -1, None

    def paid(self, now: int) -> Paid:
        if now != self._second or self._paid is None:
            self._second = now
            self._paid = Paid(self.rule.key, None, {RECEIPT_HEADER: session_receipt(self.session_id, now)}, None,
                              ("", self.session_id))
        return self._paid


class SessionGate:
    def __init__(self, *, ledger: SessionLedger, challenger: Challenger, binder: Callable[[], Binder],
                 realm: str, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.ledger, self.challenger, self._binder = ledger, challenger, binder
        self.realm, self.metrics, self.clock = realm, metrics, clock
        # A bearer credential is the same header on every request of its session: once
        # verified, later requests for the same method and raw path skip parsing it, and
        # the gate's fast path (Gate.guard) skips pricing the path again.
        self.bearers: BoundedCache[Bearer] = BoundedCache(BEARER_CACHE_BYTES, BEARER_CACHE_SIZE)

    async def handle(self, request: web.Request, rule: RouteRule, handler: Handler, auth: str | None,
                     serve: Callable[..., Awaitable[web.StreamResponse]],
                     challenge_for: Callable[..., Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """`serve(request, handler, paid, None)` serves an admitted request (Gate._serve);
        `challenge_for(request, rule, reason)` answers 402."""
        assert rule.session is not None
        if not is_payment(auth):
            return await challenge_for(request, rule, None)
        key = request_key(auth, request.method, request.raw_path)  # type: ignore[arg-type]
        known = self.bearers.get(key)
        try:
            if known is not None:
                return await self.bearer(request, handler, known, serve, challenge_for)
            now = int(self.clock())
            act = await self._verify(auth, rule, now)
            if act.action == "open":
                await self.ledger.open(act, now)
                unit_msat = act.unit_msat            # the price the paid deposit's challenge named
            else:
                rec = await self._session_of(act, rule)
                if act.action == "topUp":
                    return _json(await self.ledger.top_up(act, now), session_receipt(act.session_id, now))
                if act.action == "close":
                    body = (await self.ledger.close(act.session_id)).body()
                    return _json(body, session_receipt(act.session_id, now, refundSats=body["refundSats"],
                                                       refundStatus=body["refundStatus"]))
                unit_msat = rec.unit_msat
            if not await self.ledger.spend(act.session_id, unit_msat):
                raise await self.ledger.refusal(act.session_id)
            admitted = Bearer(rule, act.session_id, unit_msat)
            if act.action == "bearer":
                self.bearers.put(key, admitted)
            return await serve(request, handler, self.admit(request, admitted), None)
        except PaymentSchemeError as err:
            self.metrics.rejections[err.code] += 1
            try:
                return await challenge_for(request, rule, err)
            except MicropayError as refused:     # rate limited, overloaded: say that instead
                return problem_response(refused)

    async def _verify(self, auth: str, rule: RouteRule, now: int) -> SessionAction:
        """The credential's action, checked statelessly (payment_auth.verify_session) and
        issued for this route. An unknown session is `session-not-found` whatever the
        preimage (the draft's Bearer Verification looks the session up first)."""
        cred = parse_credential(auth)
        try:
            act = verify_session(self._binder(), cred, realm=self.realm, now=now)
        except PaymentInvalidPreimage:
            sid = cred.payload.get("sessionId")
            if cred.payload.get("action") in ("bearer", "close") and isinstance(sid, str) \
                    and await self.ledger.repo.get(sid) is None:
                raise PaymentSessionNotFound("no such session") from None
            raise
        except (KeyError, TypeError, ValueError):   # a payload of the right shape with wrong types
            raise PaymentCredentialMalformed("the session credential's payload is malformed") from None
        if act.route != rule.key:
            raise PaymentUnknownChallenge("the challenge was issued for another route")
        return act

    async def _session_of(self, act: SessionAction, rule: RouteRule) -> SessionRecord:
        """The record of the session a bearer, topUp or close names: it decides the
        route and the unit price, whatever challenge the credential echoes. Refused when
        unknown, opened on another route, or (but for a topUp, which says so itself)
        no longer open."""
        rec = await self.ledger.repo.get(act.session_id)
        if rec is None:
            raise PaymentSessionNotFound("no such session")
        if rec.route_key != rule.key:
            raise PaymentUnknownChallenge(f"this session was opened for {rec.route_key}: it is spent, topped up "
                                          "and closed there only, with challenges of that route")
        if act.action != "topUp" and rec.status != SessionStatus.OPEN:
            raise closed_error(rec)
        return rec

    async def bearer(self, request: web.Request, handler: Handler, known: Bearer,
                     serve: Callable[..., Awaitable[web.StreamResponse]],
                     challenge_for: Callable[..., Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """A bearer credential verified before: spend a unit and serve. (Gate.guard serves
        one whose unit is in this replica's lease without coming here.)"""
        if await self.ledger.spend(known.session_id, known.unit_msat):
            return await serve(request, handler, self.admit(request, known), None)
        self.bearers.pop(request_key(request.headers.get(hdrs.AUTHORIZATION, ""), request.method, request.raw_path))
        err = await self.ledger.refusal(known.session_id)
        self.metrics.rejections[err.code] += 1
        try:
            return await challenge_for(request, known.rule, err)
        except MicropayError as refused:          # rate limited, overloaded: say that instead
            return problem_response(refused)

    def admit(self, request: web.Request, bearer: Bearer) -> Paid:
        """A request of `bearer`'s session whose first unit is spent: its meter (further
        units of a streamed response) and the Paid record to serve it with."""
        request[SESSION_METER] = SessionMeter(self.ledger, bearer.session_id, bearer.unit_msat, bearer.hold_s,
                                              self.clock, request)
        return bearer.paid(int(self.clock()))

    async def challenge(self, request: web.Request, rule: RouteRule, client: str, resource: str,
                        description: str, reason: MicropayError | None) -> web.Response:
        """A 402 with a deposit invoice for a session of `rule`."""
        policy = rule.session
        assert policy is not None
        deposit = rule.price_msat * policy.deposit_units
        record = await self.challenger.challenge(client, rule, deposit, description, None)
        offer = session_challenge(self._binder(), realm=self.realm, bolt11=record.bolt11,
                                  payment_hash=record.payment_hash, unit_msat=rule.price_msat,
                                  deposit_msat=deposit, expires_at=record.expires_at,
                                  idle_timeout_s=policy.idle_timeout_s, description=description[:200],
                                  unit_type=policy.unit_type, opaque={"route": rule.key, "token": record.token_id})
        body = problem_body(
            title="Payment Required", status=402, code="payment_required",
            detail=(f"Pay the deposit invoice ({deposit // 1000} sat, {policy.deposit_units} units of "
                    f"{rule.price_msat // 1000} sat) and open a session: 'Authorization: Payment <credential>' "
                    "with action \"open\", the preimage and an amountless return invoice for the refund."),
            resource=resource, unit_msat=rule.price_msat, deposit_msat=deposit, invoice=record.bolt11,
            payment_hash=record.payment_hash, expires_at=record.expires_at, idle_timeout_s=policy.idle_timeout_s,
            unit_type=policy.unit_type, description=rule.description,
            how_to_pay={"scheme": "Payment", "method": "lightning", "intent": "session",
                        "spec": "https://paymentauth.org (draft-lightning-session)"})
        if reason is not None:
            body.update(type=getattr(reason, "problem_type", f"https://micropay.dev/errors/{reason.code}"),
                        error=reason.code, detail=f"{reason.message}. {body['detail']}")
            body.update(reason.detail)
        return web.Response(status=402, text=json.dumps(body), content_type=PROBLEM_CONTENT_TYPE,
                            headers={"Cache-Control": "no-store", hdrs.WWW_AUTHENTICATE: offer.header()})


def _json(body: dict[str, object], receipt: str) -> web.Response:
    # A response with a Payment-Receipt is `private` (core draft, Caching: MUST).
    return web.Response(text=json.dumps(body), content_type="application/json",
                        headers={RECEIPT_HEADER: receipt, "Cache-Control": "private, no-store"})
