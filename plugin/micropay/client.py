"""An HTTP client that pays L402 challenges automatically, within budgets.

On a 402 it decodes the invoice itself (bolt11), refuses it if the amount differs from
the advertised price or the payment hash differs from the token's, checks the budgets,
pays through a Wallet, and retries with the credential. Tokens and the spending ledger
are persisted (mode 0600), so credits are reused across runs and budgets hold across
runs. A payment is recorded under its payment hash before and after paying, so a crash
and a retry never count (or, with an idempotent wallet, pay) the same invoice twice.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit

import aiohttp

from .errors import BudgetExceeded, InvoiceMismatch, MicropayError, PaymentFailed
from .l402 import Challenge, format_authorization, parse_challenges
from .lightning.base import Node
from .lightning.bolt11codec import decode_invoice
from .macaroon import Macaroon
from .patterns import path_matches
from .receipts import RECEIPT_HEADER, InvalidReceipt, verify_receipt
from .secretfile import read_secret, write_secret
from .tokens import decode_identifier

DAY_S = 86400


@dataclass(frozen=True)
class Budget:
    max_per_request_msat: int | None = 10_000
    max_per_host_per_day_msat: int | None = 100_000
    max_total_msat: int | None = 1_000_000
    max_fee_msat: int = 1_000


@dataclass(frozen=True)
class PaidInvoice:
    preimage: str
    amount_msat: int
    fee_msat: int


class Wallet(Protocol):
    async def pay(self, bolt11: str, amount_msat: int, max_fee_msat: int) -> PaidInvoice: ...


class NodeWallet:
    """Pays with any Node adapter (an in-process sandbox node, or a CLN node)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def pay(self, bolt11: str, amount_msat: int, max_fee_msat: int) -> PaidInvoice:
        p = await self.node.pay(bolt11, max_fee_msat=max_fee_msat)
        return PaidInvoice(p.preimage, p.amount_msat, p.fee_msat)


class SandboxHttpWallet:
    """A sandbox wallet exposed by a sidecar in sandbox mode: .../sandbox/wallets/<name>."""

    def __init__(self, url: str, session: aiohttp.ClientSession | None = None) -> None:
        self.url, self._session = url.rstrip("/"), session

    async def pay(self, bolt11: str, amount_msat: int, max_fee_msat: int) -> PaidInvoice:
        async with contextlib.AsyncExitStack() as stack:
            session = self._session or await stack.enter_async_context(aiohttp.ClientSession())
            async with session.post(f"{self.url}/pay", json={"bolt11": bolt11, "max_fee_msat": max_fee_msat}) as r:
                body = await r.json(content_type=None)
                if r.status != 200:
                    raise PaymentFailed(f"sandbox wallet refused: {body.get('detail', r.status)}")
        return PaidInvoice(body["preimage"], body["amount_msat"], body["fee_msat"])


# -- persisted state ------------------------------------------------------------

@dataclass
class CachedToken:
    origin: str
    macaroon: str
    preimage: str
    payment_hash: str
    paths: list[str]
    methods: list[str] | None
    valid_until: int | None
    credits: int | None
    usable: bool = True

    def covers(self, origin: str, method: str, path: str, now: float) -> bool:
        return (self.usable and self.origin == origin
                and (self.methods is None or method in self.methods)
                and all(path_matches(p, path) for p in self.paths)
                and (self.valid_until is None or now < self.valid_until))


@dataclass
class Spend:
    payment_hash: str
    host: str
    amount_msat: int
    fee_msat: int
    ts: int
    status: str        # "paying" (intent recorded before paying) or "paid"
    origin: str = ""
    bolt11: str = ""   # kept while "paying", so a run that died mid-payment can finish it
    macaroon: str = ""


@dataclass
class ClientState:
    tokens: list[CachedToken] = field(default_factory=list)
    spends: dict[str, Spend] = field(default_factory=dict)


