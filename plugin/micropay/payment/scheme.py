"""The "Payment" HTTP authentication scheme (draft-httpauth-payment, "MPP") with the
Lightning method's charge intent (draft-lightning-charge) and session intent
(draft-lightning-session): wire format and checks, no I/O.

A 402 offers it beside L402 on the same invoice. The challenge needs no store write:
its `id` is an HMAC-SHA256 over the seven positional slots the core draft recommends
(realm, method, intent, request, expires, digest, opaque), under a key derived from
the sidecar's root keys, so every replica sharing those keys verifies it. `opaque`
carries what the server needs back (the route, the L402 token id of the same invoice,
the query digest for hook-priced routes, the payment hash and the price), bound by the
same HMAC. The preimage is
checked against the payment hash inside the bound `request`. Single use is the store's
job (the caller records the consumption atomically).

JSON objects on the wire are JCS (RFC 8785) and base64url without padding. Our objects
hold only ASCII keys, strings and small integers, for which JCS is sorted keys, no
whitespace, and JSON string escaping of control characters, `"` and `\\`.
"""
from __future__ import annotations

import binascii
import datetime as dt
import functools
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from ..core.hmacs import FixedKeyHmac
from ..core.errors import (PaymentChallengeExpired, PaymentCredentialMalformed, PaymentInvalidPreimage,
                           PaymentUnknownChallenge)

SCHEME = "Payment"
METHOD = "lightning"
CHARGE = "charge"
SESSION = "session"
SESSION_ACTIONS = ("open", "bearer", "topUp", "close")
MAX_CREDENTIAL_LEN = 16_384            # a credential echoes a challenge with a BOLT11 invoice
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NETWORKS = (("lnbcrt", "regtest"), ("lntbs", "signet"), ("lnbc", "mainnet"))   # longest prefix first
_decode_json = json.JSONDecoder().decode     # json.loads minus its per-call set-up
_REQUIRED_ECHO = ("id", "realm", "method", "intent", "request")
ECHO_FIELDS = ("id", "realm", "method", "intent", "request", "expires", "opaque", "digest", "description")


# -- encodings ------------------------------------------------------------------------

_encode_jcs = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
# One JSON string as _encode_jcs writes it (the encoder calls this same function).
_jcs_str = json.encoder.encode_basestring


def jcs(obj: Any) -> bytes:
    """RFC 8785 for objects of ASCII keys, strings, integers, lists and objects."""
    return _encode_jcs(obj).encode()


def b64url(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


def unb64url(text: str, limit: int = MAX_CREDENTIAL_LEN) -> bytes:
    """Decode base64url with or without padding; ValueError on anything else.
    (binascii's strict mode checks the alphabet in C: a regular expression over a 1 kB
    credential cost more than the rest of its verification.)"""
    if not isinstance(text, str) or len(text) > limit or "+" in text or "/" in text or text.endswith("==="):
        raise ValueError("not base64url")
    text = text.rstrip("=")
    try:
        data = (text + "=" * (-len(text) % 4)).encode("ascii").translate(_FROM_URLSAFE)
        return binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError):       # UnicodeEncodeError is a ValueError
        raise ValueError("not base64url") from None


def encode_object(obj: dict[str, Any]) -> str:
    return b64url(jcs(obj))


@functools.lru_cache(maxsize=1024)      # challenges made in the same second share their expiry
def rfc3339(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts)))


def parse_rfc3339(text: str) -> int:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except (TypeError, ValueError):
        raise ValueError("not an RFC 3339 date-time") from None
    if value.tzinfo is None:
        raise ValueError("an RFC 3339 date-time needs a time zone")
    return int(value.timestamp())


def network_of(bolt11: str) -> str | None:
    """The Lightning method's network name for an invoice, None for testnet (not listed)."""
    lower = bolt11.lower()
    for prefix, name in _NETWORKS:
        if lower.startswith(prefix) and not (prefix == "lnbc" and lower.startswith("lnbcrt")):
            return name
    return None


def _escape(value: str) -> str:
    """A quoted-string's content (RFC 9110): '"' and '\\' escaped."""
    if '"' in value or "\\" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"')
    return value


