"""Paying a Lightning Address: fetch an invoice through LNURL-pay (LUD-16 + LUD-06), over
aiohttp, and check it before anything is paid.

`AddressPayer.invoice(address, amount_msat, comment)` GETs the address's payRequest
(cached per address for `cache_s`), calls its callback for exactly `amount_msat` (with the
comment when the service takes one, LUD-12, cut to its commentAllowed), decodes the
invoice with the node's `decode`, and checks that it is for exactly that amount, commits
to sha256 of the payRequest's metadata, has not expired, and is not one it handed out
before (paying that again would pay nothing new, yet count as paid). Every request has a
deadline (`timeout_s`, 10 s), a body of at most 64 KiB, and no redirect is followed.
Any problem raises PaymentFailed naming the address and what went wrong, e.g.
"lightning address alice@example.com: the service refused: unknown user", so a payer
counts it as a failed payment (nothing was paid).

http:// is used only for .onion and loopback hosts (creators.lnurl.address_url); a
payRequest of an address reached over https may not send us to a plain-http callback
(which would be the payer's own loopback: a service could otherwise make the node call
its local services).
"""
from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections import OrderedDict
from typing import Any, Awaitable, Callable

import aiohttp

from ..core.errors import BadRequest, PaymentFailed
from ..core.inputs import load_json, read_bounded
from ..lightning.base import DecodedInvoice
from .lnurl import (LnurlError, PayRequest, address_parts, address_url, callback_url, check_invoice,
                    parse_callback_answer, parse_pay_request, plain_http_ok)

__all__ = ["AddressPayer", "MAX_BODY", "TIMEOUT_S", "CACHE_S", "CACHE_SIZE", "MIN_EXPIRY_LEFT_S"]

MAX_BODY = 64 * 1024               # a payRequest or a callback's answer
TIMEOUT_S = 10.0                   # each request, connection to last byte
CACHE_S = 300.0                    # how long a payRequest is reused
CACHE_SIZE = 256                   # addresses whose payRequest is kept
MIN_EXPIRY_LEFT_S = 5              # an invoice expiring sooner is refused
SEEN_HASHES = 4096                 # payment hashes handed out lately: a repeat is refused
Decode = Callable[[str], Awaitable[DecodedInvoice]]


class _Refused(Exception):
    """Why no usable invoice came back (the text, without the address)."""


class AddressPayer:
    """Fetches checked invoices from Lightning Addresses. One per process; `close()` it."""

    def __init__(self, decode: Decode, *, clock: Callable[[], float] = time.time, timeout_s: float = TIMEOUT_S,
                 cache_s: float = CACHE_S, cache_size: int = CACHE_SIZE,
                 session: aiohttp.ClientSession | None = None) -> None:
        """`decode`: the node's BOLT11 decoder (Node.decode). `session`: an aiohttp session
        to use (not closed here); by default one is made on first use."""
        self.decode, self.clock, self.timeout_s = decode, clock, timeout_s
        self.cache_s, self.cache_size = cache_s, cache_size
        self._session, self._own_session = session, session is None
        self._cache: OrderedDict[str, tuple[float, PayRequest]] = OrderedDict()
        self._seen: OrderedDict[str, None] = OrderedDict()

    async def invoice(self, address: str, amount_msat: int, comment: str | None = None) -> tuple[str, str]:
        """(bolt11, payment_hash) of a checked invoice for exactly `amount_msat` from
        `address` (name@host); PaymentFailed when there is none."""
        try:
            name, host = address_parts(address)
        except LnurlError as exc:
            raise PaymentFailed(f"lightning address {_clean(str(address))[:80]}: {exc}") from None
        shown = f"{name}@{host}"
        try:
            return await self._invoice(shown, host, amount_msat, comment)
        except (_Refused, LnurlError) as exc:
            self._cache.pop(shown, None)          # the service may have changed: ask again next time
            raise PaymentFailed(f"lightning address {shown}: {_clean(str(exc))}", address=shown) from None

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- the steps -------------------------------------------------------------------------
    async def _invoice(self, address: str, host: str, amount_msat: int, comment: str | None) -> tuple[str, str]:
        req = await self._pay_request(address, host)
        answer = parse_callback_answer(await self._get_json(callback_url(req, amount_msat, comment=comment or None),
                                                            "the callback"))
        try:
            decoded = await self.decode(answer.bolt11)
        except Exception as exc:                  # whatever the decoder says: not an invoice we pay
            raise _Refused(f"the callback's invoice cannot be decoded: {getattr(exc, 'message', exc)}") from None
        check_invoice(req, amount_msat, decoded.amount_msat, decoded.description_hash)
        if decoded.expires_at < self.clock() + MIN_EXPIRY_LEFT_S:
            raise _Refused("the callback's invoice has expired")
        if decoded.payment_hash in self._seen:     # paying it again would pay nothing new
            raise _Refused("the callback handed out an invoice it had handed out before")
        self._seen[decoded.payment_hash] = None
        while len(self._seen) > SEEN_HASHES:
            self._seen.popitem(last=False)
        return answer.bolt11, decoded.payment_hash

    async def _pay_request(self, address: str, host: str) -> PayRequest:
        now = self.clock()
        hit = self._cache.get(address)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(address)
            return hit[1]
        req = parse_pay_request(await self._get_json(address_url(address), "the payRequest"))
        if urllib.parse.urlsplit(req.callback).scheme != "https" and not plain_http_ok(host):
            raise _Refused("the payRequest's callback is plain http:// while the address is reached over https")
        self._cache[address] = (now + self.cache_s, req)
        self._cache.move_to_end(address)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return req

    async def _get_json(self, url: str, what: str) -> Any:
        """The JSON document at `url`. A service's ERROR document is returned whatever the
        status, for the parser to report its reason."""
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._client().get(url, allow_redirects=False,
                                              headers={"Accept": "application/json"}) as resp:
                    status = resp.status
                    raw, complete = await read_bounded(resp.content, MAX_BODY)
        except TimeoutError:
            raise _Refused(f"{what} timed out after {self.timeout_s:g} s") from None
        except aiohttp.ClientError as exc:
            raise _Refused(f"{what} could not be fetched: {type(exc).__name__}: {exc}") from None
        if 300 <= status < 400:
            raise _Refused(f"{what} answered HTTP {status}, a redirect (redirects are not followed)")
        if not complete:
            raise _Refused(f"{what} answered with more than {MAX_BODY // 1024} KiB")
        try:
            doc = load_json(raw, what)
        except BadRequest:
            raise _Refused(f"{what} answered HTTP {status} without a JSON document" if status != 200
                           else f"{what} is not a JSON document") from None
        refused = isinstance(doc, dict) and str(doc.get("status", "")).upper() == "ERROR"
        if not 200 <= status < 300 and not refused:
            raise _Refused(f"{what} answered HTTP {status}")
        return doc

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": "micropay (LNURL-pay)"},
                connector=aiohttp.TCPConnector(limit=16, limit_per_host=4))
        return self._session


def _clean(text: str) -> str:
    """One line of printable text (a service's reason ends up in logs and RPC answers)."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())