class TokenCache:
    """JSON file (0600) with tokens and the spending ledger, locked while updated."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.state = ClientState()
        self.load()

    def load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        doc = json.loads(read_secret(self.path) or b"{}")
        self.state = ClientState(
            tokens=[CachedToken(**t) for t in doc.get("tokens", [])],
            spends={k: Spend(**v) for k, v in doc.get("spends", {}).items()})

    def save(self) -> None:
        if self.path is None:
            return
        doc = {"tokens": [asdict(t) for t in self.state.tokens if t.usable],
               "spends": {k: asdict(v) for k, v in self.state.spends.items()}}
        write_secret(self.path, json.dumps(doc, indent=1).encode())

    @contextlib.contextmanager
    def locked(self):
        """Reload, let the caller change state, save: one process at a time."""
        if self.path is None:
            yield self.state
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.load()
                yield self.state
                self.save()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def spent(self, host: str | None, since: float) -> int:
        return sum(s.amount_msat + s.fee_msat for s in self.state.spends.values()
                   if (host is None or s.host == host) and s.ts >= since)


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

    def json(self) -> Any:
        return json.loads(self.body)


class L402Client:
    def __init__(self, wallet: Wallet, budget: Budget = Budget(), cache: TokenCache | None = None,
                 session: aiohttp.ClientSession | None = None, on_event: Callable[[str], None] | None = None,
                 receipt_pubkey: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.wallet, self.budget = wallet, budget
        self.cache = cache or TokenCache(None)
        self._session, self.clock = session, clock
        self.on_event = on_event or (lambda msg: None)
        self.receipt_pubkey = receipt_pubkey

    async def request(self, method: str, url: str, *, headers: dict[str, str] | None = None,
                      data: bytes | None = None) -> Result:
        parts = urlsplit(url)
        origin, path = f"{parts.scheme}://{parts.netloc}", parts.path or "/"
        method = method.upper()
        async with contextlib.AsyncExitStack() as stack:
            session = self._session or await stack.enter_async_context(aiohttp.ClientSession())
            token = self._find_token(origin, method, path) or await self._resume(origin, method, path)
            paid = PaidInvoice("", 0, 0)
            payment_hash = None
            for _attempt in range(3):  # cached token -> fresh challenge -> paid retry
                hdrs = dict(headers or {})
                if token is not None:
                    hdrs["Authorization"] = format_authorization(token.macaroon, token.preimage)
                async with session.request(method, url, headers=hdrs, data=data) as resp:
                    body = await resp.read()
                    status, resp_headers = resp.status, resp.headers
                    challenges = parse_challenges(resp_headers.getall("WWW-Authenticate", []))
                if status not in (401, 402):
                    if token is not None and resp_headers.get("Payment-Credits-Remaining") == "0":
                        self._drop_token(token)   # spent its last credit
                    return self._result(status, resp_headers, body, paid, payment_hash)
                if token is not None:
                    self.on_event(f"{status} with cached token for {method} {path}: "
                                  f"{_problem_detail(body)}; dropping it")
                    self._drop_token(token)
                    token = None
                    if not challenges:
                        continue
                if status == 401 or not challenges or paid.amount_msat:
                    return self._result(status, resp_headers, body, paid, payment_hash)
                token, paid, payment_hash = await self._pay(origin, parts.netloc, method, path,
                                                            challenges[0], body)
            return self._result(status, resp_headers, body, paid, payment_hash)

    async def get(self, url: str, **kw: Any) -> Result:
        return await self.request("GET", url, **kw)

    # -- internals -----------------------------------------------------------
    def _find_token(self, origin: str, method: str, path: str) -> CachedToken | None:
        now = self.clock()
        for t in self.cache.state.tokens:
            if t.covers(origin, method, path, now):
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
        with self.cache.locked() as state:
            known = state.spends.get(inv.payment_hash)
            if known is not None and known.status == "paid":
                raise PaymentFailed("the server sent an invoice this client has already paid; "
                                    "not paying twice")
            if known is None:
                self._check_budget(host, amount, now)
                state.spends[inv.payment_hash] = Spend(
                    inv.payment_hash, host, amount, self.budget.max_fee_msat, int(now), "paying",
                    origin, ch.invoice, ch.macaroon)
        token, paid = await self._complete(state.spends[inv.payment_hash])
        self.on_event(f"paid {paid.amount_msat} msat + {paid.fee_msat} msat fee; "
                      f"spent today at {host}: {self.cache.spent(host, now - DAY_S)} msat")
        return token, paid, inv.payment_hash

    async def _complete(self, intent: Spend) -> tuple[CachedToken, PaidInvoice]:
        """Pay a recorded intent and turn it into a cached token. Wallets are idempotent
        per invoice (paying a paid invoice returns its preimage), so this is safe to repeat."""
        try:
            paid = await self.wallet.pay(intent.bolt11, intent.amount_msat, self.budget.max_fee_msat)
        except MicropayError:
            with self.cache.locked() as state:   # nothing was paid: release the reservation
                known = state.spends.get(intent.payment_hash)
                if known is not None and known.status == "paying":
                    del state.spends[intent.payment_hash]
            raise
        if hashlib.sha256(bytes.fromhex(paid.preimage)).hexdigest() != intent.payment_hash:
            raise PaymentFailed("the wallet returned a preimage that does not match the invoice")
        mac = Macaroon.deserialize(intent.macaroon)
        token = _token_from(intent.origin, mac, intent.macaroon, paid.preimage, intent.payment_hash)
        with self.cache.locked() as state:
            state.spends[intent.payment_hash] = Spend(intent.payment_hash, intent.host, paid.amount_msat,
                                                      paid.fee_msat, intent.ts, "paid")
            if not any(t.macaroon == token.macaroon for t in state.tokens):
                state.tokens.append(token)
        return token, paid

    async def _resume(self, origin: str, method: str, path: str) -> CachedToken | None:
        """Finish a payment that an earlier run recorded but did not see through."""
        now = self.clock()
        for intent in list(self.cache.state.spends.values()):
            if intent.status != "paying" or intent.origin != origin or not intent.macaroon:
                continue
            candidate = _token_from(origin, Macaroon.deserialize(intent.macaroon), intent.macaroon,
                                    "", intent.payment_hash)
            if candidate.covers(origin, method, path, now):
                self.on_event(f"finishing an interrupted payment ({intent.payment_hash[:16]}…)")
                token, _ = await self._complete(intent)
                return token
        return None

    def _check_budget(self, host: str, amount: int, now: float) -> None:
        b = self.budget
        worst = amount + b.max_fee_msat
        if b.max_per_request_msat is not None and amount > b.max_per_request_msat:
            raise BudgetExceeded(f"price {amount} msat is over the per-request budget "
                                 f"{b.max_per_request_msat} msat")
        if b.max_per_host_per_day_msat is not None:
            spent = self.cache.spent(host, now - DAY_S)
            if spent + worst > b.max_per_host_per_day_msat:
                raise BudgetExceeded(f"paying {amount} msat (+ up to {b.max_fee_msat} fee) would pass "
                                     f"the daily budget for {host}: {spent} of "
                                     f"{b.max_per_host_per_day_msat} msat spent")
        if b.max_total_msat is not None:
            spent = self.cache.spent(None, 0)
            if spent + worst > b.max_total_msat:
                raise BudgetExceeded(f"paying {amount} msat would pass the total budget: "
                                     f"{spent} of {b.max_total_msat} msat spent")

    def _result(self, status: int, headers: Any, body: bytes, paid: PaidInvoice,
                payment_hash: str | None) -> Result:
        receipt = None
        raw = headers.get(RECEIPT_HEADER)
        if raw:
            try:
                receipt = verify_receipt(raw, self.receipt_pubkey)
                self.on_event(f"receipt verified (signed by {receipt['pubkey'][:16]}…)")
            except InvalidReceipt as exc:
                self.on_event(f"receipt did not verify: {exc.message}")
        return Result(status, dict(headers), body, paid.amount_msat, paid.fee_msat, receipt, payment_hash)


def _advertised_price(body: bytes) -> int | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    price = doc.get("price_msat") if isinstance(doc, dict) else None
    return price if isinstance(price, int) and not isinstance(price, bool) else None


def _problem_detail(body: bytes) -> str:
    try:
        doc = json.loads(body)
        return str(doc.get("detail") or doc.get("error"))
    except (ValueError, AttributeError):
        return "no detail"


def _token_from(origin: str, mac: Macaroon, mac_b64: str, preimage: str, payment_hash: str) -> CachedToken:
    paths: list[str] = []
    methods: set[str] | None = None
    valid_until = credits = None
    for raw in mac.caveats:
        key, _, value = raw.decode("utf-8", "replace").partition("=")
        if key == "path":
            paths.append(value)
        elif key == "method":
            ms = {m.strip().upper() for m in value.split(",")}
            methods = ms if methods is None else methods & ms
        elif key.endswith("_valid_until") and value.isdigit():
            valid_until = int(value) if valid_until is None else min(valid_until, int(value))
        elif key == "credits" and value.isdigit():
            credits = int(value)
    return CachedToken(origin, mac_b64, preimage, payment_hash, paths,
                       sorted(methods) if methods is not None else None, valid_until, credits)
