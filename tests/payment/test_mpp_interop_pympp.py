"""pympp 0.16.0 (PyPI, import `mpp`), the MPP SDK for Python, against `micropay serve`
(sandbox backend) in front of an SSE upstream: the same server, scenarios and checks as
tests/payment/test_mpp_interop.py gives mppx. pympp's client (PaymentTransport, PaymentRuntime)
pays the charge with a Lightning method registered here; every challenge is parsed with
`parse_www_authenticate`, every credential is made by pympp's runtime and read back with
`parse_authorization`, every receipt is read with `parse_payment_receipt`."""
from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime

import pytest

from .test_mpp_interop import DEPOSIT_UNITS, UNIT_SAT, assert_no_failures, served  # noqa: F401 (fixture)

mpp = pytest.importorskip("mpp", reason="pympp is not installed (pip install '.[test]')")
httpx = pytest.importorskip("httpx", reason="httpx (a pympp dependency) is not installed")
from mpp.client import PaymentTransport  # noqa: E402
from mpp.events import PAYMENT_FAILED  # noqa: E402
from mpp.methods import Method  # noqa: E402
from mpp.runtime import ClientMethod, PaymentRuntime  # noqa: E402
from pydantic import BaseModel  # noqa: E402

class Checks:
    """The same checks tests/js/mppx_interop.mjs makes, with pympp's parsers."""

    def __init__(self, scenario: str) -> None:
        self.scenario, self.checks = scenario, []
        self.offered: dict[str, str] = {}       # challenge id -> exchange that offered it first
        self.hashes: dict[str, str] = {}        # payment hash -> exchange that offered it first
        self.consumed: set[str] = set()

    def record(self, exchange: str, check: str, source: str, ok: bool, detail=None) -> bool:
        self.checks.append({"exchange": exchange, "check": check, "source": source, "ok": bool(ok),
                            **({"detail": str(detail)} if detail is not None else {})})
        return bool(ok)

    def sdk(self, exchange: str, check: str, fn):
        try:
            value = fn()
        except Exception as exc:        # whatever pympp raises is its verdict
            self.record(exchange, check, "pympp", False, f"{type(exc).__name__}: {exc}")
            return None
        self.record(exchange, check, "pympp", True)
        return value

    def report(self) -> dict:
        return {"scenario": self.scenario, "checks": self.checks}

    def challenges(self, exchange: str, response, intent: str) -> list:
        self.record(exchange, "status 402", "draft", response.status_code == 402, f"got {response.status_code}")
        cc = response.headers.get("cache-control", "")
        self.record(exchange, "Cache-Control: no-store on a 402", "draft",
                    re.search(r"(^|,)\s*no-store\s*(,|$)", cc, re.I) is not None, cc or "absent")
        found = []
        for value in response.headers.get_list("www-authenticate"):
            if not value.lower().startswith("payment "):
                continue
            ch = self.sdk(exchange, "mpp.parse_www_authenticate", lambda v=value: mpp.parse_www_authenticate(v))
            if ch is None:
                continue
            found.append(ch)
            self.record(exchange, "offers the expected intent", "draft",
                        (ch.method, ch.intent) == ("lightning", intent), f"{ch.method}/{ch.intent}")
            hash_ = (ch.request.get("methodDetails") or {}).get("paymentHash") or ch.request.get("paymentHash")
            seen = self.offered.get(ch.id)
            self.record(exchange, "challenge id is fresh (never offered before)", "draft", seen is None,
                        ch.id if seen is None else f"{ch.id} was already offered at {seen!r}")
            self.record(exchange, "challenge was never consumed", "draft", ch.id not in self.consumed,
                        f"{ch.id} was consumed by an accepted credential" if ch.id in self.consumed else ch.id)
            if hash_ is not None:
                at = self.hashes.get(hash_)
                self.record(exchange, "invoice is fresh (payment hash never offered before)", "draft", at is None,
                            hash_ if at is None else f"{hash_} was already offered at {at!r}")
                self.hashes.setdefault(hash_, exchange)
            self.offered.setdefault(ch.id, exchange)
        self.record(exchange, "offers a Payment challenge", "draft", bool(found),
                    response.headers.get_list("www-authenticate"))
        return found

    def receipt(self, exchange: str, response, reference: str | None):
        header = response.headers.get("payment-receipt")
        if not self.record(exchange, "Payment-Receipt present", "draft", header is not None,
                           "absent" if header is None else None):
            return None
        receipt = self.sdk(exchange, "mpp.parse_payment_receipt", lambda: mpp.parse_payment_receipt(header))
        cc = response.headers.get("cache-control")
        self.record(exchange, "Cache-Control: private on a response with Payment-Receipt", "draft",
                    cc is not None and re.search(r"(^|,)\s*private\s*(,|$)", cc, re.I) is not None,
                    f"Cache-Control: {cc}" if cc else "no Cache-Control header")
        if receipt is not None and reference is not None:
            self.record(exchange, "receipt reference is the payment hash", "draft", receipt.reference == reference,
                        f"{receipt.reference} vs {reference}")
        return receipt

    def credential(self, exchange: str, header: str) -> None:
        parsed = self.sdk(exchange, "mpp.parse_authorization (our credential, as a pympp server reads it)",
                          lambda: mpp.parse_authorization(header))
        if parsed is not None:
            self.record(exchange, "the credential round-trips through pympp", "draft",
                        parsed.to_authorization() == header or mpp.parse_authorization(parsed.to_authorization())
                        == parsed)