# -- challenges -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Challenge:
    id: str
    realm: str
    method: str
    intent: str
    request: str                 # base64url JCS
    expires: str = ""
    opaque: str = ""             # base64url JCS, flat string map
    digest: str = ""
    description: str = ""

    def header(self) -> str:
        # ChargeForm.header writes the same for a charge (tests/seller/test_offer.py holds them equal)
        values = (self.id, self.realm, self.method, self.intent, self.request, self.expires, self.digest,
                  self.opaque, self.description)
        joined = "".join(values)
        if '"' in joined or "\\" in joined:     # never in a challenge we make: escaped only then
            values = tuple(map(_escape, values))
        cid, realm, method, intent, request, expires, digest, opaque, description = values
        out = f'{SCHEME} id="{cid}", realm="{realm}", method="{method}", intent="{intent}", request="{request}"'
        if expires:
            out += f', expires="{expires}"'
        if digest:
            out += f', digest="{digest}"'
        if opaque:
            out += f', opaque="{opaque}"'
        if description:
            out += f', description="{description}"'
        return out

    def echo(self) -> dict[str, str]:
        """The challenge as a credential echoes it."""
        return {k: getattr(self, k) for k in ECHO_FIELDS if getattr(self, k)}


class Binder:
    """Challenge ids bound to their parameters (the core draft's HMAC-SHA256 binding)."""

    def __init__(self, secrets: list[bytes], *, derive: bool = True) -> None:
        """`secrets`: the root keys, current first; each is turned into its own binding
        key so the root key itself never signs anything but macaroons. `derive=False`
        uses the secrets as HMAC keys as they are (to compare with other implementations)."""
        if not secrets:
            raise ValueError("at least one binding secret is needed")
        keys = [hmac.digest(s, b"micropay payment-auth challenge binding v1", hashlib.sha256)
                if derive else s for s in secrets]
        # Each key's padded blocks hashed once (hmac.digest sets up OpenSSL's HMAC anew on
        # every call: about twice the cost of a 402's one binding).
        self._macs = [FixedKeyHmac(k) for k in keys]

    @staticmethod
    def _input(realm: str, method: str, intent: str, request: str, expires: str, digest: str,
               opaque: str) -> bytes:
        # surrogatepass: a lone surrogate in an echoed parameter (parse_credential refuses
        # them, but verify takes any dict) makes a mismatch, never an exception.
        text = "|".join((realm, method, intent, request, expires, digest, opaque))
        return text.encode("utf-8", "surrogatepass")

    def bind(self, realm: str, method: str, intent: str, request: str, expires: str = "",
             digest: str = "", opaque: str = "") -> str:
        """The id for these parameters, under the current (first) key."""
        msg = self._input(realm, method, intent, request, expires, digest, opaque)
        return b64url(self._macs[0](msg))

    def verify(self, echo: dict[str, str]) -> bool:
        """True when the echoed id was made by one of our keys for exactly these parameters."""
        msg = self._input(echo.get("realm", ""), echo.get("method", ""), echo.get("intent", ""),
                          echo.get("request", ""), echo.get("expires", ""), echo.get("digest", ""),
                          echo.get("opaque", ""))
        given = echo.get("id", "").encode("utf-8", "surrogatepass")
        ok = False
        for mac in self._macs:       # every key in the ring: a rotation keeps recent challenges valid
            ok |= hmac.compare_digest(b64url(mac(msg)).encode(), given)
        return ok


def binder_for(keyring: Any) -> Binder:
    """The binder of a token key ring (tokens.RootKeyRing): current key first, the others
    after it, so challenges made before a rotation still verify while their key is kept.
    A retired key binds and verifies nothing, as it verifies no L402 token: whoever holds
    it (a leaked key is why keys are retired) could otherwise bind a challenge of their
    own, for an invoice they know the preimage of."""
    keys = [keyring.keys[keyring.current]] + [k for kid, k in keyring.keys.items()
                                              if kid != keyring.current and k.retired_at is None]
    return Binder([k.secret for k in keys])


def whole_sats(price_msat: int) -> bool:
    """The Lightning method's `amount` is in satoshis: other prices are L402 only."""
    return price_msat > 0 and price_msat % 1000 == 0


def content_digest(body: bytes) -> str:
    """The request body's digest as RFC 9530's Content-Digest writes it (sha-256, a
    structured-field byte sequence: standard base64 between colons): the value of the
    core draft's `digest` parameter."""
    return "sha-256=:" + binascii.b2a_base64(hashlib.sha256(body).digest(), newline=False).decode() + ":"


