"""L402 wire format: challenge and credential headers, the 402 problem body. No I/O.

Challenge (sent as two WWW-Authenticate headers, one per scheme):
    L402 version="0", token="<b64 macaroon>", macaroon="<b64 macaroon>", invoice="<bolt11>"
    LSAT macaroon="<b64 macaroon>", invoice="<bolt11>"
`token=`/`version=` are what the bLIP-26 spec names; `macaroon=` is what Aperture
sends and what regex-based clients (l402-requests and others) look for.

Credential:
    Authorization: L402 <b64 macaroon>[,<b64 macaroon>...]:<64 hex preimage>
with scheme L402 or LSAT (any case), standard or URL-safe base64.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..core.errors import MalformedCredential

SCHEMES = ("L402", "LSAT")
MAX_AUTHORIZATION_LEN = 8192
PROBLEM_CONTENT_TYPE = "application/problem+json"
_B64 = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_PARAM = re.compile(r'([A-Za-z0-9_-]+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


@dataclass(frozen=True, slots=True)
class Credential:
    raw: str                    # the whole header value, used as a cache key
    scheme: str
    macaroons: tuple[str, ...]  # base64 as sent; the first is the primary token
    preimage: bytes


def parse_authorization(value: str | None) -> Credential | None:
    """None when the header is absent or uses another scheme (e.g. Bearer for the upstream).

    Raises MalformedCredential for an L402/LSAT header that does not parse."""
    if not value:
        return None
    if len(value) > MAX_AUTHORIZATION_LEN:
        raise MalformedCredential("Authorization header too long")
    scheme, _, rest = value.strip().partition(" ")
    scheme_u = scheme.upper()
    if scheme_u not in SCHEMES:
        return None
    rest = rest.strip()
    macs, sep, preimage = rest.rpartition(":")
    if not sep:
        raise MalformedCredential(f"{scheme_u} credential must be <macaroon>:<preimage>")
    preimage = preimage.strip()
    if len(preimage) != 64:
        raise MalformedCredential("preimage must be 64 hex characters")
    try:
        preimage_bytes = bytes.fromhex(preimage)
    except ValueError:
        raise MalformedCredential("preimage must be 64 hex characters") from None
    if len(preimage_bytes) != 32:   # fromhex skips embedded spaces
        raise MalformedCredential("preimage must be 64 hex characters")
    parts = tuple(p.strip() for p in macs.split(",")) if "," in macs else (macs.strip(),)
    if not parts[0] or (len(parts) > 1 and any(not _B64.fullmatch(p) for p in parts)):
        raise MalformedCredential("macaroon must be base64")
    return Credential(value, scheme_u, parts, preimage_bytes)


def format_authorization(macaroon_b64: str, preimage_hex: str, scheme: str = "L402") -> str:
    return f"{scheme} {macaroon_b64}:{preimage_hex}"


def challenge_headers(macaroon_b64: str, invoice: str) -> list[str]:
    """WWW-Authenticate values, most specific first."""
    return [
        f'L402 version="0", token="{macaroon_b64}", macaroon="{macaroon_b64}", invoice="{invoice}"',
        f'LSAT macaroon="{macaroon_b64}", invoice="{invoice}"',
    ]


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    macaroon: str
    invoice: str


def parse_challenges(values: list[str]) -> list[Challenge]:
    """Parse WWW-Authenticate values (several headers, or one comma-joined header)."""
    found: list[Challenge] = []
    for value in values:
        # Split a joined header at each scheme token that starts a challenge.
        for chunk in re.split(r"(?:^|,)\s*(?=(?:L402|LSAT)\s)", value, flags=re.IGNORECASE):
            scheme, _, params_text = chunk.strip().partition(" ")
            if scheme.upper() not in SCHEMES:
                continue
            params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
                      for m in _PARAM.finditer(params_text)}
            mac = params.get("token") or params.get("macaroon")
            inv = params.get("invoice")
            if mac and inv:
                found.append(Challenge(scheme.upper(), mac, inv))
    return found


def problem_body(*, title: str, status: int, code: str, detail: str, **extra: object) -> dict[str, object]:
    """RFC 9457 problem details with our stable `error` code."""
    body: dict[str, object] = {"type": f"https://micropay.dev/errors/{code}", "title": title,
                               "status": status, "error": code, "detail": detail}
    body.update(extra)
    return body


_HOW_TO_PAY = {"scheme": "L402", "network": "lightning", "authorization": "L402 <macaroon>:<preimage hex>",
               "spec": "https://github.com/lightning/blips/blob/master/blip-0026.md"}


def _pay_detail(price_msat: int) -> str:
    return f"Pay the invoice ({price_msat} msat) and retry with 'Authorization: L402 <macaroon>:<preimage hex>'."


def payment_required_body(*, resource: str, price_msat: int, invoice: str, payment_hash: str,
                          expires_at: int, macaroon: str, credits: int | None,
                          valid_until: int | None, description: str) -> dict[str, object]:
    return problem_body(
        title="Payment Required", status=402, code="payment_required", detail=_pay_detail(price_msat),
        resource=resource, price_msat=price_msat, invoice=invoice, payment_hash=payment_hash,
        expires_at=expires_at, macaroon=macaroon, credits=credits, valid_until=valid_until,
        description=description, how_to_pay=dict(_HOW_TO_PAY))


# payment_required_body's JSON (as json.dumps writes it) around its per-challenge values,
# for the 402 hot path: one join instead of building and encoding a dict per 402.
_str = json.encoder.encode_basestring_ascii       # what json.dumps writes for a str
_REQUIRED_HEAD = json.dumps(problem_body(title="Payment Required", status=402, code="payment_required",
                                         detail=""))[:-len(', "detail": ""}')]
_REQUIRED_TAIL = ', "how_to_pay": ' + json.dumps(_HOW_TO_PAY) + "}"


def _int(value: int | None) -> str:
    if type(value) is int:
        return str(value)
    return "null" if value is None else json.dumps(value)   # anything else as json.dumps has it


def payment_required_json(*, resource: str, price_msat: int, invoice: str, payment_hash: str,
                          expires_at: int, macaroon: str, credits: int | None,
                          valid_until: int | None, description: str) -> str:
    """json.dumps(payment_required_body(...)), the same text, written out directly."""
    return fill_payment_required(payment_required_frame(resource=resource, price_msat=price_msat, credits=credits,
                                                        description=description),
                                 invoice, payment_hash, expires_at, macaroon, valid_until)


def payment_required_frame(*, resource: str, price_msat: int, credits: int | None,
                           description: str) -> tuple[str, str, str]:
    """payment_required_json's text around the values each challenge has its own of (the
    invoice, its payment hash and expiry, the macaroon, valid_until): what every 402 of
    one resource at one price shares, written once (seller/offer.py keeps it per route)."""
    head = "".join((_REQUIRED_HEAD, ', "detail": ', _str(_pay_detail(price_msat)), ', "resource": ', _str(resource),
                    ', "price_msat": ', _int(price_msat), ', "invoice": '))
    return head, ', "credits": ' + _int(credits) + ', "valid_until": ', \
        ', "description": ' + _str(description) + _REQUIRED_TAIL


def fill_payment_required(frame: tuple[str, str, str], invoice: str, payment_hash: str, expires_at: int,
                          macaroon: str, valid_until: int | None) -> str:
    head, middle, tail = frame
    return "".join((head, _str(invoice), ', "payment_hash": ', _str(payment_hash),
                    ', "expires_at": ', str(expires_at) if type(expires_at) is int else _int(expires_at),
                    ', "macaroon": ', _str(macaroon), middle,
                    "null" if valid_until is None else _int(valid_until), tail))
