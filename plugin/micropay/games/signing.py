"""Webhook signatures: sign (the sidecar) and verify (a game server). Standard library only,
so a game server can use this one file without the rest of micropay.

Header:   Micropay-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]
v1 = hex(HMAC-SHA256(secret, "<t>." + raw request body)), one per active secret (during
a rotation the sidecar signs with the new and the old secret). A receiver accepts the
request if any v1 matches one of its secrets and |now - t| <= tolerance (default 300 s),
then de-duplicates by the event id (header Micropay-Event-Id, also "id" in the body).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import Any, Iterable

SIGNATURE_HEADER = "Micropay-Signature"
EVENT_ID_HEADER = "Micropay-Event-Id"
EVENT_TYPE_HEADER = "Micropay-Event-Type"
DEFAULT_TOLERANCE_S = 300
MAX_HEADER_LEN = 2048
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEX_MAC = re.compile(r"[0-9a-f]{64}")


class WebhookVerificationError(ValueError):
    """The request is not a genuine, fresh webhook from the sidecar."""


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode("ascii") + body, hashlib.sha256).hexdigest()


def sign(body: bytes, secrets: Iterable[str], timestamp: int) -> str:
    sigs = ",".join(f"v1={_mac(s, timestamp, body)}" for s in secrets)
    return f"t={timestamp},{sigs}"


def verify_webhook(body: bytes, header: str | None, secrets: str | Iterable[str], *,
                   tolerance_s: int = DEFAULT_TOLERANCE_S, now: float | None = None) -> dict[str, Any]:
    """Check the signature and freshness of a webhook; return the event (parsed body).

    Raises WebhookVerificationError, and nothing else, for anything that is not a
    genuine, fresh webhook: a malformed header or body never escapes as another error."""
    if isinstance(header, bytes):
        try:
            header = header.decode("ascii")
        except UnicodeDecodeError:
            raise WebhookVerificationError("malformed signature header") from None
    if not isinstance(header, str) or not header or len(header) > MAX_HEADER_LEN:
        raise WebhookVerificationError(f"missing or oversized {SIGNATURE_HEADER} header")
    if not isinstance(body, (bytes, bytearray)):
        raise WebhookVerificationError("the body must be the raw request bytes")
    if isinstance(secrets, str):
        secrets = [secrets]
    try:
        keys = [s.encode("utf-8") for s in secrets]
    except (AttributeError, TypeError, UnicodeEncodeError):
        raise WebhookVerificationError("secrets must be strings") from None
    timestamp, candidates = None, []
    for part in header.split(","):
        k, sep, v = part.strip().partition("=")
        if not sep:
            raise WebhookVerificationError("malformed signature header")
        if k == "t":
            if not _TIMESTAMP.fullmatch(v):
                raise WebhookVerificationError("malformed timestamp")
            timestamp = int(v)
        elif k == "v1" and _HEX_MAC.fullmatch(v):
            candidates.append(v)
    if timestamp is None or not candidates:
        raise WebhookVerificationError("signature header needs t= and at least one v1=")
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise WebhookVerificationError("timestamp outside the tolerance window (replayed or clock skew)")
    expected = [hmac.new(k, f"{timestamp}.".encode("ascii") + bytes(body), hashlib.sha256).hexdigest()
                for k in keys]
    # compare every pair, so timing does not reveal which secret or candidate matched
    ok = False
    for e in expected:
        for c in candidates:
            ok |= hmac.compare_digest(e, c)
    if not ok:
        raise WebhookVerificationError("no signature matches")
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        raise WebhookVerificationError("body is not JSON") from None
    if not isinstance(event, dict):
        raise WebhookVerificationError("body is not a JSON object")
    return event
