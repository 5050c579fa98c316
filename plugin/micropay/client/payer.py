"""An HTTP client that pays L402 challenges automatically, within budgets.

On a 402 it decodes the invoice itself (bolt11), refuses it if the amount differs from
the advertised price or the payment hash differs from the token's, checks the budgets,
pays through a Wallet, and retries with the credential. Tokens and the spending ledger
are persisted (mode 0600), so credits are reused across runs and budgets hold across
runs. A payment is recorded under its payment hash before and after paying, so a crash
and a retry never count (or, with an idempotent wallet, pay) the same invoice twice.

Paying from a node (NodeWallet), a payment is first settled from the node's own record
of it, by the rule every payer shares (lightning/outcome.py): complete -> paid, not
paid again; pending with an HTLC -> waited for; pending with no HTLC behind it (a
lightningd killed between recording it and sending it) -> seen so twice, a grace
apart (the first sighting is kept in the ledger, so separate runs count), it is dead:
nothing was paid, the budget it held is given back, and the invoice is remembered as
one this node cannot pay (lightningd refuses its hash while the dead record is there).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from ..core.errors import (BadRequest, BudgetExceeded, ForeignChallenge, InvoiceMismatch,
                           PaymentFailed, PaymentUnknown, RequestFailed, ResponseTooLarge)
from ..core.inputs import load_json, read_bounded
from ..l402.wire import Challenge, format_authorization, parse_challenges
from ..lightning.outcome import Outcome, Settled
from ..lightning.bolt11codec import decode_invoice

log = logging.getLogger("micropay.client")     # what it does, request by request (`micropay get -v`)
BUDGET_HINT = "`micropay budget show` lists what it counts; `micropay budget reset` starts it over"
from ..l402.macaroon import Macaroon
from ..payment import scheme as payment_auth
from ..core.receipts import RECEIPT_HEADER, InvalidReceipt, verify_receipt
from ..l402.tokens import decode_identifier, parse_caveats
from .tokencache import CachedToken, ClientState, Spend, TokenCache
from .wallets import NodeWallet, PaidInvoice, PaymentNeverLeft, SandboxHttpWallet, Wallet

__all__ = ["BUDGET_HINT", "DAY_S", "DEAD_KEPT_S", "DEFAULT_MAX_BODY", "MAX_CHALLENGE_BODY", "Budget", "CachedToken",
           "ClientState", "L402Client", "NodeWallet", "PaidInvoice", "PaymentNeverLeft", "Result",
           "SandboxHttpWallet", "Spend", "TokenCache", "Wallet", "challenge_invoice"]

DAY_S = 86400
MAX_CHALLENGE_BODY = 64 * 1024          # a 402/401 body: only its price is read
DEFAULT_MAX_BODY = 32 * 1024 * 1024     # the answer the caller asked for
DEAD_KEPT_S = 14 * DAY_S                # how long an invoice found dead at the node is remembered


@dataclass(frozen=True)
class Budget:
    """Limits in msat; None means no limit. Negative limits are refused."""

    max_per_request_msat: int | None = 10_000
    max_per_host_per_day_msat: int | None = 100_000
    max_total_msat: int | None = 1_000_000
    max_fee_msat: int = 1_000

    def __post_init__(self) -> None:
        for name in ("max_per_request_msat", "max_per_host_per_day_msat", "max_total_msat", "max_fee_msat"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise BadRequest(f"budget {name} must be a non-negative integer, got {value!r}")


# -- the client ------------------------------------------------------------------

@dataclass
class Result:
    status: int
    headers: dict[str, str]
    body: bytes
    paid_msat: int = 0
    fee_msat: int = 0
    receipt: dict[str, Any] | None = None
    payment_hash: str | None = None
    receipt_error: str | None = None     # a receipt came but did not verify
    used_token: bool = False             # served on a token cached by an earlier payment

    def json(self) -> Any:
        return json.loads(self.body)


class L402Client:
    def __init__(self, wallet: Wallet, budget: Budget = Budget(), cache: TokenCache | None = None,
                 session: aiohttp.ClientSession | None = None, on_event: Callable[[str], None] | None = None,
                 receipt_pubkey: str | None = None, clock: Callable[[], float] = time.time,
                 max_body_bytes: int = DEFAULT_MAX_BODY, prefer_payment: bool = False) -> None:
        """`prefer_payment`: when a 402 offers both L402 and the "Payment" scheme (MPP
        charge) on one invoice, answer with Payment. By default L402 is preferred: its
        token can be reused (credits, passes), a Payment credential serves one request."""
        self.wallet, self.budget = wallet, budget
        self.prefer_payment = prefer_payment
        self.cache = cache or TokenCache(None)
        self._session, self.clock = session, clock
        self.on_event = on_event or (lambda msg: None)
        self.receipt_pubkey = receipt_pubkey
        self.max_body_bytes = max_body_bytes

    async def request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                      data: bytes | None = None) -> Result:
        parts = urlsplit(url)
        origin, path = f"{parts.scheme}://{parts.netloc}", parts.path or "/"
        method = method.upper()
        async with contextlib.AsyncExitStack() as stack:
            session = self._session or await stack.enter_async_context(aiohttp.ClientSession())
            token = self._find_token(origin, method, path, parts.query) or \
                await self._resume(origin, method, path, parts.query)
            paid = PaidInvoice("", 0, 0)
            payment_hash = None
            one_shot = None if token is not None else await self._resume_charge(origin, method, path)
            log.debug("%s %s: %s", method, url, "a cached token covers it" if token is not None else (
                "presenting a Payment credential paid by an earlier run" if one_shot is not None
                else "no cached token covers it"))
            for _attempt in range(3):  # cached token -> fresh challenge -> paid retry
                hdrs = dict(headers or {})
                if token is not None:
                    hdrs["Authorization"] = format_authorization(token.macaroon, token.preimage)
                elif one_shot is not None:
                    hdrs["Authorization"] = one_shot
                try:
                    async with session.request(method, url, headers=hdrs, data=data) as resp:
                        status, resp_headers = resp.status, resp.headers
                        body = await self._read_body(resp, status in (401, 402))
                        answered_by = resp.url.origin()
                except (aiohttp.ClientError, ValueError, TimeoutError) as exc:
                    raise RequestFailed(f"{method} {url}: {exc or type(exc).__name__}") from None
                log.debug("sent %s %s (%s) -> HTTP %d, %d body bytes", method, url,
                          hdrs["Authorization"].partition(" ")[0] + " credential" if "Authorization" in hdrs
                          else "no credential", status, len(body))
                offered = resp_headers.getall("WWW-Authenticate", [])
                challenges = parse_challenges(offered)
                charge = next((c for c in payment_auth.parse_challenges(offered)
                               if c.method == payment_auth.METHOD and c.intent == payment_auth.CHARGE), None)
                if status not in (401, 402):
                    left = resp_headers.get("Payment-Credits-Remaining")
                    if token is not None and not paid.amount_msat and status < 400:
                        self.on_event(f"used the cached token for {method} {path}"
                                      + (f": {left} credit{'' if left == '1' else 's'} left" if left is not None
                                         else ""))
                    if token is not None and left == "0":
                        self._drop_token(token)   # spent its last credit
                    return self._result(status, resp_headers, body, paid, payment_hash,
                                        charged=one_shot is not None and token is None,
                                        used_token=token is not None and not paid.amount_msat)
                if one_shot is not None:
                    self.on_event(f"{status} for the Payment credential of {method} {path}: {_problem_detail(body)}")
                    one_shot = None
                    if paid.amount_msat:
                        return self._result(status, resp_headers, body, paid, payment_hash)
                if token is not None:
                    self.on_event(f"{status} with cached token for {method} {path}: "
                                  f"{_problem_detail(body)}; dropping it")
                    self._drop_token(token)
                    token = None
                    if not challenges:
                        continue
                if status == 401 or not (challenges or charge) or paid.amount_msat:
                    return self._result(status, resp_headers, body, paid, payment_hash)
                if answered_by != URL(url).origin():
                    raise ForeignChallenge(f"the 402 came from {answered_by} after a redirect from {origin}; "
                                           "not paying a server other than the one asked (request that "
                                           "URL directly to pay it)")
                if charge is not None and (self.prefer_payment or not challenges):
                    one_shot, paid, payment_hash = await self._pay_charge(origin, parts.netloc, method, path,
                                                                          charge, body)
                    continue
                token, paid, payment_hash = await self._pay(origin, parts.netloc, method, path,
                                                            challenges[0], body)
            return self._result(status, resp_headers, body, paid, payment_hash)

    async def get(self, url: str, **kw: Any) -> Result:
        return await self.request("GET", url, **kw)

    async def _read_body(self, resp: aiohttp.ClientResponse, challenge: bool) -> bytes:
        """The body, read up to a bound: a challenge body only needs its price, and an
        answer larger than max_body_bytes is refused rather than held in memory."""
        limit = MAX_CHALLENGE_BODY if challenge else self.max_body_bytes
        body, complete = await read_bounded(resp.content, limit)
        if complete:
            return body
        if challenge:
            return b""          # no advertised price: the invoice's amount is still checked
        raise ResponseTooLarge(f"the response body is larger than {limit} bytes; not reading it")

    # -- internals -----------------------------------------------------------
    def _find_token(self, origin: str, method: str, path: str, query: str = "") -> CachedToken | None:
        now = self.clock()
        for t in self.cache.state.tokens:
            if t.covers(origin, method, path, now, query):
                return t
        return None

    def _drop_token(self, token: CachedToken) -> None:
        with self.cache.locked() as state:
            for t in state.tokens:
                if t.macaroon == token.macaroon:
                    t.usable = False

    async def _pay(self, origin: str, host: str, method: str, path: str, ch: Challenge,
                   body: bytes) -> tuple[CachedToken, PaidInvoice, str]:
        inv = decode_invoice(ch.invoice)
        mac = Macaroon.deserialize(ch.macaroon)
        token_hash, _ = decode_identifier(mac.identifier)
        if token_hash.hex() != inv.payment_hash:
            raise InvoiceMismatch("the invoice's payment hash differs from the token's; not paying")
        if inv.amount_msat is None:
            raise InvoiceMismatch("the invoice has no amount; not paying")
        advertised = _advertised_price(body)
        if advertised is not None and advertised != inv.amount_msat:
            raise InvoiceMismatch(f"the invoice asks {inv.amount_msat} msat but the price is "
                                  f"{advertised} msat; not paying")
        now = self.clock()
        if now > inv.expires_at:
            raise PaymentFailed("the invoice has expired")
        amount = inv.amount_msat
        self.on_event(f"402 for {method} {path}: invoice for {amount} msat "
                      f"(payment_hash {inv.payment_hash[:16]}…, {inv.description!r})")
        intent = self._reserve(Spend(inv.payment_hash, host, amount, self.budget.max_fee_msat, int(now), "paying",
                                     origin, ch.invoice, ch.macaroon), now)
        token, paid = await self._complete(intent)
        self.on_event(f"paid {paid.amount_msat} msat + {paid.fee_msat} msat fee; "
                      f"spent today at {host}: {self.cache.spent(host, now - DAY_S)} msat")
        return token, paid, inv.payment_hash

    def _reserve(self, intent: Spend, now: float, per_request_msat: int | None = None) -> Spend:
        """Record the intent to pay before paying (within the budgets), or return the one
        an earlier run recorded for the same invoice; never an invoice already paid.
        `per_request_msat`: what the per-request budget applies to, when the payment
        buys more than one request (a session's deposit: its unit price)."""
        with self.cache.locked() as state:
            known = state.spends.get(intent.payment_hash)
            if known is not None and known.status == "paid":
                raise PaymentFailed("the server sent an invoice this client has already paid; "
                                    "not paying twice")
            if known is None and intent.payment_hash in state.dead:
                raise PaymentNeverLeft("the server sent an invoice whose earlier payment is dead at this node "
                                       "(recorded, never sent); the node cannot pay it: ask for a new one")
            if known is None:
                self._check_budget(intent.host, intent.amount_msat, now, per_request_msat)
                state.spends[intent.payment_hash] = known = intent
            return known

    async def _complete(self, intent: Spend) -> tuple[CachedToken, PaidInvoice]:
        """Pay a recorded intent and turn it into a cached token. Wallets are idempotent
        per invoice (paying a paid invoice returns its preimage), so this is safe to repeat.
        A wallet that pays from a node settles an earlier attempt from the node's record
        first (see the module's docstring); a dead one raises PaymentNeverLeft."""
        paid = await self._from_node_record(intent)
        try:
            if paid is None:
                paid = await self.wallet.pay(intent.bolt11, intent.amount_msat, self.budget.max_fee_msat)
        except PaymentFailed:
            self._release(intent)                # the wallet says nothing was paid
            raise
        except PaymentUnknown:
            if intent.orphan_since is None:
                raise
            paid = await self._from_node_record(intent)   # the node waited on it: dead by now?
            if paid is None:
                raise
        # Any other error (the wallet unreachable, the connection to the node lost) says
        # nothing of the payment: the intent stays recorded, counted in the budgets, and
        # the next run finishes it (paying a paid invoice returns its preimage).
        if hashlib.sha256(bytes.fromhex(paid.preimage)).hexdigest() != intent.payment_hash:
            raise PaymentFailed("the wallet returned a preimage that does not match the invoice")
        token = None
        if intent.macaroon:
            mac = Macaroon.deserialize(intent.macaroon)
            token = _token_from(intent.origin, mac, intent.macaroon, paid.preimage, intent.payment_hash)
        with self.cache.locked() as state:
            state.spends[intent.payment_hash] = Spend(intent.payment_hash, intent.host, paid.amount_msat,
                                                      paid.fee_msat, intent.ts, "paid")
            if token is not None and not any(t.macaroon == token.macaroon for t in state.tokens):
                state.tokens.append(token)
        return token, paid  # type: ignore[return-value]

    def _release(self, intent: Spend, dead: bool = False) -> None:
        """Nothing of the intent was paid: give its reservation back to the budgets."""
        with self.cache.locked() as state:
            known = state.spends.get(intent.payment_hash)
            if known is not None and known.status == "paying":
                del state.spends[intent.payment_hash]
            if dead:
                now = int(self.clock())
                state.dead[intent.payment_hash] = now
                for h in [h for h, t in state.dead.items() if t < now - DEAD_KEPT_S]:
                    del state.dead[h]          # its invoice expired long ago

    async def _from_node_record(self, intent: Spend) -> PaidInvoice | None:
        """The node's record of an earlier attempt at this intent, by the shared rule:
        complete -> what it paid; dead -> released and PaymentNeverLeft; otherwise None
        (pay it: the node pays a hash once, and waits on an attempt still in flight).
        The first sighting of a pending record with no HTLC is kept in the ledger."""
        settle = getattr(self.wallet, "settle", None)
        if settle is None:
            return None
        now = self.clock()
        found: Settled = await settle(intent.payment_hash, intent.orphan_since, now)
        if found.outcome is Outcome.SUCCEEDED and found.payment is not None:
            return PaidInvoice(found.payment.preimage, found.payment.amount_msat, found.payment.fee_msat)
        if found.orphaned:
            self._release(intent, dead=True)
            self.on_event(f"an earlier payment ({intent.payment_hash[:16]}…) is dead at the node: {found.detail}; "
                          f"nothing was paid and its {intent.amount_msat} msat are back in the budgets")
            raise PaymentNeverLeft(f"the payment is dead at this node: {found.detail}; nothing was paid and "
                                   "the budget it held is given back")
        since = None if found.orphan_since is None else int(found.orphan_since)
        if since != intent.orphan_since:
            intent.orphan_since = since
            with self.cache.locked() as state:
                known = state.spends.get(intent.payment_hash)
                if known is not None and known.status == "paying":
                    known.orphan_since = since
        return None

    async def _resume(self, origin: str, method: str, path: str, query: str = "") -> CachedToken | None:
        """Finish a payment that an earlier run recorded but did not see through."""
        now = self.clock()
        for intent in list(self.cache.state.spends.values()):
            if intent.status != "paying" or intent.origin != origin or not intent.macaroon:
                continue
            candidate = _token_from(origin, Macaroon.deserialize(intent.macaroon), intent.macaroon,
                                    "", intent.payment_hash)
            if candidate.covers(origin, method, path, now, query):
                self.on_event(f"finishing an interrupted payment ({intent.payment_hash[:16]}…)")
                try:
                    token, _ = await self._complete(intent)
                except PaymentNeverLeft:
                    continue                     # nothing was paid: a fresh challenge is asked for
                return token
        return None

    async def _pay_charge(self, origin: str, host: str, method: str, path: str, ch: payment_auth.Challenge,
                          body: bytes) -> tuple[str, PaidInvoice, str]:
        """Pay a Payment (MPP, Lightning charge) challenge within the budgets; returns the
        one-shot Authorization value. The same checks as for L402: the invoice is the
        authority, and its hash, amount and expiry must agree with what the challenge says."""
        try:
            request = payment_auth.decode_request(ch)
            details = request["methodDetails"]
            invoice, sats = details["invoice"], int(request["amount"])
            if request.get("currency") != "sat" or not isinstance(invoice, str):
                raise ValueError("not a sat-denominated charge")
        except (ValueError, KeyError, TypeError):
            raise InvoiceMismatch("the Payment challenge's request cannot be read; not paying") from None
        inv = challenge_invoice(invoice, details.get("paymentHash"))
        if inv.amount_msat is None or inv.amount_msat != sats * 1000:
            raise InvoiceMismatch(f"the invoice asks {inv.amount_msat} msat but the challenge says {sats} sat; "
                                  "not paying")
        advertised = _advertised_price(body)
        if advertised is not None and advertised != inv.amount_msat:
            raise InvoiceMismatch(f"the invoice asks {inv.amount_msat} msat but the price is "
                                  f"{advertised} msat; not paying")
        now = self.clock()
        try:
            expires = payment_auth.parse_rfc3339(ch.expires) if ch.expires else inv.expires_at
        except ValueError:
            raise InvoiceMismatch("the Payment challenge's expires is not an RFC 3339 time; not paying") from None
        if now >= min(expires, inv.expires_at):
            raise PaymentFailed("the challenge has expired")
        self.on_event(f"402 for {method} {path}: Payment charge of {inv.amount_msat} msat "
                      f"(payment_hash {inv.payment_hash[:16]}…, {inv.description!r})")
        intent = self._reserve(Spend(inv.payment_hash, host, inv.amount_msat, self.budget.max_fee_msat, int(now),
                                     "paying", origin, invoice, "", ch.echo(), f"{method} {path}"), now)
        _, paid = await self._complete(intent)
        self.on_event(f"paid {paid.amount_msat} msat + {paid.fee_msat} msat fee; "
                      f"spent today at {host}: {self.cache.spent(host, now - DAY_S)} msat")
        return payment_auth.format_credential(ch, paid.preimage), paid, inv.payment_hash

    async def _resume_charge(self, origin: str, method: str, path: str) -> str | None:
        """Finish a Payment charge an earlier run recorded for this request but did not
        see through, and present it (the credential is good until the challenge expires)."""
        for intent in list(self.cache.state.spends.values()):
            if (intent.status == "paying" and intent.challenge and intent.origin == origin
                    and intent.resource == f"{method} {path}"):
                self.on_event(f"finishing an interrupted payment ({intent.payment_hash[:16]}…)")
                ch = payment_auth.Challenge(**{k: intent.challenge.get(k, "")
                                               for k in payment_auth.ECHO_FIELDS})
                try:
                    _, paid = await self._complete(intent)
                except PaymentNeverLeft:
                    continue                     # nothing was paid: a fresh challenge is asked for
                return payment_auth.format_credential(ch, paid.preimage)
        return None

    def _check_budget(self, host: str, amount: int, now: float, per_request_msat: int | None = None) -> None:
        b = self.budget
        worst = amount + b.max_fee_msat
        per_request = amount if per_request_msat is None else per_request_msat
        if b.max_per_request_msat is not None and per_request > b.max_per_request_msat:
            raise BudgetExceeded(f"price {per_request} msat is over the per-request budget "
                                 f"{b.max_per_request_msat} msat")
        if b.max_per_host_per_day_msat is not None:
            spent = self.cache.spent(host, now - DAY_S)
            if spent + worst > b.max_per_host_per_day_msat:
                raise BudgetExceeded(f"paying {amount} msat (+ up to {b.max_fee_msat} msat fee) would pass "
                                     f"the daily budget for {host}: {spent} of "
                                     f"{b.max_per_host_per_day_msat} msat spent in the last 24 hours, fees "
                                     f"included ({BUDGET_HINT})")
        if b.max_total_msat is not None:
            spent = self.cache.spent(None, 0)
            if spent + worst > b.max_total_msat:
                raise BudgetExceeded(f"paying {amount} msat (+ up to {b.max_fee_msat} msat fee) would pass "
                                     f"the total budget: {spent} of {b.max_total_msat} msat spent, fees "
                                     f"included ({BUDGET_HINT})")

    def _result(self, status: int, headers: Any, body: bytes, paid: PaidInvoice,
                payment_hash: str | None, charged: bool = False, used_token: bool = False) -> Result:
        receipt = error = None
        raw = headers.get(RECEIPT_HEADER)
        if raw and charged:
            # The Payment scheme's receipt: base64url JSON naming the payment, not signed.
            try:
                doc = payment_auth.decode_object(raw)
                if doc.get("status") != "success" or (payment_hash and doc.get("reference") != payment_hash):
                    raise ValueError("it does not name this payment as a success")
                receipt = doc
                self.on_event(f"Payment receipt for {doc.get('reference', '')[:16]}…")
            except ValueError as exc:
                error = f"the Payment-Receipt cannot be read: {exc}"
                self.on_event(error)
        elif raw:
            try:
                receipt = verify_receipt(raw, self.receipt_pubkey)
                self.on_event(f"receipt verified (signed by {receipt['pubkey'][:16]}…)")
            except InvalidReceipt as exc:
                error = exc.message
                self.on_event(f"receipt did not verify: {exc.message}")
        return Result(status, dict(headers), body, paid.amount_msat, paid.fee_msat, receipt, payment_hash, error,
                      used_token)


def challenge_invoice(invoice: str, payment_hash: Any) -> Any:
    """The decoded invoice a Payment challenge names, refused if the challenge's
    `paymentHash` (when given) is not the invoice's: the invoice is the authority."""
    inv = decode_invoice(invoice)
    if payment_hash is not None and payment_hash != inv.payment_hash:
        raise InvoiceMismatch("the challenge's paymentHash differs from the invoice's; not paying")
    return inv


def _advertised_price(body: bytes) -> int | None:
    try:
        doc = load_json(body)
    except BadRequest:
        return None
    price = doc.get("price_msat") if isinstance(doc, dict) else None
    return price if isinstance(price, int) and not isinstance(price, bool) else None


def _problem_detail(body: bytes) -> str:
    try:
        doc = load_json(body)
        return str(doc.get("detail") or doc.get("error"))[:200]
    except (BadRequest, AttributeError):
        return "no detail"


def _token_from(origin: str, mac: Macaroon, mac_b64: str, preimage: str, payment_hash: str) -> CachedToken:
    """What the client keeps of a token: the scope its caveats give, read as the server
    reads them (tokens.parse_caveats), but leniently: what does not parse is skipped."""
    c = parse_caveats(mac.caveats, service=None, lenient=True)
    return CachedToken(origin, mac_b64, preimage, payment_hash, list(c.paths),
                       sorted(c.methods) if c.methods is not None else None, c.valid_until, c.credits, True,
                       sorted(c.queries) if c.queries is not None else None)
