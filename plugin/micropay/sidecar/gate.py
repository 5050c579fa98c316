"""The payment gate: admit a request with a valid L402 or Payment credential, or answer 402.

A 402 offers the route's schemes on one invoice: `L402` (bLIP-26) and, for per-request
routes priced in whole satoshis, `Payment` (the MPP charge intent, payment/scheme.py).
Paying once buys one of them: a Payment credential is consumed by writing its token's
credit ledger to zero, the same row an L402 credits token debits. Session routes
(`session` in the route's config) speak the Payment scheme's session intent instead:
session_gate.py.

Usable as aiohttp middleware (`gate.middleware`, priced by the config's routes) and
as a decorator on a handler (`@gate.require(price_msat=...)`).

Every priced decision is made on the request's canonical path (core/canonical.py), computed
once per request. A target that could be read two ways is refused (400). A handler
that serves the request itself only runs when aiohttp routed it on that same path
(otherwise the client is redirected to the canonical URL); the reverse proxy forwards
exactly the canonical path, so nothing else needs to agree with us.

Hot path for a pass token: parse header -> cached verification -> caveat check ->
handler -> cached receipt header. No node call, no store access. Credit tokens add
one atomic store statement (the debit).
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from typing import Awaitable, Callable

from aiohttp import hdrs, web

from ..core.canonical import BadPath, Target, query_digest
from ..seller.challenger import Challenger
from ..seller.config import ChallengeLimits
from ..core.errors import (BadRequest, CreditsExhausted, InvalidCredential, MalformedCredential,
                           MicropayError, PaymentSchemeError, PaymentUnknownChallenge, PricingUnavailable,
                           RequestBodyTooLarge, RequestTimeout, StreamBalanceLow, UpstreamBusy,
                           UpstreamUnreachable)
from ..http.caching import make_private
from ..http.problems import problem_response
from ..l402.wire import PROBLEM_CONTENT_TYPE, challenge_headers
from ..lightning.base import Node
from ..core.metrics import Metrics
from ..payment.scheme import (Binder, binder_for, content_digest, is_payment,
                              parse_credential, verify_charge)
from ..payment.scheme import receipt as payment_receipt
from ..seller.offer import Offer
from ..seller.pricing import Pricing, RouteRule
from ..core.ratelimit import FreeTier, client_address
from ..core.receipts import (RECEIPT_HEADER, ReceiptBatcher, ReceiptSigner, pass_receipt_json,
                              request_receipt_json)
from ..store import Store
from ..store.l402 import ChallengeRecord, L402Repository
from ..payment.sessions import SessionLedger
from ..store.sessions import SessionRepository
from ..store.stream_usage import StreamUsageRepository
from ..streams.attribution import is_secret_stream_id
from ..l402.tokens import TokenService, VerifiedToken
from .cache import INLINE_KEY_CHARS, BoundedCache, digest_key, request_key
from .paid import PAID, Paid
from .routes import RouteTable, request_target
from .session_gate import SESSION_METER, SessionGate

log = logging.getLogger("micropay.gate")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The admitted-credentials cache (and the session gate's bearer cache): at most this many
# entries and bytes (cache.py: long keys are kept as digests, every entry is counted).
ADMITTED_CACHE_SIZE = 100_000
ADMITTED_CACHE_BYTES = 32 * 1024 ** 2
PASS_RECEIPTS_BYTES = 8 * 1024 ** 2
# What a handler raises when it did not act on the request (the reverse proxy never
# reached the upstream): what the request spent is given back.
UNSERVED = (UpstreamUnreachable, UpstreamBusy, RequestTimeout, RequestBodyTooLarge)
# A Payment charge binds the request body (the core draft's `digest`) of these methods,
# and of any request that has a body, up to this many bytes (the sidecar app's own
# client_max_size, which also bounds it): a larger body is offered L402 only.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
MAX_BOUND_BODY = 1024 ** 2
# L402 credentials that fail verification, malformed ones included, are answered like a
# missing one (bLIP-26's server flow): 402 with a fresh challenge, the reason in the body.
REFUSED_L402 = (MalformedCredential, InvalidCredential, CreditsExhausted)
# Rules a `require` decorator keeps, one per route pattern it has priced (more: emptied).
MAX_REQUIRE_RULES = 1024


# Set once a gate layer has let a priced request through (paid, free tier, stream): any
# further layer (middleware and a wrapped handler, or two gates) serves it as it is,
# so wrapping a handler twice never charges twice.
ADMITTED = web.RequestKey("micropay_admitted", bool) if hasattr(web, "RequestKey") else "micropay_admitted"
# The request body once the gate has read it (to bind or check a Payment charge's
# digest): the handler's request.read() still gets it, and the reverse proxy forwards it.
BODY = web.RequestKey("micropay_body", bytes) if hasattr(web, "RequestKey") else "micropay_body"


STREAM_HEADER = "X-Micropay-Stream"
OWN = "micropay_own_endpoint"


def own_endpoint(handler: Handler) -> Handler:
    """Mark a handler as one of micropay's own endpoints (discovery, health, metrics, the
    sandbox wallets, the purchases API, the paywall): the gate checks its path is canonical
    but never prices it, whatever the config's routes say. A catch-all route (`/*`) must not
    put a price on the wallet that pays it, or on the discovery document."""
    setattr(handler, OWN, True)
    return handler


class Gate:
    def __init__(self, *, tokens: TokenService, node: Node, store: Store,
                 receipts: ReceiptSigner, limits: ChallengeLimits, metrics: Metrics | None = None,
                 pricing: Pricing | None = None, forwarded_for_hops: int = 0, body_timeout_s: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.tokens, self.node, self.store = tokens, node, store
        self.l402, self.stream_usage = L402Repository(store), StreamUsageRepository(store)
        self.service = tokens.service   # caveats are minted and checked under one name
        self.receipts, self.limits, self.clock = receipts, limits, clock
        self.batched_receipts = ReceiptBatcher(receipts)     # one signature per loop turn's receipts
        self.metrics = metrics or Metrics()
        self.pricing = pricing or Pricing([])
        self.forwarded_for_hops = forwarded_for_hops   # 0: X-Forwarded-For is not trusted
        self.body_timeout_s = body_timeout_s
        self.challenger = Challenger(tokens=tokens, node=node, l402=self.l402, limits=limits, receipts=receipts,
                                     metrics=self.metrics, clock=clock)
        self.free_tier = FreeTier(clock)
        self.routes = RouteTable(self.pricing)
        self._pass_receipts: BoundedCache[str] = BoundedCache(PASS_RECEIPTS_BYTES)
        self._admitted: BoundedCache[Paid] = BoundedCache(ADMITTED_CACHE_BYTES, ADMITTED_CACHE_SIZE)
        # True once this gate also runs as a middleware, so that a request may meet it twice
        # (middleware, then a guarded handler). Only then does guard's fast path look for an
        # earlier admission: a missing request key costs a KeyError, ~3 us per request.
        self.layered = False
        tokens.on_keys_changed.append(self._admitted.clear)   # a retired key admits nothing more
        self.binder = self._binder()
        tokens.on_keys_changed.append(self._rebind)
        session_rules = [r for r in self.pricing.rules if r.session is not None]
        self.sessions = SessionLedger(SessionRepository(store), node, clock=clock,
                                      idle_timeouts={r.key: r.session.idle_timeout_s for r in session_rules},
                                      refund_policies={r.key: r.session for r in session_rules})
        self.session_gate = SessionGate(ledger=self.sessions, challenger=self.challenger,
                                        binder=lambda: self.binder, realm=self.service, metrics=self.metrics,
                                        clock=clock)
        tokens.on_keys_changed.append(self.session_gate.bearers.clear)   # nor a retired key's session bearers

    def _binder(self) -> Binder:
        """Payment challenge ids are bound under keys derived from the root keys, so every
        replica that verifies L402 tokens verifies Payment challenges too."""
        return binder_for(self.tokens.keyring)

    def _rebind(self) -> None:
        self.binder = self._binder()

    # -- aiohttp integration ---------------------------------------------
    async def dispatch(self, request: web.Request, handler: Handler, *,
                       forwards: bool = False, looked_up: bool = False) -> web.StreamResponse:
        """Price the request by the config's routes and admit, challenge or refuse it.
        Any MicropayError raised below (e.g. an unreachable upstream) becomes its JSON
        problem response. `forwards`: the handler forwards the canonical target itself
        (the reverse proxy), so a non-canonical spelling needs no redirect. `looked_up`:
        the caller (guard) found the credential in no cache already."""
        if request.get(ADMITTED):            # another layer (gate, guard, require) let it through
            return await handler(request)
        try:
            auth = request.headers.get(hdrs.AUTHORIZATION)
            if auth is not None and not looked_up:
                hit = self._admitted.get(request_key(auth, request.method, request.raw_path))
                if hit is not None and (hit.valid_until is None or self.clock() <= hit.valid_until):
                    return await self._serve(request, handler, hit, None)
            refused, rule, target = self._route(request, forwards)
            if refused is not None:
                return refused
            if getattr(handler, OWN, False) or getattr(request.match_info.handler, OWN, False):
                return await handler(request)
            if rule is None:
                return await handler(request)
            return await self.handle(request, rule, handler, target)
        except MicropayError as err:
            return problem_response(err)

    def check_target(self, request: web.Request, forwards: bool) -> web.StreamResponse | None:
        """None if the request may go on; else the response that refuses or redirects it."""
        return self._route(request, forwards)[0]

    def _route(self, request: web.Request, forwards: bool,
               ) -> tuple[web.StreamResponse | None, RouteRule | None, Target | None]:
        """(None, the rule pricing the request or None, its canonical target) if it may go
        on; else (the response that refuses or redirects it, None, None)."""
        try:
            target, same, rule = self.routes.resolve(request)
        except BadPath as err:
            self.metrics.rejections[err.code] += 1
            return problem_response(err), None, None
        if not forwards and not same:
            # aiohttp routed this request on another reading of its path than the one the
            # gate prices: send the client to the canonical URL instead of serving it.
            return web.Response(status=308, headers={hdrs.LOCATION: target.path_qs}), None, None
        return None, rule, target


    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.layered = True        # however it was installed: guarded handlers now check for it
        return await self.dispatch(request, handler, forwards=getattr(handler, "forwards_target", False))

    def guard(self, handler: Handler) -> Handler:
        """Wrap one handler with the gate. Cheaper than the middleware (aiohttp adds two
        layers per request once an app has any middleware); the sidecar uses this. A
        handler with `forwards_target = True` (the reverse proxy) forwards the canonical
        target itself."""
        admitted, clock, paid = self._admitted, self.clock, self.metrics.paid_requests
        bearers, session_gate = self.session_gate.bearers, self.session_gate
        take_leased, serve = self.sessions.take_leased, self._serve
        forwards = getattr(handler, "forwards_target", False)

        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            # Inline fast path for an already-admitted pass credential (see dispatch).
            auth = request.headers.get(hdrs.AUTHORIZATION)
            if auth is not None:
                raw_path = request.raw_path
                key = (auth, request.method, raw_path) if len(auth) + len(raw_path) <= INLINE_KEY_CHARS \
                    else digest_key(auth, request.method, raw_path)     # = request_key(), inlined
                hit = admitted.get(key)
                if hit is not None and (hit.valid_until is None or clock() <= hit.valid_until):
                    if self.layered and request.get(ADMITTED):
                        return await handler(request)
                    request[PAID] = hit
                    request[ADMITTED] = True
                    try:
                        response = await handler(request)
                    except MicropayError as err:       # e.g. the upstream is unreachable (a pass: nothing to give back)
                        return problem_response(err)
                    paid[hit.route_key] += 1
                    if not response.prepared:
                        response.headers[RECEIPT_HEADER] = hit.headers[RECEIPT_HEADER]
                        make_private(response.headers)
                    return response
                # A Payment session's bearer credential verified before (session_gate.py):
                # served here when this replica's lease holds a unit of its session.
                known = bearers.get(key)
                if known is not None and not (self.layered and request.get(ADMITTED)):
                    try:
                        if take_leased(known.session_id, known.unit_msat):
                            return await serve(request, handler, session_gate.admit(request, known), None)
                        return await session_gate.bearer(request, handler, known, serve, self.challenge)
                    except MicropayError as err:
                        return problem_response(err)
            return await self.dispatch(request, handler, forwards=forwards, looked_up=True)
        return guarded

    def require(self, price_msat: int = 0, *, path: str | None = None, credits: int | None = 1,
                pass_s: int | None = None, capabilities: tuple[str, ...] = (),
                price_hook: Callable | None = None, description: str = "") -> Callable[[Handler], Handler]:
        """Decorator for one handler. `path` defaults to the request's route pattern."""
        def wrap(handler: Handler) -> Handler:
            # The rule of each route pattern, made once: a rule's Offer (its 402's content,
            # seller/offer.py) is kept for as long as the same rule prices the path.
            rules: dict[str, RouteRule] = {}

            @functools.wraps(handler)
            async def gated(request: web.Request) -> web.StreamResponse:
                if request.get(ADMITTED):
                    return await handler(request)
                refused = self.check_target(request, forwards=False)
                if refused is not None:
                    return refused
                pattern = path or _route_pattern(request)
                rule = rules.get(pattern)
                if rule is None:
                    rule = RouteRule(path=pattern, price_msat=price_msat, methods=None,
                                     credits=None if pass_s else credits, pass_s=pass_s,
                                     capabilities=frozenset(capabilities), description=description,
                                     price_hook=price_hook)
                    if len(rules) >= MAX_REQUIRE_RULES:     # patterns come from the app's routes: few
                        rules.clear()
                    rules[pattern] = rule
                try:
                    return await self.handle(request, rule, handler)
                except MicropayError as err:      # e.g. the handler's upstream is unreachable
                    return problem_response(err)
            gated.rules = rules                   # type: ignore[attr-defined]  # (for tests: the bound)
            return gated
        return wrap

    # -- the gate ----------------------------------------------------------
    async def body_digest(self, request: web.Request) -> str | None:
        """What a Payment charge binds of the request's body: "" for a request without one
        (a GET), the body's RFC 9530 digest for one with a body of at most MAX_BOUND_BODY
        bytes, None for a larger one. The body is read once (and kept: see BODY)."""
        if request.method not in BODY_METHODS and not request.body_exists:
            return ""
        body = request.get(BODY)
        if body is None:
            length = request.content_length
            if length is not None and length > MAX_BOUND_BODY:
                return None
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    body = await request.read()      # also bounded by the app's client_max_size
            except web.HTTPRequestEntityTooLarge:
                return None
            except TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {self.body_timeout_s:.0f} s "
                                     "(a request body must arrive within the server's body deadline)") from None
            except ConnectionResetError:                # the client left mid-body: no traceback logged
                from .limits import client_gone
                raise client_gone(request) from None
            if len(body) > MAX_BOUND_BODY:
                return None
            request[BODY] = body
        return content_digest(body)

    def client_key(self, request: web.Request) -> str:
        return client_address(request.remote, request.headers.getall("X-Forwarded-For", ()),
                              self.forwarded_for_hops)

    async def handle(self, request: web.Request, rule: RouteRule, handler: Handler,
                     target: Target | None = None) -> web.StreamResponse:
        """`target`: the request's canonical target, if the caller has it at hand."""
        started = time.perf_counter()
        receipt: asyncio.Future[str] | None = None
        try:
            if target is None:
                target = request_target(request)
            auth = request.headers.get(hdrs.AUTHORIZATION)
            if rule.session is not None:
                return await self.session_gate.handle(request, rule, handler, auth, self._serve,
                                                      self.challenge)
            if auth is not None and is_payment(auth):      # (no call at all for a request without one)
                return await self._handle_payment(request, rule, handler, auth, target)  # type: ignore[arg-type]
            token = None if auth is None else \
                self.tokens.verify_header(auth, request.method, target.path, rule.capabilities, target.query or "")
            if token is None:
                if rule.free_per_hour and self.free_tier.take(self.client_key(request), rule.key,
                                                              rule.free_per_hour):
                    self.metrics.free_requests[rule.key] += 1
                    request[ADMITTED] = True
                    return await handler(request)
                stream_id = request.headers.get(STREAM_HEADER)
                if stream_id is not None and rule.stream_msat:
                    return await self._serve_streamed(request, rule, handler, stream_id)
                return await self.challenge(request, rule, target=target)
            if rule.path not in token.constraints.paths:
                raise InvalidCredential("token was issued for another route", route=rule.path)
            remaining = None
            credits = token.constraints.credits
            if credits is not None:
                if credits == 1:
                    # A one-credit token's debit, if it succeeds, leaves 0: its receipt is
                    # signed in the loop turn that runs the debit (one wait instead of two).
                    # If the debit is refused, the receipt is never sent.
                    receipt = self._request_receipt(token, request, 0)
                remaining = await self.l402.debit_credit(token.token_id_hex, credits)
                if remaining is None:
                    raise CreditsExhausted(
                        "all prepaid credits of this token are spent; retry without the "
                        "Authorization header to get a new invoice", token_id=token.token_id_hex)
        except BaseException as err:
            if receipt is not None:
                receipt.cancel()             # the debit was refused or failed: nothing is served
            if not isinstance(err, MicropayError):
                raise
            self.metrics.rejections[err.code] += 1
            if isinstance(err, REFUSED_L402):
                # bLIP-26: a credential that is "invalid or insufficient in some way"
                # (malformed, forged, wrong preimage or route, spent, expired) is answered
                # with a 402 and a new credential to pay for, so the client can pay again.
                try:
                    return await self.challenge(request, rule, reason=err, target=target)
                except MicropayError as refused:    # rate limited, overloaded: say that instead
                    return problem_response(refused)
            return problem_response(err)
        finally:
            self.metrics.observe_latency(time.perf_counter() - started)
        if remaining is None:
            receipt_text = await self._pass_receipt(token)
        elif receipt is not None and remaining == 0:
            receipt_text = await receipt
        else:
            receipt_text = await self._request_receipt(token, request, remaining)
        admitted = Paid(rule.key, token, {RECEIPT_HEADER: receipt_text}, token.constraints.valid_until)
        if remaining is None:
            # A pass token admitted for this method and path stays admitted until it
            # expires: later requests skip parsing, verification and route matching.
            self._admitted.put(request_key(auth, request.method, request.raw_path), admitted)  # type: ignore[arg-type]
        return await self._serve(request, handler, admitted, remaining)

    async def _handle_payment(self, request: web.Request, rule: RouteRule, handler: Handler, auth: str,
                              target: Target) -> web.StreamResponse:
        """A Payment (MPP charge) credential: verified without the store, then consumed
        once, atomically, across replicas. Anything wrong gets a 402 with a fresh
        challenge and the draft's problem type; a consumed credential is never served again,
        even if serving fails (the draft's rule; Lightning payments are final)."""
        now = int(self.clock())
        try:
            if "payment" not in rule.schemes:
                raise PaymentUnknownChallenge("this route does not offer the Payment scheme")
            cred = parse_credential(auth)
            digest = await self.body_digest(request)
            if digest is None:
                raise RequestBodyTooLarge(f"a Payment credential binds request bodies of at most {MAX_BOUND_BODY} "
                                          "bytes; send a smaller body, or pay with L402")
            charge = verify_charge(self.binder, cred, realm=self.service, now=now, digest=digest)
            if charge.opaque.get("route") != rule.key:
                raise PaymentUnknownChallenge("the challenge was issued for another route")
            if rule.price_hook is not None and charge.opaque.get("query") != query_digest(target.query or ""):
                raise PaymentUnknownChallenge("the challenge was priced for another query string")
            if not await self.l402.consume_whole(charge.opaque.get("token", "")):
                raise PaymentUnknownChallenge("this challenge was already used")
        except PaymentSchemeError as err:
            self.metrics.rejections[err.code] += 1
            try:
                return await self.challenge(request, rule, reason=err)
            except MicropayError as refused:      # rate limited, overloaded: say that instead
                return problem_response(refused)
        headers = {RECEIPT_HEADER: payment_receipt(charge.challenge_id, charge.payment_hash, now)}
        admitted = Paid(rule.key, None, headers, None, (charge.opaque.get("token", ""), charge.payment_hash))
        return await self._serve(request, handler, admitted, None)

    async def _serve(self, request: web.Request, handler: Handler, admitted: "Paid",
                     remaining: int | None) -> web.StreamResponse:
        if remaining is not None:
            admitted = Paid(admitted.route_key, admitted.token,
                            dict(admitted.headers, **{"Payment-Credits-Remaining": str(remaining)}), None)
        headers = admitted.headers
        request[PAID] = admitted        # for streamed responses, see on_response_prepare
        request[ADMITTED] = True
        try:
            response = await handler(request)
        except UNSERVED:
            # The request never reached the upstream: what it spent goes back (a credit;
            # a Payment charge, whose credential then works again; a session's unit),
            # and its error response carries no receipt (_add_paid_headers) for it.
            request.pop(PAID, None)
            if remaining is not None and admitted.token is not None:
                await self.l402.refund_credit(admitted.token.token_id_hex)
            elif admitted.token is None and admitted.charge is not None and admitted.charge[0]:
                await self.l402.give_back_whole(admitted.charge[0])
            meter = request.get(SESSION_METER)
            if meter is not None:
                await meter.give_back()
            raise
        self.metrics.paid_requests[admitted.route_key] += 1
        if not response.prepared:
            response.headers.update(headers)
            make_private(response.headers)
        return response

    async def _serve_streamed(self, request: web.Request, rule: RouteRule, handler: Handler,
                              stream_id: str) -> web.StreamResponse:
        """Metered access paid by an incoming payment stream (see streams/schedule.py): each
        request spends rule.stream_msat of what the stream has paid this node so far."""
        if not is_secret_stream_id(stream_id):
            raise BadRequest(f"{STREAM_HEADER} must be the id of a micropay stream (16-64 lowercase hex "
                             "characters, the secret its payer chose); streams keyed by public values, "
                             "such as other podcast apps' feeds, cannot be spent")
        left = await self.stream_usage.debit(stream_id, rule.stream_msat)  # type: ignore[arg-type]
        if left is None:
            received, used = await self.stream_usage.balance(stream_id)
            raise StreamBalanceLow(
                f"stream {stream_id} has {received - used} msat left; this costs {rule.stream_msat} msat",
                received_msat=received, used_msat=used, price_msat=rule.stream_msat)
        receipt = self.receipts.sign({"v": 1, "type": "stream", "service": self.service, "stream_id": stream_id,
                                      "method": request.method, "path": request_target(request).path,
                                      "amount_msat": rule.stream_msat, "balance_msat": left,
                                      "ts": int(self.clock())})
        request[ADMITTED] = True
        response = await handler(request)
        self.metrics.paid_requests[rule.key] += 1
        if not response.prepared:
            response.headers[RECEIPT_HEADER] = receipt
            response.headers["Payment-Stream-Balance"] = str(left)
            make_private(response.headers)
        return response

    def install(self, app: web.Application, *, middleware: bool = True) -> None:
        """Add the gate to someone else's app: the pricing middleware (unless only the
        decorator is used) and the hook that puts receipts on streamed responses too."""
        if middleware:
            app.middlewares.append(self.middleware)
        app.on_response_prepare.append(_add_paid_headers)

    async def _pass_receipt(self, token: VerifiedToken) -> str:
        """A pass token's receipt: one per token and route, signed once."""
        key = (token.token_id, token.constraints.paths[0])
        cached = self._pass_receipts.get(key)
        if cached is None:
            cached = await self.batched_receipts.sign(pass_receipt_json(
                pubkey=self.receipts.pubkey_hex, service=self.service, payment_hash=token.payment_hash.hex(),
                token_id=token.token_id_hex, scope=key[1], valid_until=token.constraints.valid_until,
                issued_at=int(self.clock())))
            self._pass_receipts.put(key, cached)
        return cached

    def _request_receipt(self, token: VerifiedToken, request: web.Request, remaining: int) -> "asyncio.Future[str]":
        """A credit token's receipt for this request, signed with the loop turn's others."""
        return self.batched_receipts.sign(request_receipt_json(
            pubkey=self.receipts.pubkey_hex, service=self.service, payment_hash=token.payment_hash.hex(),
            token_id=token.token_id_hex, method=request.method, path=request_target(request).path,
            credits_remaining=remaining, ts=int(self.clock())))

    async def challenge(self, request: web.Request, rule: RouteRule, reason: MicropayError | None = None,
                        target: Target | None = None) -> web.StreamResponse:
        """A 402 with an invoice for `rule` (`reason`: why a credential sent was not enough;
        `target`: the request's canonical target, if the caller has it at hand)."""
        client = self.client_key(request)
        if target is None:
            target = request_target(request)
        method = request.method
        if rule.session is not None:
            description = rule.description or f"{self.service}: {method} {target.path}"[:200]
            return await self.session_gate.challenge(request, rule, client, f"{method} {target.path}",
                                                     description, reason)
        if rule.price_hook is None:
            offer = self.routes.offers.get((method, target.path))
            if offer is None or offer.rule is not rule:      # another layer's rule on this path: its own
                offer = self.routes.keep_offer(method, target, Offer(
                    rule, service=self.service, method=method, path=target.path, price_msat=rule.price_msat))
        else:
            try:
                price = await rule.price_for(_as_canonical(request, target))
            except Exception as exc:
                log.error("price hook for %s failed: %s", rule.key, exc)
                raise PricingUnavailable("the price for this resource cannot be computed right now") from None
            offer = Offer(rule, service=self.service, method=method, path=target.path, price_msat=price,
                          query=target.query)
        if offer.charge is None:
            digest = None                        # this price's 402 offers L402 only
        elif method not in BODY_METHODS and not request.body_exists:
            digest = ""                          # no body to bind (body_digest's first answer)
        else:
            digest = await self.body_digest(request)
        record = await self.challenger.challenge(client, rule, offer.price_msat, offer.description, target.query,
                                                 offer)
        return self._challenge_response(offer, record, reason, digest)

    def _challenge_response(self, offer: Offer, record: ChallengeRecord, reason: MicropayError | None,
                            digest: str | None) -> web.Response:
        """`digest`: the request body's, which the Payment charge binds; None (no Payment
        charge at this price, or a body larger than the gate binds): L402 only."""
        text = offer.body(record.bolt11, record.payment_hash, record.expires_at, record.macaroon, record.created_at)
        if reason is not None:
            body = json.loads(text)
            body.update(type=getattr(reason, "problem_type", f"https://micropay.dev/errors/{reason.code}"),
                        error=reason.code, detail=f"{reason.message}. {body['detail']}")
            text = json.dumps(body)
        response = web.Response(status=402, text=text, content_type=PROBLEM_CONTENT_TYPE,
                                headers={"Cache-Control": "no-store"})
        headers = response.headers
        if offer.l402:
            for value in challenge_headers(record.macaroon, record.bolt11):
                headers.add(hdrs.WWW_AUTHENTICATE, value)
        if digest is not None and offer.charge is not None:
            headers.add(hdrs.WWW_AUTHENTICATE, offer.charge.header(self.binder, record.bolt11, record.payment_hash,
                                                                   record.expires_at, record.token_id, digest))
        return response


async def _add_paid_headers(request: web.Request, response: web.StreamResponse) -> None:
    paid = request.get(PAID)
    if paid is not None:
        response.headers.update(paid.headers)
        make_private(response.headers)


def _as_canonical(request: web.Request, target: Target) -> web.Request:
    """The request as a price hook should see it: with its canonical path."""
    if target.path == request.path:
        return request
    from yarl import URL
    return request.clone(rel_url=URL(target.path_qs, encoded=True))


def _route_pattern(request: web.Request) -> str:
    info = request.match_info.route.resource
    canonical = info.canonical if info is not None else request.path
    return canonical if canonical.startswith("/") else request.path
