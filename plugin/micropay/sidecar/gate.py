"""The payment gate: admit a request with a valid L402 credential, or answer 402.

Usable as aiohttp middleware (`gate.middleware`, priced by the config's routes) and
as a decorator on a handler (`@gate.require(price_msat=...)`).

Hot path for a pass token: parse header -> cached verification -> caveat check ->
handler -> cached receipt header. No node call, no store access. Credit tokens add
one atomic store statement (the debit).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from aiohttp import hdrs, web

from ..config import ChallengeLimits
from ..errors import (BadRequest, CreditsExhausted, InvalidCredential, MicropayError,
                      NodeError, Overloaded, RateLimited, UpstreamError)
from ..l402 import PROBLEM_CONTENT_TYPE, challenge_headers, payment_required_body
from ..lightning.base import Node
from ..pricing import Pricing, RouteRule
from ..receipts import RECEIPT_HEADER, ReceiptSigner
from ..store import ChallengeRecord, Store
from ..tokens import TokenService, VerifiedToken
from .guard import FreeTier, TokenBucket
from .metrics import Metrics
from .responses import problem_response

log = logging.getLogger("micropay.gate")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ADMITTED_CACHE_SIZE = 100_000


@dataclass(frozen=True, slots=True)
class Paid:
    """What the gate attaches to an admitted request (request[PAID])."""

    route_key: str
    token: VerifiedToken
    headers: dict[str, str]          # Payment-Receipt (+ Payment-Credits-Remaining)
    valid_until: int | None


PAID = web.RequestKey("micropay_paid", Paid) if hasattr(web, "RequestKey") else "micropay_paid"
REUSE_MIN_REMAINING_S = 60     # reuse a pending challenge only if it has this long left


STREAM_HEADER = "X-Micropay-Stream"
STREAM_ID = re.compile(r"[A-Za-z0-9._/-]{1,128}")


class StreamBalanceLow(MicropayError):
    code = "stream_balance_low"
    http_status = 402


class PricingUnavailable(MicropayError):
    code = "pricing_unavailable"
    http_status = 503


class Gate:
    def __init__(self, *, tokens: TokenService, node: Node, store: Store,
                 receipts: ReceiptSigner, limits: ChallengeLimits, metrics: Metrics | None = None,
                 pricing: Pricing | None = None, trust_forwarded_for: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.tokens, self.node, self.store = tokens, node, store
        self.service = tokens.service   # caveats are minted and checked under one name
        self.receipts, self.limits, self.clock = receipts, limits, clock
        self.metrics = metrics or Metrics()
        self.pricing = pricing or Pricing([])
        self.trust_forwarded_for = trust_forwarded_for
        self.bucket = TokenBucket(limits.per_client_per_minute)
        self.free_tier = FreeTier(clock)
        self._pass_receipts: dict[tuple[bytes, str], str] = {}
        self._admitted: dict[tuple[str, str, str], Paid] = {}

    # -- aiohttp integration ---------------------------------------------
    async def dispatch(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Price the request by the config's routes and admit, challenge or refuse it.
        Any MicropayError raised below (e.g. an unreachable upstream) becomes its JSON
        problem response."""
        try:
            auth = request.headers.get(hdrs.AUTHORIZATION)
            if auth is not None:
                hit = self._admitted.get((auth, request.method, request.raw_path))
                if hit is not None and (hit.valid_until is None or self.clock() <= hit.valid_until):
                    return await self._serve(request, handler, hit, None)
            rule = self.pricing.match(request.method, request.path)
            if rule is None:
                return await handler(request)
            return await self.handle(request, rule, handler)
        except MicropayError as err:
            return problem_response(err)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        return await self.dispatch(request, handler)

    def guard(self, handler: Handler) -> Handler:
        """Wrap one handler with the gate. Cheaper than the middleware (aiohttp adds two
        layers per request once an app has any middleware); the sidecar uses this."""
        admitted, clock, paid = self._admitted, self.clock, self.metrics.paid_requests

        @functools.wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            # Inline fast path for an already-admitted pass credential (see dispatch).
            auth = request.headers.get(hdrs.AUTHORIZATION)
            if auth is not None:
                hit = admitted.get((auth, request.method, request.raw_path))
                if hit is not None and (hit.valid_until is None or clock() <= hit.valid_until):
                    request[PAID] = hit
                    response = await handler(request)
                    paid[hit.route_key] += 1
                    if not response.prepared:
                        response.headers[RECEIPT_HEADER] = hit.headers[RECEIPT_HEADER]
                    return response
            return await self.dispatch(request, handler)
        return guarded

    def require(self, price_msat: int = 0, *, path: str | None = None, credits: int | None = 1,
                pass_s: int | None = None, capabilities: tuple[str, ...] = (),
                price_hook: Callable | None = None, description: str = "") -> Callable[[Handler], Handler]:
        """Decorator for one handler. `path` defaults to the request's route pattern."""
        def wrap(handler: Handler) -> Handler:
            @functools.wraps(handler)
            async def gated(request: web.Request) -> web.StreamResponse:
                pattern = path or _route_pattern(request)
                rule = RouteRule(path=pattern, price_msat=price_msat, methods=None,
                                 credits=None if pass_s else credits, pass_s=pass_s,
                                 capabilities=frozenset(capabilities), description=description,
                                 price_hook=price_hook)
                return await self.handle(request, rule, handler)
            return gated
        return wrap

    # -- the gate ----------------------------------------------------------
    def client_key(self, request: web.Request) -> str:
        if self.trust_forwarded_for:
            fwd = request.headers.get("X-Forwarded-For")
            if fwd:
                return fwd.split(",")[0].strip()[:64]
        return request.remote or "unknown"

    async def handle(self, request: web.Request, rule: RouteRule, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            auth = request.headers.get(hdrs.AUTHORIZATION)
            token = self.tokens.verify_header(auth, request.method, request.path, rule.capabilities)
            if token is None:
                if rule.free_per_hour and self.free_tier.take(self.client_key(request), rule.key,
                                                              rule.free_per_hour):
                    self.metrics.free_requests[rule.key] += 1
                    return await handler(request)
                stream_id = request.headers.get(STREAM_HEADER)
                if stream_id is not None and rule.stream_msat:
                    return await self._serve_streamed(request, rule, handler, stream_id)
                return await self.challenge(request, rule)
            if rule.path not in token.constraints.paths:
                raise InvalidCredential("token was issued for another route", route=rule.path)
            remaining = None
            if token.constraints.credits is not None:
                remaining = await self.store.debit_credit(token.token_id_hex, token.constraints.credits)
                if remaining is None:
                    raise CreditsExhausted(
                        "all prepaid credits of this token are spent; retry without the "
                        "Authorization header to get a new invoice", token_id=token.token_id_hex)
        except MicropayError as err:
            self.metrics.rejections[err.code] += 1
            return problem_response(err)
        finally:
            self.metrics.observe_latency(time.perf_counter() - started)
        admitted = Paid(rule.key, token, {RECEIPT_HEADER: self._receipt(token, request, remaining)},
                             token.constraints.valid_until)
        if remaining is None:
            # A pass token admitted for this method and path stays admitted until it
            # expires: later requests skip parsing, verification and route matching.
            if len(self._admitted) >= ADMITTED_CACHE_SIZE:
                self._admitted.clear()
            self._admitted[(auth, request.method, request.raw_path)] = admitted
        return await self._serve(request, handler, admitted, remaining)

    async def _serve(self, request: web.Request, handler: Handler, admitted: "Paid",
                     remaining: int | None) -> web.StreamResponse:
        if remaining is not None:
            admitted = Paid(admitted.route_key, admitted.token,
                            dict(admitted.headers, **{"Payment-Credits-Remaining": str(remaining)}), None)
        headers = admitted.headers
        request[PAID] = admitted        # for streamed responses, see on_response_prepare
        try:
            response = await handler(request)
        except UpstreamError:
            if remaining is not None:   # the request was not served: give the credit back
                await self.store.refund_credit(admitted.token.token_id_hex)
            raise
        self.metrics.paid_requests[admitted.route_key] += 1
        if not response.prepared:
            response.headers.update(headers)
        return response

    async def _serve_streamed(self, request: web.Request, rule: RouteRule, handler: Handler,
                              stream_id: str) -> web.StreamResponse:
        """Metered access paid by an incoming payment stream (see streams.py): each
        request spends rule.stream_msat of what the stream has paid this node so far."""
        if not STREAM_ID.fullmatch(stream_id):
            raise BadRequest(f"{STREAM_HEADER} must be 1-128 of A-Z a-z 0-9 . _ / -")
        left = await self.store.debit_stream(stream_id, rule.stream_msat)  # type: ignore[arg-type]
        if left is None:
            received, used = await self.store.stream_balance(stream_id)
            raise StreamBalanceLow(
                f"stream {stream_id} has {received - used} msat left; this costs {rule.stream_msat} msat",
                received_msat=received, used_msat=used, price_msat=rule.stream_msat)
        receipt = self.receipts.sign({"v": 1, "type": "stream", "service": self.service, "stream_id": stream_id,
                                      "method": request.method, "path": request.path,
                                      "amount_msat": rule.stream_msat, "balance_msat": left,
                                      "ts": int(self.clock())})
        response = await handler(request)
        self.metrics.paid_requests[rule.key] += 1
        if not response.prepared:
            response.headers[RECEIPT_HEADER] = receipt
            response.headers["Payment-Stream-Balance"] = str(left)
        return response

    def install(self, app: web.Application, *, middleware: bool = True) -> None:
        """Add the gate to someone else's app: the pricing middleware (unless only the
        decorator is used) and the hook that puts receipts on streamed responses too."""
        if middleware:
            app.middlewares.append(self.middleware)
        app.on_response_prepare.append(_add_paid_headers)

    def _receipt(self, token: VerifiedToken, request: web.Request, remaining: int | None) -> str:
        if remaining is None:
            # Pass tokens: one receipt per token and route, signed once.
            key = (token.token_id, token.constraints.paths[0])
            cached = self._pass_receipts.get(key)
            if cached is None:
                if len(self._pass_receipts) > 100_000:
                    self._pass_receipts.clear()
                cached = self._pass_receipts[key] = self.receipts.sign({
                    "v": 1, "type": "pass", "service": self.service,
                    "payment_hash": token.payment_hash.hex(), "token_id": token.token_id_hex,
                    "scope": key[1], "valid_until": token.constraints.valid_until,
                    "issued_at": int(self.clock())})
            return cached
        return self.receipts.sign({
            "v": 1, "type": "request", "service": self.service,
            "payment_hash": token.payment_hash.hex(), "token_id": token.token_id_hex,
            "method": request.method, "path": request.path, "credits_remaining": remaining,
            "ts": int(self.clock())})

    async def challenge(self, request: web.Request, rule: RouteRule) -> web.StreamResponse:
        client = self.client_key(request)
        try:
            price = await rule.price_for(request)
        except Exception as exc:
            log.error("price hook for %s failed: %s", rule.key, exc)
            raise PricingUnavailable("the price for this resource cannot be computed right now") from None
        now = int(self.clock())
        record, pending, pending_mine = await self.store.admission(
            client, rule.key, price, now, now + REUSE_MIN_REMAINING_S)
        if record is not None:
            self.metrics.challenges_reused[rule.key] += 1
            return self._challenge_response(request, rule, record)
        wait = self.bucket.take(client)
        if wait:
            raise RateLimited("too many new invoices requested; pay or wait", retry_after_s=int(wait) + 1)
        if pending >= self.limits.max_pending:
            raise Overloaded("too many unpaid invoices outstanding; try again later", retry_after_s=30)
        if pending_mine >= self.limits.max_pending_per_client:
            raise RateLimited("too many unpaid invoices for this client", retry_after_s=60)
        token_id = os.urandom(32)
        try:
            invoice = await self.node.create_invoice(
                price, label=f"micropay-{token_id.hex()}",
                description=rule.description or f"{self.service}: {request.method} {request.path}"[:200],
                expiry_s=self.limits.expiry_s)
        except NodeError as exc:
            log.error("creating an invoice failed: %s", exc)
            raise
        mac = self.tokens.mint(bytes.fromhex(invoice.payment_hash), rule.caveats(self.service, now), token_id)
        record = ChallengeRecord(invoice.payment_hash, token_id.hex(), rule.key, client, price,
                                 invoice.bolt11, mac.serialize(), now, invoice.expires_at, rule.credits)
        await self.store.add_challenge(record)
        self.metrics.challenges[rule.key] += 1
        return self._challenge_response(request, rule, record)

    def _challenge_response(self, request: web.Request, rule: RouteRule,
                            record: ChallengeRecord) -> web.Response:
        body = payment_required_body(
            resource=f"{request.method} {request.path}", price_msat=record.price_msat,
            invoice=record.bolt11, payment_hash=record.payment_hash, expires_at=record.expires_at,
            macaroon=record.macaroon, credits=rule.credits,
            valid_until=(record.created_at + rule.pass_s) if rule.pass_s else None,
            description=rule.description)
        response = web.Response(status=402, text=json.dumps(body), content_type=PROBLEM_CONTENT_TYPE,
                                headers={"Cache-Control": "no-store"})
        for value in challenge_headers(record.macaroon, record.bolt11):
            response.headers.add(hdrs.WWW_AUTHENTICATE, value)
        return response


async def _add_paid_headers(request: web.Request, response: web.StreamResponse) -> None:
    paid = request.get(PAID)
    if paid is not None:
        response.headers.update(paid.headers)


def _route_pattern(request: web.Request) -> str:
    info = request.match_info.route.resource
    canonical = info.canonical if info is not None else request.path
    return canonical if canonical.startswith("/") else request.path
