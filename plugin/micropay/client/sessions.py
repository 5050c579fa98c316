"""The client side of Payment sessions (draft-lightning-session): open a session on a
streaming endpoint, read its events, top it up within the budgets when the server asks,
close it with a return invoice from the paying wallet and read the refund.

    async with PaymentSession(client, wallet, "https://api.example/generate") as s:
        async for event in s.stream("GET", "https://api.example/generate"):
            print(event.data)
    print(s.closed)      # {"status": "closed", "refundSats": ..., "refundStatus": ...}

Every deposit (the opening one and each top-up) is paid through the L402Client's
ledger: recorded before paying, checked against the daily and total budgets (the
per-request budget applies to the unit price), never paid twice. A refund does not
raise the budgets back: they count what left the wallet.

A session whose deposit is paid is recorded in the same 0600 file until it is known
closed. A run that died mid-session (killed between a top-up and the close, say) leaves
it there, and the next PaymentSession for the same origin closes it first, so the
refund comes back at once rather than after the server's idle timeout; a session whose
open never reached the server is opened and closed then (the deposit back, less one unit).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol
from urllib.parse import urlsplit

import aiohttp

from ..payment import scheme as payment_auth
from .payer import MAX_CHALLENGE_BODY, L402Client, Spend, challenge_invoice
from ..core.errors import BudgetExceeded, InvoiceMismatch, PaymentFailed, RequestFailed
from ..core.inputs import load_json, read_bounded

RETURN_INVOICE_EXPIRY_S = 30 * 86400     # the draft: at least 30 days, to outlive the session


class Receiver(Protocol):
    async def invoice_any(self, description: str, expiry_s: int) -> str:
        """An amountless invoice this wallet is paid on."""


@dataclass
class Event:
    """One SSE event of a session stream."""

    event: str          # "message" when the server named none
    data: str

    def json(self) -> Any:
        return json.loads(self.data)


class PaymentSession:
    def __init__(self, client: L402Client, wallet: Receiver, url: str) -> None:
        self.client, self.wallet, self.url = client, wallet, url
        parts = urlsplit(url)
        self.origin, self.host = f"{parts.scheme}://{parts.netloc}", parts.netloc
        self.session_id: str | None = None
        self.preimage = ""
        self.challenge: payment_auth.Challenge | None = None   # the latest one: echoed by bearer and close
        self.unit_msat = 0
        self.deposited_msat = 0
        self.top_ups = 0
        self.closed: dict[str, Any] | None = None
        self.receipts: list[dict[str, Any]] = []
        self._session: aiohttp.ClientSession | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> "PaymentSession":
        self._session = self.client._session or await self._stack.enter_async_context(aiohttp.ClientSession())
        await self.close_left_over()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.session_id is not None and self.closed is None:
                await self.close()
        finally:
            await self._stack.aclose()

    # -- the wire -------------------------------------------------------------------
    def _authorization(self, payload: dict[str, str], ch: payment_auth.Challenge | None = None) -> str:
        ch = ch or self.challenge
        assert ch is not None
        return payment_auth.format_session_credential(ch, payload)

    def _bearer(self) -> str:
        return self._authorization({"action": "bearer", "sessionId": self.session_id or "",
                                    "preimage": self.preimage})

    async def _challenge(self, method: str, url: str) -> payment_auth.Challenge:
        """Ask without a credential: the server's 402 with a session challenge."""
        assert self._session is not None
        try:
            async with self._session.request(method, url) as resp:
                status, offered = resp.status, resp.headers.getall("WWW-Authenticate", [])
                await read_bounded(resp.content, MAX_CHALLENGE_BODY)
        except (aiohttp.ClientError, ValueError, TimeoutError) as exc:
            raise RequestFailed(f"{method} {url}: {exc or type(exc).__name__}") from None
        ch = next((c for c in payment_auth.parse_challenges(offered)
                   if c.method == payment_auth.METHOD and c.intent == payment_auth.SESSION), None)
        if status != 402 or ch is None:
            raise RequestFailed(f"{method} {url} answered {status} without a Payment session challenge")
        return ch

    async def _pay_deposit(self, ch: payment_auth.Challenge, method: str, path: str) -> str:
        """Pay a session challenge's deposit invoice within the budgets; its preimage."""
        try:
            req = payment_auth.decode_request(ch)
            invoice, unit_sats = req["depositInvoice"], int(req["amount"])
            deposit_sats = int(req.get("depositAmount") or 0)
            if req.get("currency") != "sat" or not isinstance(invoice, str) or unit_sats <= 0:
                raise ValueError("not a sat-denominated session")
        except (ValueError, KeyError, TypeError):
            raise InvoiceMismatch("the Payment session challenge's request cannot be read; not paying") from None
        inv = challenge_invoice(invoice, req.get("paymentHash"))
        if inv.amount_msat is None or (deposit_sats and inv.amount_msat != deposit_sats * 1000):
            raise InvoiceMismatch(f"the deposit invoice asks {inv.amount_msat} msat but the challenge says "
                                  f"{deposit_sats} sat; not paying")
        if inv.amount_msat < unit_sats * 1000:
            raise InvoiceMismatch("the deposit does not cover one unit; not paying")
        if self.unit_msat and unit_sats * 1000 != self.unit_msat:
            raise InvoiceMismatch(f"the unit price changed from {self.unit_msat} to {unit_sats * 1000} msat "
                                  "within the session; not paying")
        budget = self.client.budget
        if budget.max_per_request_msat is not None and unit_sats * 1000 > budget.max_per_request_msat:
            raise BudgetExceeded(f"a unit costs {unit_sats * 1000} msat, over the per-request budget "
                                 f"{budget.max_per_request_msat} msat")
        now = self.client.clock()
        if now >= inv.expires_at:
            raise PaymentFailed("the deposit invoice has expired")
        self.client.on_event(f"402 for {method} {path}: session deposit of {inv.amount_msat} msat "
                             f"({inv.amount_msat // (unit_sats * 1000)} units of {unit_sats} sat)")
        intent = self.client._reserve(Spend(inv.payment_hash, self.host, inv.amount_msat, budget.max_fee_msat,
                                            int(now), "paying", self.origin, invoice, "", ch.echo(),
                                            f"SESSION {method} {path}"), now, per_request_msat=unit_sats * 1000)
        _, paid = await self.client._complete(intent)
        self.client.on_event(f"paid the deposit: {paid.amount_msat} msat + {paid.fee_msat} msat fee")
        self.unit_msat = unit_sats * 1000
        self.deposited_msat += paid.amount_msat
        return paid.preimage

    async def open(self, method: str = "GET", url: str | None = None) -> str:
        """Pay a deposit and make the open credential (sent with the first request)."""
        url = url or self.url
        path = urlsplit(url).path or "/"
        ch = await self._challenge(method, url)
        preimage = await self._pay_deposit(ch, method, path)
        ret = await self.wallet.invoice_any(f"refund of a micropay session at {self.host}", RETURN_INVOICE_EXPIRY_S)
        self.challenge, self.preimage = ch, preimage
        self.session_id = payment_auth.decode_request(ch)["paymentHash"]
        with self.client.cache.locked() as state:      # before the open is sent: see close_left_over
            state.sessions[self.session_id] = {"origin": self.origin, "url": url, "method": method,
                                               "preimage": preimage, "challenge": ch.echo(), "returnInvoice": ret}
        return self._authorization({"action": "open", "preimage": preimage, "returnInvoice": ret}, ch)

    async def top_up(self, method: str = "GET", url: str | None = None) -> None:
        """Pay a fresh deposit into the open session (the server resumes held streams)."""
        assert self._session is not None and self.session_id is not None
        url = url or self.url
        path = urlsplit(url).path or "/"
        ch = await self._challenge(method, url)
        preimage = await self._pay_deposit(ch, method, path)
        auth = self._authorization({"action": "topUp", "sessionId": self.session_id, "topUpPreimage": preimage}, ch)
        body = await self._send(method, url, auth)
        if body.get("status") != "ok":
            raise RequestFailed(f"the top-up was not accepted: {body}")
        self.challenge = ch
        self.top_ups += 1
        self.client.on_event(f"session {self.session_id[:16]}… topped up")

    async def close(self, method: str = "GET", url: str | None = None) -> dict[str, Any]:
        """Close the session; the server refunds the unspent balance to the return invoice."""
        assert self.session_id is not None
        body = await self._send(method, url or self.url,
                                self._authorization({"action": "close", "sessionId": self.session_id,
                                                     "preimage": self.preimage}))
        if body.get("status") != "closed":
            raise RequestFailed(f"the session was not closed: {body}")
        self.closed = body
        self._forget(self.session_id)
        self.client.on_event(f"session {self.session_id[:16]}… closed: refund {body.get('refundSats')} sat "
                             f"{body.get('refundStatus')}")
        return body

    def _forget(self, session_id: str) -> None:
        with self.client.cache.locked() as state:
            state.sessions.pop(session_id, None)

    async def close_left_over(self) -> int:
        """Close the sessions of this origin that an earlier run left open (see the module's
        docstring). Returns how many were settled; one that cannot be reached now stays
        recorded for the next run."""
        left = {sid: rec for sid, rec in self.client.cache.state.sessions.items() if rec.get("origin") == self.origin}
        settled = 0
        for sid, rec in left.items():
            try:
                ch = payment_auth.Challenge(**rec["challenge"])
                close = payment_auth.format_session_credential(
                    ch, {"action": "close", "sessionId": sid, "preimage": rec["preimage"]})
                status, body = await self._exchange(rec["method"], rec["url"], close)
                if status == 402 and str(body.get("type", "")).endswith("/session-not-found"):
                    # the open never reached the server: open it now, then close it
                    opening = payment_auth.format_session_credential(
                        ch, {"action": "open", "preimage": rec["preimage"], "returnInvoice": rec["returnInvoice"]})
                    await self._exchange(rec["method"], rec["url"], opening)
                    status, body = await self._exchange(rec["method"], rec["url"], close)
            except (RequestFailed, KeyError, TypeError) as exc:
                self.client.on_event(f"session {sid[:16]}… left open by an earlier run: not closed now ({exc})")
                continue
            if status == 200 and body.get("status") == "closed":
                self.client.on_event(f"session {sid[:16]}… left open by an earlier run: closed, refund "
                                     f"{body.get('refundSats')} sat {body.get('refundStatus')}")
            elif status == 402 and str(body.get("type", "")).endswith(("/session-closed", "/session-not-found")):
                self.client.on_event(f"session {sid[:16]}… left open by an earlier run: the server had closed it "
                                     f"(refund {body.get('refundSats', '?')} sat {body.get('refundStatus', '?')})")
            else:
                self.client.on_event(f"session {sid[:16]}… left open by an earlier run: not closed now "
                                     f"({status}: {body.get('detail', '')})")
                continue
            self._forget(sid)
            settled += 1
        return settled

    async def _exchange(self, method: str, url: str, auth: str) -> tuple[int, dict[str, Any]]:
        """Send one credential; the status and the JSON body ({} if it is not JSON)."""
        assert self._session is not None
        try:
            async with self._session.request(method, url, headers={"Authorization": auth}) as resp:
                raw, _ = await read_bounded(resp.content, MAX_CHALLENGE_BODY)
                status = resp.status
        except (aiohttp.ClientError, ValueError, TimeoutError) as exc:
            raise RequestFailed(f"{method} {url}: {exc or type(exc).__name__}") from None
        try:
            body = load_json(raw)
        except Exception:
            body = None
        return status, body if isinstance(body, dict) else {}

    async def _send(self, method: str, url: str, auth: str) -> dict[str, Any]:
        status, body = await self._exchange(method, url, auth)
        if status != 200 or not body:
            raise RequestFailed(f"{method} {url} answered {status}: {body.get('detail', '')}")
        return body

    # -- requests and streams ---------------------------------------------------------
    async def request(self, method: str, url: str | None = None, **kw: Any) -> tuple[int, bytes]:
        """One request on the session (opening it first if needed): status and body."""
        url = url or self.url
        auth = self._bearer() if self.session_id else await self.open(method, url)
        assert self._session is not None
        async with self._session.request(method, url, headers=dict(kw.pop("headers", {}), Authorization=auth),
                                         **kw) as resp:
            return resp.status, await resp.read()

    async def stream(self, method: str = "GET", url: str | None = None, **kw: Any) -> AsyncIterator[Event]:
        """The events of a streamed (SSE) response on the session, opening it first if
        needed; top-ups are paid when the server asks (`payment-need-topup`), within the
        budgets. Ends after `[DONE]`, or when the server ends the stream. A response that
        is not SSE comes as one event named "body"."""
        url = url or self.url
        auth = self._bearer() if self.session_id else await self.open(method, url)
        assert self._session is not None
        headers = dict(kw.pop("headers", {}), Authorization=auth, Accept="text/event-stream")
        async with self._session.request(method, url, headers=headers, **kw) as resp:
            if resp.status != 200:
                raw, _ = await read_bounded(resp.content, MAX_CHALLENGE_BODY)
                raise RequestFailed(f"{method} {url} answered {resp.status}: {raw[:300]!r}")
            if resp.content_type != "text/event-stream":      # one unit, one body
                yield Event("body", (await resp.read()).decode("utf-8", "replace"))
                return
            async for ev in _events(resp.content):
                if ev.event == "payment-need-topup":
                    self.client.on_event(f"the server asks for a top-up: {ev.data}")
                    await self.top_up(method, url)
                    continue
                if ev.event == "payment-receipt":
                    self.receipts.append(ev.json())
                    continue
                if ev.event == "session-timeout":
                    raise RequestFailed(f"the server ended the stream waiting for a top-up: {ev.data}")
                if ev.data == "[DONE]":
                    return
                yield ev


async def _events(content: aiohttp.StreamReader) -> AsyncIterator[Event]:
    name, data = "message", []
    async for raw in content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                yield Event(name, "\n".join(data))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield Event(name, "\n".join(data))