def charge_challenge(binder: Binder, *, realm: str, bolt11: str, payment_hash: str, price_msat: int,
                     expires_at: int, description: str, opaque: dict[str, str], digest: str = "") -> Challenge:
    """A charge challenge for an invoice the node issued (L402's, shared). `digest`: the
    request body's content_digest, for a request that has one (POST, PUT, PATCH): the
    credential then buys a request with that body only."""
    if not whole_sats(price_msat):
        raise ValueError("a Payment charge needs a whole number of satoshis")
    request = _charge_request(_charge_request_head(price_msat // 1000, description), bolt11, payment_hash)
    expires = rfc3339(expires_at)            # the invoice's own expiry: never later
    opaque_b64 = b64url(_jcs_flat(dict(opaque, hash=payment_hash, msat=str(price_msat))).encode())
    cid = binder.bind(realm, METHOD, CHARGE, request, expires, digest, opaque_b64)
    return Challenge(cid, realm, METHOD, CHARGE, request, expires, opaque_b64, digest)


class ChargeForm:
    """The charge challenges of one realm, price, description and fixed `opaque` entries
    (a 402's route), written out once but for what each challenge has its own of: the
    invoice, its payment hash and expiry, the L402 token id of the same invoice (opaque's
    `token`) and the request's digest. `header` is the same text as charge_challenge(...)
    .header() with opaque = dict(opaque, token=token) (tests/seller/test_offer.py)."""

    __slots__ = ("realm", "_request_head", "_opaque", "_header_head")

    def __init__(self, *, realm: str, price_msat: int, description: str, opaque: dict[str, str]) -> None:
        if not whole_sats(price_msat):
            raise ValueError("a Payment charge needs a whole number of satoshis")
        if not opaque.keys().isdisjoint(("hash", "msat", "token")):
            raise ValueError("opaque's hash, msat and token are the challenge's own")
        self.realm = realm
        self._request_head = _charge_request_head(price_msat // 1000, description)
        # opaque's JCS (keys sorted) cut at its two per-challenge values, hash and token
        fixed = dict(opaque, msat=str(price_msat))
        parts, text = [], "{"
        for i, key in enumerate(sorted([*fixed, "hash", "token"])):
            text += ("," if i else "") + _jcs_str(key) + ":"
            if key in ("hash", "token"):
                parts.append(text)
                text = ""
            else:
                text += _jcs_str(fixed[key])
        self._opaque = (parts[0], parts[1], text + "}")
        self._header_head = f'{SCHEME} id="', f'", realm="{_escape(realm)}", method="{METHOD}", intent="{CHARGE}"'

    def header(self, binder: Binder, bolt11: str, payment_hash: str, expires_at: int, token: str,
               digest: str = "") -> str:
        """The WWW-Authenticate value of this invoice's charge challenge."""
        request = _charge_request(self._request_head, bolt11, payment_hash)
        expires = rfc3339(expires_at)
        before_hash, before_token, tail = self._opaque
        opaque = b64url((before_hash + _jcs_str(payment_hash) + before_token + _jcs_str(token) + tail).encode())
        cid = binder.bind(self.realm, METHOD, CHARGE, request, expires, digest, opaque)
        id_head, realm_to_intent = self._header_head
        if digest:
            return (f'{id_head}{cid}{realm_to_intent}, request="{request}", expires="{expires}", '
                    f'digest="{_escape(digest)}", opaque="{opaque}"')
        return f'{id_head}{cid}{realm_to_intent}, request="{request}", expires="{expires}", opaque="{opaque}"'


def _charge_request(head: str, bolt11: str, payment_hash: str) -> str:
    """The charge's `request`: JCS of {"amount", "currency", "description", "methodDetails":
    {"invoice", "network" (unless testnet), "paymentHash"}}, written out in that (sorted)
    order after `head` (_charge_request_head: the same for every challenge of a price and
    description), base64url."""
    network = network_of(bolt11)
    return b64url((head + _jcs_str(bolt11) + (',"network":' + _jcs_str(network) if network is not None else "")
                   + ',"paymentHash":' + _jcs_str(payment_hash) + "}}").encode())


@functools.lru_cache(maxsize=256, typed=True)
def _charge_request_head(sats: int, description: str) -> str:
    return ('{"amount":' + _jcs_str(str(sats)) + ',"currency":"sat","description":' + _jcs_str(description)
            + ',"methodDetails":{"invoice":')


def _jcs_flat(obj: dict[str, str]) -> str:
    """JCS of a flat map of strings (what `opaque` is): the same text as jcs(obj)."""
    return "{" + ",".join([_jcs_str(k) + ":" + _jcs_str(obj[k]) for k in sorted(obj)]) + "}"


_PARAM = re.compile(r'([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
_UNESCAPE = re.compile(r"\\(.)")
_SPLIT = re.compile(r"(?:^|,)\s*(?=(?:L402|LSAT|Payment)\s)", re.IGNORECASE)


def parse_challenges(values: list[str]) -> list[Challenge]:
    """The Payment challenges among WWW-Authenticate values (several headers, or one
    comma-joined header that may also hold L402 challenges). Incomplete ones are skipped."""
    found: list[Challenge] = []
    for value in values:
        for chunk in _SPLIT.split(value):
            scheme, _, rest = chunk.strip().partition(" ")
            if scheme.lower() != "payment":
                continue
            params: dict[str, str] = {}
            for m in _PARAM.finditer(rest):
                text = _UNESCAPE.sub(r"\1", m.group(2)) if m.group(2) is not None else m.group(3)
                params.setdefault(m.group(1).lower(), text)
            if all(params.get(k) for k in _REQUIRED_ECHO):
                found.append(Challenge(params["id"], params["realm"], params["method"], params["intent"],
                                       params["request"], params.get("expires", ""), params.get("opaque", ""),
                                       params.get("digest", ""), params.get("description", "")))
    return found


def decode_object(text: str) -> dict[str, Any]:
    """base64url JSON of an object (a `request`, a `Payment-Receipt`); ValueError otherwise."""
    try:
        json_text = unb64url(text).decode()
        doc = _decode_json(json_text)
    except (UnicodeDecodeError, RecursionError):
        raise ValueError("not base64url JSON") from None
    if type(doc) is not dict:
        raise ValueError("not a JSON object")
    if "\\u" in json_text and _has_lone_surrogate(doc):
        raise ValueError("the JSON holds a lone surrogate")
    return doc


def _has_lone_surrogate(doc: Any) -> bool:
    """A string anywhere in decoded JSON (keys included) holds a lone surrogate: JSON's
    `\\ud800` escape decodes to one, and such a string cannot be encoded as UTF-8."""
    stack = [doc]
    while stack:
        item = stack.pop()
        if type(item) is str:
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif type(item) is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return False


def decode_request(ch: Challenge) -> dict[str, Any]:
    """The challenge's `request` object; ValueError if it is not base64url JSON of an object."""
    return decode_object(ch.request)


def format_credential(ch: Challenge, preimage_hex: str) -> str:
    """The Authorization value that presents a paid charge."""
    return "Payment " + encode_object({"challenge": ch.echo(), "payload": {"preimage": preimage_hex}})


# -- credentials ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Credential:
    challenge: dict[str, str]
    payload: dict[str, Any]
    source: str | None


def is_payment(authorization: str | None) -> bool:
    """The Authorization header names the Payment scheme (with or without a credential)."""
    return (authorization is not None and authorization[:7].lower() == "payment"
            and (len(authorization) == 7 or authorization[7] == " "))


def parse_credential(authorization: str) -> Credential:
    """`Payment <base64url JSON>` -> Credential. Raises PaymentCredentialMalformed."""
    token = authorization[8:].strip() if is_payment(authorization) else ""
    try:
        token_text = unb64url(token).decode()
        doc = _decode_json(token_text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise PaymentCredentialMalformed("the credential is not base64url-encoded JSON") from None
    if type(doc) is not dict:
        raise PaymentCredentialMalformed("the credential must be a JSON object")
    challenge, payload, source = doc.get("challenge"), doc.get("payload"), doc.get("source")
    if type(challenge) is not dict:
        raise PaymentCredentialMalformed("challenge must echo id, realm, method, intent and request")
    for k in _REQUIRED_ECHO:
        if not challenge.get(k):
            raise PaymentCredentialMalformed("challenge must echo id, realm, method, intent and request")
    for v in challenge.values():
        if type(v) is not str:
            raise PaymentCredentialMalformed("every echoed challenge parameter must be a string")
    if type(payload) is not dict:
        raise PaymentCredentialMalformed("payload must be an object")
    if source is not None and not isinstance(source, str):
        raise PaymentCredentialMalformed("source must be a string")
    if "\\u" in token_text and _has_lone_surrogate(doc):
        raise PaymentCredentialMalformed("the credential's JSON holds a lone surrogate (\\ud800-\\udfff): "
                                         "not Unicode text")
    return Credential({k: v for k, v in challenge.items() if k in ECHO_FIELDS}, payload, source)


@dataclass(frozen=True, slots=True)
class VerifiedCharge:
    challenge_id: str
    payment_hash: str
    amount_msat: int
    opaque: dict[str, str]


def verify_charge(binder: Binder, cred: Credential, *, realm: str, now: int, digest: str = "") -> VerifiedCharge:
    """Steps 2-6 of the Lightning charge verification, statelessly. Raises a Payment* error.
    `digest`: this request's body digest (content_digest), "" for a request without a body;
    it must be the one the challenge was issued for (the core draft: "Reject the credential
    if the digests do not match"), so a credential bought for one body buys no other, and
    one bought for a request without a body buys none with a body."""
    echo = _our_echo(binder, cred, CHARGE, realm, "challenge")
    if not hmac.compare_digest(echo.get("digest", "").encode(), digest.encode()):
        raise PaymentUnknownChallenge("the challenge was issued for a request with another body (digest)")
    preimage = _hex64(cred.payload, "preimage")
    try:
        # Everything echoed is exactly what we issued (the HMAC above), so the payment
        # hash and amount are read from `opaque`, which we also wrote, rather than by
        # decoding `request` (which carries the invoice: twice the bytes to decode).
        expires = parse_rfc3339(echo["expires"]) if echo.get("expires") else None
        opaque = _decode_json(unb64url(echo["opaque"]).decode()) if echo.get("opaque") else {}
        payment_hash = opaque["hash"]
        amount_msat = int(opaque["msat"])
    except (ValueError, KeyError, TypeError):      # bound by our HMAC: only if we wrote it wrong
        raise PaymentUnknownChallenge("the challenge's request cannot be read") from None
    if expires is None or expires <= now:
        raise PaymentChallengeExpired("the challenge and its invoice have expired")
    if hashlib.sha256(bytes.fromhex(preimage)).hexdigest() != payment_hash:
        raise PaymentInvalidPreimage("SHA-256 of the preimage is not this challenge's payment hash")
    return VerifiedCharge(echo["id"], payment_hash, amount_msat, opaque)


def receipt(challenge_id: str, payment_hash: str, now: int) -> str:
    """The Payment-Receipt header value for a served charge: the JCS of {"challengeId",
    "method", "reference", "status", "timestamp"}, written out in that (sorted) order."""
    return b64url(('{"challengeId":' + _jcs_str(challenge_id) + ',"method":' + _jcs_str(METHOD)
                   + ',"reference":' + _jcs_str(payment_hash) + ',"status":"success","timestamp":'
                   + _jcs_str(rfc3339(now)) + "}").encode())


# -- the session intent (draft-lightning-session) ---------------------------------------

def session_challenge(binder: Binder, *, realm: str, bolt11: str, payment_hash: str, unit_msat: int,
                      deposit_msat: int, expires_at: int, idle_timeout_s: int, description: str,
                      unit_type: str, opaque: dict[str, str]) -> Challenge:
    """A session challenge: `amount` is the price of one unit, the invoice is the deposit
    (to open a session, or to top one up: the same challenge serves both)."""
    if not whole_sats(unit_msat) or not whole_sats(deposit_msat):
        raise ValueError("a Payment session needs whole satoshis per unit and per deposit")
    fields = {"amount": str(unit_msat // 1000), "currency": "sat", "description": description,
              "depositInvoice": bolt11, "paymentHash": payment_hash,
              "depositAmount": str(deposit_msat // 1000), "idleTimeout": str(idle_timeout_s)}
    if unit_type:
        fields["unitType"] = unit_type
    request = encode_object(fields)
    expires = rfc3339(expires_at)
    opaque_b64 = encode_object(dict(opaque, hash=payment_hash, msat=str(deposit_msat), unit=str(unit_msat)))
    cid = binder.bind(realm, METHOD, SESSION, request, expires, "", opaque_b64)
    return Challenge(cid, realm, METHOD, SESSION, request, expires, opaque_b64)


@dataclass(frozen=True, slots=True)
class SessionAction:
    """A verified session credential. `session_id` is the deposit's payment hash for
    open, and the named session for the others; `deposit_msat` is what an open or
    topUp pays in (0 for bearer and close)."""

    action: str
    challenge_id: str
    session_id: str
    route: str
    unit_msat: int
    deposit_msat: int
    token_id: str              # the deposit invoice's token (single use), "" for bearer/close
    return_invoice: str = ""
    deposit_invoice: str = ""


def _our_echo(binder: Binder, cred: Credential, intent: str, realm: str, what: str) -> dict[str, str]:
    """The credential's echoed challenge, if this server issued it for `intent` and it is
    unaltered (its id is the HMAC of its parameters)."""
    echo = cred.challenge
    if echo.get("method") != METHOD or echo.get("intent") != intent or echo.get("realm") != realm:
        raise PaymentUnknownChallenge(f"this server issued no such {what} (method, intent or realm)")
    if not binder.verify(echo):
        raise PaymentUnknownChallenge("this server issued no such challenge, or it was altered")
    return echo


def _hex64(payload: dict[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise PaymentCredentialMalformed(f"payload.{key} must be 64 lowercase hex characters")
    return value


def verify_session(binder: Binder, cred: Credential, *, realm: str, now: int) -> SessionAction:
    """Check a session credential without the store: the echoed challenge is ours and
    unaltered, and the preimage opens what it claims to (the deposit's payment hash for
    open and topUp, the session id for bearer and close). Expiry applies to the actions
    that pay a deposit; bearer and close may echo any earlier challenge of ours."""
    echo = _our_echo(binder, cred, SESSION, realm, "session challenge")
    action = cred.payload.get("action")
    if action not in SESSION_ACTIONS:
        raise PaymentCredentialMalformed("payload.action must be one of " + ", ".join(SESSION_ACTIONS))
    try:
        opaque = _decode_json(unb64url(echo["opaque"]).decode()) if echo.get("opaque") else {}
        deposit_hash, deposit_msat, unit_msat = opaque["hash"], int(opaque["msat"]), int(opaque["unit"])
        expires = parse_rfc3339(echo["expires"]) if echo.get("expires") else None
    except (ValueError, KeyError, TypeError):      # bound by our HMAC: only if we wrote it wrong
        raise PaymentUnknownChallenge("the challenge's parameters cannot be read") from None
    route, token = opaque.get("route", ""), opaque.get("token", "")
    if action in ("open", "topUp"):
        preimage = _hex64(cred.payload, "preimage" if action == "open" else "topUpPreimage")
        if expires is None or expires <= now:
            raise PaymentChallengeExpired("the challenge and its deposit invoice have expired")
        if hashlib.sha256(bytes.fromhex(preimage)).hexdigest() != deposit_hash:
            raise PaymentInvalidPreimage("SHA-256 of the preimage is not this challenge's payment hash")
        if action == "open":
            ret = cred.payload.get("returnInvoice")
            if not isinstance(ret, str) or not ret or len(ret) > 4096:
                raise PaymentCredentialMalformed("payload.returnInvoice must be a BOLT11 invoice")
            try:
                deposit_invoice = decode_request(Challenge(**{k: echo.get(k, "") for k in ECHO_FIELDS}))
            except ValueError:
                raise PaymentUnknownChallenge("the challenge's request cannot be read") from None
            return SessionAction("open", echo["id"], deposit_hash, route, unit_msat, deposit_msat, token,
                                 ret, str(deposit_invoice.get("depositInvoice", "")))
        return SessionAction("topUp", echo["id"], _hex64(cred.payload, "sessionId"), route, unit_msat,
                             deposit_msat, token)
    session_id = _hex64(cred.payload, "sessionId")
    preimage = _hex64(cred.payload, "preimage")
    if hashlib.sha256(bytes.fromhex(preimage)).hexdigest() != session_id:
        raise PaymentInvalidPreimage("SHA-256 of the preimage is not the session id")
    return SessionAction(action, echo["id"], session_id, route, unit_msat, 0, "")


def format_session_credential(ch: Challenge, payload: dict[str, str]) -> str:
    """The Authorization value for a session action (`payload` holds `action` and its fields)."""
    return "Payment " + encode_object({"challenge": ch.echo(), "payload": payload})


def session_receipt(session_id: str, now: int, **extra: Any) -> str:
    """Payment-Receipt for a session action (close adds refundSats and refundStatus)."""
    return encode_object(dict({"method": METHOD, "reference": session_id, "status": "success",
                               "timestamp": rfc3339(now)}, **extra))


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    """One Server-Sent Events event with a JSON data line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