class Recording(httpx.AsyncBaseTransport):
    """The inner transport of pympp's PaymentTransport: every exchange pympp makes."""

    def __init__(self) -> None:
        self.inner, self.log = httpx.AsyncHTTPTransport(), []

    async def handle_async_request(self, request):
        response = await self.inner.handle_async_request(request)
        self.log.append((request.headers.get("authorization"), response))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class Wallet:
    """The sidecar's sandbox wallet over HTTP."""

    def __init__(self, base: str, client) -> None:
        self.url, self.client = f"{base}/sandbox/wallets/pympp", client

    async def pay(self, bolt11: str) -> str:
        r = await self.client.post(f"{self.url}/pay", json={"bolt11": bolt11})
        assert r.status_code == 200, r.text
        return r.json()["preimage"]

    async def return_invoice(self) -> str:
        r = await self.client.post(f"{self.url}/invoice", json={"description": "pympp refund"})
        assert r.status_code == 200, r.text
        return r.json()["bolt11"]


class Preimage(BaseModel):
    preimage: str


class SessionPayload(BaseModel):
    action: str


class AnyRequest(BaseModel):
    amount: str
    currency: str


def b64url(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


async def _pympp_charge(base: str) -> dict:
    checks = Checks("pympp charge")
    paid: list[tuple[str, str]] = []
    async with httpx.AsyncClient(timeout=30) as plain:
        wallet = Wallet(base, plain)

        async def create_credential(params) -> str:
            ch = params.challenge
            preimage = await wallet.pay(ch.request["methodDetails"]["invoice"])
            paid.append((ch.id, ch.request["methodDetails"]["paymentHash"]))
            return mpp.Credential(challenge=ch.to_echo(), payload={"preimage": preimage}).to_authorization()

        method = ClientMethod(method=Method(name="lightning", intent="charge", request_model=AnyRequest,
                                            payload_model=Preimage), create_credential=create_credential)

        async def pay_with_pympp(path: str, label: str) -> str | None:
            recording = Recording()
            transport = PaymentTransport([method], inner=recording)
            failed = []
            transport.on(PAYMENT_FAILED, lambda payload: failed.append(payload))
            async with httpx.AsyncClient(transport=transport, timeout=30) as client:
                response = await client.get(base + path)
                await response.aread()
            checks.record(label, "no payment.failed event", "pympp", not failed,
                          [repr(p.get("error")) for p in failed] if failed else None)
            for auth, r in recording.log:
                ex = f"{label}: {'with credential' if auth else 'no credential'} -> {r.status_code}"
                if r.status_code == 402:
                    checks.challenges(ex, r, "charge")
                if auth:
                    checks.credential(ex, auth)
            ex = f"{label}: paid response"
            checks.record(ex, "status 200", "draft", response.status_code == 200,
                          f"got {response.status_code} {response.text if response.status_code != 200 else ''}")
            last = paid[-1] if paid else (None, None)
            checks.receipt(ex, response, last[1])
            if response.status_code == 200 and last[0]:
                checks.consumed.add(last[0])
            return next((auth for auth, _ in recording.log if auth), None)

        for i in (1, 2):
            checks.challenges(f"charge /api/paid: unauthenticated request {i}", await plain.get(base + "/api/paid"),
                              "charge")
        credential = await pay_with_pympp("/api/paid", "charge /api/paid (pympp #1)")
        if credential:
            r = await plain.get(base + "/api/paid", headers={"Authorization": credential})
            ex = "charge /api/paid: the spent credential again"
            checks.challenges(ex, r, "charge")
            ct = r.headers.get("content-type", "")
            checks.record(ex, "problem+json body", "draft", ct.startswith("application/problem+json"), ct)
        await pay_with_pympp("/api/paid", "charge /api/paid (pympp #2)")
        await pay_with_pympp("/api/joke", "charge /api/joke (pympp, L402 and Payment offered)")
        r = await plain.get(base + "/api/paid", headers={"Authorization": "Payment dGhpcyBpcyBnYXJiYWdl"})
        checks.challenges("charge /api/paid: garbage credential", r, "charge")
    return checks.report()


async def test_pympp_pays_the_charge_intent_and_reports_no_failure(served):
    assert_no_failures(await _pympp_charge(served))


async def _sse(response):
    """(event, data) pairs of a streamed httpx response."""
    event, data = "message", []
    async for line in response.aiter_lines():
        if line == "":
            if data or event != "message":
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


async def _pympp_session(base: str) -> dict:
    checks = Checks("pympp session")
    url = base + "/gen"
    async with httpx.AsyncClient(timeout=30) as client:
        wallet = Wallet(base, client)
        pending: dict = {}

        async def create_credential(params) -> str:      # the payload of the action at hand
            return mpp.Credential(challenge=params.challenge.to_echo(), payload=pending["payload"]).to_authorization()

        method = ClientMethod(method=Method(name="lightning", intent="session", request_model=AnyRequest,
                                            payload_model=SessionPayload), create_credential=create_credential)
        runtime = PaymentRuntime([method])

        async def authorization(label: str, challenge, payload: dict) -> str | None:
            """pympp's runtime makes the credential (it checks method, intent and expiry first)."""
            pending["payload"] = payload
            try:
                cred = await runtime.create_credential(challenge, method)
            except Exception as exc:
                checks.record(label, "PaymentRuntime.create_credential", "pympp", False, f"{type(exc).__name__}: {exc}")
                return None
            checks.record(label, "PaymentRuntime.create_credential", "pympp", True)
            header = cred.to_authorization()
            checks.credential(label, header)
            return header

        async def read_stream(label: str, response, session_id: str, on_topup) -> dict:
            got = {"data": [], "receipts": [], "topups": 0, "done": False}
            async for event, data in _sse(response):
                if event == "message" and data == "[DONE]":
                    got["done"] = True
                elif event == "message":
                    got["data"].append(json.loads(data)["i"])
                elif event == "payment-receipt":
                    ex = f"{label}: payment-receipt event"
                    receipt = checks.sdk(ex, "mpp.parse_payment_receipt (the event's JSON, base64url-encoded here)",
                                         lambda d=data: mpp.parse_payment_receipt(b64url(json.loads(d))))
                    if receipt is not None:
                        doc = json.loads(data)
                        checks.record(ex, "reference is the session id", "draft", receipt.reference == session_id,
                                      receipt.reference)
                        checks.record(ex, "spent and units are numbers", "draft",
                                      isinstance(doc.get("spent"), int) and isinstance(doc.get("units"), int), data)
                        checks.record(ex, "comes before [DONE]", "draft", not got["done"])
                    got["receipts"].append(receipt)
                elif event == "payment-need-topup":
                    got["topups"] += 1
                    await on_topup(json.loads(data))
            return got

        # 1. the challenge, twice
        found = checks.challenges("session: unauthenticated request 1", await client.get(url, params={"n": 2}),
                                  "session")
        checks.challenges("session: unauthenticated request 2", await client.get(url, params={"n": 2}), "session")
        assert found, checks.checks
        a = found[0]
        unit, deposit = int(a.request["amount"]), int(a.request["depositAmount"])
        assert (unit, deposit) == (UNIT_SAT, UNIT_SAT * DEPOSIT_UNITS), a.request
        session_id = a.request["paymentHash"]
        # 2. open: 2 events
        preimage = await wallet.pay(a.request["depositInvoice"])
        auth = await authorization("session: open", a, {"action": "open", "preimage": preimage,
                                                        "returnInvoice": await wallet.return_invoice()})
        assert auth is not None, checks.checks
        async with client.stream("GET", url, params={"n": 2}, headers={"Authorization": auth}) as r:
            ok = checks.record("session: open", "status 200", "draft", r.status_code == 200, r.status_code)
            if ok:
                checks.consumed.add(a.id)
            checks.receipt("session: open", r, session_id)
            first = await read_stream("session: open stream", r, session_id, None) if ok else None
        if first:
            checks.record("session: open stream", "both events, one receipt, [DONE]", "draft",
                          first["data"] == [0, 1] and len(first["receipts"]) == 1 and first["done"], first)
        # 3. bearer: DEPOSIT_UNITS events on the one unit left; a top-up while the stream is held
        latest = {"challenge": a}
        n = DEPOSIT_UNITS
        bearer = await authorization("session: bearer", a, {"action": "bearer", "sessionId": session_id,
                                                            "preimage": preimage})

        async def top_up(need: dict) -> None:
            checks.record("session: payment-need-topup event", "names the session", "draft",
                          need.get("sessionId") == session_id, need)
            fresh = checks.challenges("session: challenge for the top-up", await client.get(url, params={"n": 1}),
                                      "session")
            if not fresh:
                return
            b = fresh[0]
            top_pre = await wallet.pay(b.request["depositInvoice"])
            top_auth = await authorization("session: topUp", b, {"action": "topUp", "sessionId": session_id,
                                                                 "topUpPreimage": top_pre})
            if top_auth is None:
                return
            r = await client.get(url, headers={"Authorization": top_auth})
            checks.record("session: topUp", 'status 200 {"status":"ok"}', "draft",
                          r.status_code == 200 and r.json().get("status") == "ok", f"{r.status_code} {r.text}")
            checks.receipt("session: topUp", r, session_id)
            if r.status_code == 200:
                checks.consumed.add(b.id)
                latest["challenge"] = b

        second = None
        if bearer is not None:
            async with client.stream("GET", url, params={"n": n}, headers={"Authorization": bearer}) as r:
                ok = checks.record("session: bearer", "status 200", "draft", r.status_code == 200, r.status_code)
                checks.receipt("session: bearer", r, session_id)
                second = await read_stream("session: bearer stream", r, session_id, top_up) if ok else None
        if second:
            checks.record("session: bearer stream", f"all {n} events after one top-up, one receipt, [DONE]", "draft",
                          second["data"] == list(range(n)) and second["topups"] == 1
                          and len(second["receipts"]) == 1 and second["done"], second)
        # 4. close: the refund is the deposits less what was spent
        close = await authorization("session: close", latest["challenge"], {"action": "close", "sessionId": session_id,
                                                                          "preimage": preimage})
        assert close is not None, checks.checks
        r = await client.get(url, headers={"Authorization": close})
        checks.record("session: close", "status 200", "draft", r.status_code == 200, f"{r.status_code} {r.text}")
        receipt = checks.receipt("session: close", r, session_id)
        if r.status_code == 200:
            body, expected = r.json(), (2 * DEPOSIT_UNITS - (2 + n)) * UNIT_SAT
            checks.record("session: close", f'body {{"status":"closed","refundSats":{expected},'
                                            '"refundStatus":"succeeded"}', "draft",
                          body == {"status": "closed", "refundSats": expected, "refundStatus": "succeeded"}, body)
            if receipt is not None:
                extra = receipt.extensions or {}
                checks.record("session: close", "receipt carries refundSats and refundStatus", "draft",
                              (extra.get("refundSats"), extra.get("refundStatus"))
                              == (body.get("refundSats"), body.get("refundStatus")), extra)
        # 5. after the close
        r = await client.get(url, params={"n": 1}, headers={"Authorization": bearer or ""})
        ex = "session: bearer on the closed session"
        checks.challenges(ex, r, "session")
        ptype = r.json().get("type", "") if r.headers.get("content-type", "").startswith("application/") else ""
        checks.record(ex, "problem type session-closed", "draft", ptype.endswith("/session-closed"), ptype)
        checks.challenges("session: unauthenticated request after the close", await client.get(url, params={"n": 1}),
                          "session")
    return checks.report()


async def test_pympp_drives_a_session_over_sse_and_reports_no_failure(served):
    assert_no_failures(await _pympp_session(served))


def test_the_checks_themselves_catch_a_reused_challenge_and_a_missing_private():
    """The checks fail where they should: fed a 402 offered twice and a receipt without
    Cache-Control: private, as they saw on main when this was written."""
    checks = Checks("self-test")
    header = ('Payment id="x1", realm="r", method="lightning", intent="charge", '
              f'request="{b64url({"amount": "1", "currency": "sat", "methodDetails": {"paymentHash": "ab" * 32}})}", '
              f'expires="{datetime.now(UTC).replace(year=datetime.now(UTC).year + 1).strftime("%Y-%m-%dT%H:%M:%SZ")}"')
    resp = httpx.Response(402, headers=[("WWW-Authenticate", header), ("Cache-Control", "no-store")])
    checks.challenges("first", resp, "charge")
    checks.challenges("second", resp, "charge")
    receipt = b64url({"method": "lightning", "reference": "ab" * 32, "status": "success",
                      "timestamp": "2026-01-01T00:00:00Z"})
    checks.receipt("paid", httpx.Response(200, headers={"Payment-Receipt": receipt}), "ab" * 32)
    failed = {(c["exchange"], c["check"]) for c in checks.checks if not c["ok"]}
    assert failed == {("second", "challenge id is fresh (never offered before)"),
                      ("second", "invoice is fresh (payment hash never offered before)"),
                      ("paid", "Cache-Control: private on a response with Payment-Receipt")}
