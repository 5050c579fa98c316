"""NIP-47 requests and responses, as data: what a request event carries once decrypted,
the answer's content, error codes, and the parameters each method takes, checked.

Kinds: 13194 the service's info event, 23194 a request, 23195 a response, 23197 a
notification (NIP-44) and 23196 its NIP-04 twin. A request says which encryption it
uses in an `encryption` tag ("nip44_v2"; no tag means NIP-04)."""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

INFO, REQUEST, RESPONSE, NOTIFICATION_NIP04, NOTIFICATION = 13194, 23194, 23195, 23196, 23197
NIP44, NIP04 = "nip44_v2", "nip04"
MAX_REQUEST = 64 * 1024              # decrypted request, characters
MAX_METADATA = 4096                  # characters of a `metadata` object, serialized
MAX_DESCRIPTION = 640
MAX_LIST = 100


class Code(enum.StrEnum):
    RATE_LIMITED = "RATE_LIMITED"
    NOT_IMPLEMENTED = "NOT_IMPLEMENTED"
    INSUFFICIENT_BALANCE = "INSUFFICIENT_BALANCE"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    RESTRICTED = "RESTRICTED"
    UNAUTHORIZED = "UNAUTHORIZED"
    INTERNAL = "INTERNAL"
    UNSUPPORTED_ENCRYPTION = "UNSUPPORTED_ENCRYPTION"
    PAYMENT_FAILED = "PAYMENT_FAILED"
    NOT_FOUND = "NOT_FOUND"
    OTHER = "OTHER"


class Method(enum.StrEnum):
    GET_INFO = "get_info"
    GET_BALANCE = "get_balance"
    MAKE_INVOICE = "make_invoice"
    PAY_INVOICE = "pay_invoice"
    PAY_KEYSEND = "pay_keysend"
    LOOKUP_INVOICE = "lookup_invoice"
    LIST_TRANSACTIONS = "list_transactions"


SPENDING = frozenset({Method.PAY_INVOICE, Method.PAY_KEYSEND})
NOTIFICATIONS = ("payment_received", "payment_sent")


class NwcError(Exception):
    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    params: dict[str, Any]


def parse_request(text: str) -> Request:
    """The decrypted content of a request event. Raises NwcError(OTHER)."""
    if len(text) > MAX_REQUEST:
        raise NwcError(Code.OTHER, "request too large")
    try:
        obj = json.loads(text)
    except ValueError:
        raise NwcError(Code.OTHER, "request content is not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("method"), str):
        raise NwcError(Code.OTHER, "request content must be an object with a method")
    params = obj.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise NwcError(Code.OTHER, "params must be an object")
    return Request(obj["method"][:64], params)


def response_content(method: str, result: dict[str, Any] | None, error: NwcError | None) -> str:
    return json.dumps({"result_type": method,
                       "error": None if error is None else {"code": str(error.code), "message": error.message},
                       "result": None if error is not None else result}, separators=(",", ":"))


# -- parameters -----------------------------------------------------------------------
def _msat(params: dict[str, Any], name: str, *, required: bool) -> int | None:
    v = params.get(name)
    if v is None:
        if required:
            raise NwcError(Code.OTHER, f"{name} is required (msat)")
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 21 * 10**14 * 1000:
        raise NwcError(Code.OTHER, f"{name} must be a positive integer (msat)")
    return v


def _text(params: dict[str, Any], name: str, limit: int) -> str | None:
    v = params.get(name)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > limit:
        raise NwcError(Code.OTHER, f"{name} must be a string of at most {limit} characters")
    return v


def _hex(params: dict[str, Any], name: str, n_bytes: int) -> str | None:
    v = _text(params, name, 2 * n_bytes)
    if v is not None and (len(v) != 2 * n_bytes or v.strip("0123456789abcdefABCDEF")):
        raise NwcError(Code.OTHER, f"{name} must be {n_bytes} bytes of hex")
    return None if v is None else v.lower()


def _int(params: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    v = params.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise NwcError(Code.OTHER, f"{name} must be an integer in [{lo}, {hi}]")
    return v


def _metadata(params: dict[str, Any]) -> dict[str, Any] | None:
    v = params.get("metadata")
    if v is None:
        return None
    if not isinstance(v, dict) or len(json.dumps(v)) > MAX_METADATA:
        return None                    # the spec: metadata past its bound is dropped, not refused
    return v


@dataclass(frozen=True, slots=True)
class MakeInvoice:
    amount_msat: int | None        # None: an amountless invoice (our extension; NIP-47 asks for an amount)
    description: str
    description_hash: str | None
    expiry_s: int | None
    metadata: dict[str, Any] | None

    @classmethod
    def parse(cls, p: dict[str, Any]) -> "MakeInvoice":
        return cls(_msat(p, "amount", required=False), _text(p, "description", MAX_DESCRIPTION) or "",
                   _hex(p, "description_hash", 32), _int(p, "expiry", 60, 30 * 86400), _metadata(p))


@dataclass(frozen=True, slots=True)
class PayInvoice:
    invoice: str
    amount_msat: int | None
    metadata: dict[str, Any] | None

    @classmethod
    def parse(cls, p: dict[str, Any]) -> "PayInvoice":
        invoice = _text(p, "invoice", 8192)
        if not invoice:
            raise NwcError(Code.OTHER, "invoice is required")
        return cls(invoice.strip(), _msat(p, "amount", required=False), _metadata(p))


@dataclass(frozen=True, slots=True)
class PayKeysend:
    amount_msat: int
    pubkey: str
    preimage: str | None
    tlv_records: dict[str, str]

    @classmethod
    def parse(cls, p: dict[str, Any]) -> "PayKeysend":
        pubkey = _hex(p, "pubkey", 33)
        if pubkey is None:
            raise NwcError(Code.OTHER, "pubkey is required (33 bytes of hex)")
        if p.get("preimage") is not None:
            raise NwcError(Code.NOT_IMPLEMENTED, "a caller-chosen keysend preimage is not supported")
        tlvs: dict[str, str] = {}
        records = p.get("tlv_records") or []
        if not isinstance(records, list) or len(records) > 16:
            raise NwcError(Code.OTHER, "tlv_records must be a list of at most 16 records")
        for r in records:
            t = r.get("type") if isinstance(r, dict) else None
            v = r.get("value") if isinstance(r, dict) else None
            if (not isinstance(t, int) or isinstance(t, bool) or not 65536 <= t < 2**64 or not isinstance(v, str)
                    or len(v) > 2048 or len(v) % 2 or v.strip("0123456789abcdefABCDEF")):
                raise NwcError(Code.OTHER, "each tlv record is {type: integer >= 65536, value: hex}")
            tlvs[str(t)] = v.lower()
        return cls(_msat(p, "amount", required=True), pubkey, None, tlvs)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class LookupInvoice:
    payment_hash: str | None
    invoice: str | None

    @classmethod
    def parse(cls, p: dict[str, Any]) -> "LookupInvoice":
        h, inv = _hex(p, "payment_hash", 32), _text(p, "invoice", 8192)
        if h is None and not inv:
            raise NwcError(Code.OTHER, "payment_hash or invoice is required")
        return cls(h, inv.strip() if inv else None)


@dataclass(frozen=True, slots=True)
class ListTransactions:
    from_s: int
    until_s: int | None
    limit: int
    offset: int
    unpaid: bool
    type: str | None

    @classmethod
    def parse(cls, p: dict[str, Any]) -> "ListTransactions":
        kind = p.get("type")
        if kind not in (None, "incoming", "outgoing"):
            raise NwcError(Code.OTHER, "type is incoming or outgoing")
        unpaid = p.get("unpaid", False)
        if not isinstance(unpaid, bool):
            raise NwcError(Code.OTHER, "unpaid is true or false")
        return cls(_int(p, "from", 0, 2**40) or 0, _int(p, "until", 0, 2**40), _int(p, "limit", 1, MAX_LIST) or 20,
                   _int(p, "offset", 0, 10**6) or 0, unpaid, kind)
