"""Lightning Zaps (NIP-57) on the server's side, pure: checking a zap request (kind 9734)
that arrives on the LNURL-pay callback (Appendix D), and making the zap receipt
(kind 9735) once its invoice is paid (Appendix E). No I/O: publishing the receipt is
`zap_publish`.

The zap request's JSON text, exactly as received, is the invoice description: its sha256
is the BOLT11 `h` of the invoice, and the receipt's `description` tag repeats the text
byte for byte, so keep `ZapRequest.raw` untouched from the callback to the receipt.

Every refusal is a ZapError whose text is meant for the payer (the callback's
{"status": "ERROR", "reason": ...}).
"""
from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..core.errors import BadRequest
from ..core.inputs import decimal, load_json
from ..nostr.event import Event, parse_event, sign_event
from ..nostr.keys import Keys, NostrError, is_hex, parse_pubkey
from ..nostr.urls import relay_url

__all__ = ["ZapError", "ZapRequest", "parse_zap_request", "zap_receipt", "receipt_filter", "description_hash",
           "is_public_host", "ZAP_REQUEST", "ZAP_RECEIPT", "MAX_REQUEST_BYTES", "MAX_RELAYS"]

ZAP_REQUEST = 9734
ZAP_RECEIPT = 9735
MAX_REQUEST_BYTES = 16 * 1024      # the zap request's JSON text, UTF-8
MAX_RELAYS = 10                    # distinct valid relays kept from a request
MAX_RELAY_ENTRIES = 64             # relay entries looked at, valid or not
MAX_RELAY_URL = 512
MAX_BOLT11 = 8 * 1024
MAX_AMOUNT_MSAT = 21_000_000 * 100_000_000 * 1000
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".lan")


class ZapError(ValueError):
    """A zap request the server will not take, or receipt inputs that make no receipt.
    The text says why, in words fit for the payer."""


@dataclass(frozen=True, slots=True)
class ZapRequest:
    """A checked zap request.

    raw: the JSON text exactly as received (the invoice description and the receipt's
    `description` tag); event: the parsed, verified event; recipient: its `p`;
    event_id / coordinate: its `e` / `a`, if any; relays: where the receipt goes (1 to
    MAX_RELAYS normalised URLs); sender: the event's pubkey (the receipt's `P`);
    amount_msat: the amount the request was checked against; target_kind: its `k`, if any.
    """

    raw: str
    event: Event
    recipient: str
    event_id: str | None
    coordinate: str | None
    relays: tuple[str, ...]
    sender: str
    amount_msat: int
    target_kind: str | None = None

    @property
    def comment(self) -> str:
        """The zap comment: the request's content (may be empty)."""
        return self.event.content


# -- checking a zap request (Appendix D) ---------------------------------------------------
def parse_zap_request(text: str, *, amount_msat: int, nostr_pubkey: str, lnurl: str | None = None,
                      recipient: str | None = None, allow_local_relays: bool = False) -> ZapRequest:
    """Check the callback's `nostr` parameter (already URL-decoded) against the callback's
    `amount` (msat). Raises ZapError with the reason.

    Checked, as NIP-57 Appendix D asks: JSON of at most MAX_REQUEST_BYTES; a Nostr event
    whose id and signature verify; kind 9734; tags present; exactly one `p` (a public
    key); zero or one `e` (an event id); zero or one `a` (an event coordinate, NIP-01);
    zero or one `P`; a `relays` tag with at least one usable relay; an `amount` tag, if
    present, equal to `amount_msat`; an `lnurl` tag, if present and `lnurl` is given,
    equal to it (case-insensitively: bech32 is case-insensitive).

    The `p` tag: NIP-57 makes it the *recipient's* Nostr pubkey (the profile or note
    author being zapped), not the key the server signs receipts with (`nostrPubkey`).
    The two are different keys in nearly every deployment (a creator's own key vs. the
    server's receipt key), so requiring `p == nostrPubkey` would refuse the zaps real
    clients send. It is not required. Safety does not depend on it: a receipt only counts
    for a recipient whose own Lightning Address advertises our `nostrPubkey` (Appendix F),
    and a receipt is only made after our invoice was paid. A server that knows the
    creator's Nostr key can still pin it with `recipient=` (then `p` must equal it).

    The `P` tag: Appendix D says "MUST be equal to the zap receipt's pubkey", which read
    literally is our `nostrPubkey`, while Appendix E puts the zap *sender* in the
    receipt's `P`. Either is taken; anything else is refused. The receipt's `P` is
    always the request's own pubkey, never copied from this tag.

    Relays: up to MAX_RELAY_ENTRIES entries of every `relays` tag are read; unusable
    ones are skipped, and the first MAX_RELAYS distinct usable ones kept. Unless
    `allow_local_relays`, relays on loopback, private or link-local IP literals and on
    local names (localhost, *.local, ...) are unusable: the server would otherwise
    connect wherever a payer points it. (Names that *resolve* to such addresses are
    stopped when publishing; see zap_publish.)
    """
    _check_amount(amount_msat)
    parse_pubkey(nostr_pubkey)              # the server's own configuration; NostrError if wrong
    event = _event(text)
    if event.kind != ZAP_REQUEST:
        raise ZapError(f"a zap request is a Nostr event of kind {ZAP_REQUEST}, this one is of kind {event.kind}")
    if not event.tags:
        raise ZapError("the zap request has no tags")
    p = _pubkey_tag(_single(event, "p", required=True), "p")
    if recipient is not None and p != recipient:
        raise ZapError("the zap request's p tag is not this Lightning Address's Nostr pubkey")
    e = _single(event, "e")
    if e is not None and not is_hex(e, 32):
        raise ZapError("the zap request's e tag must be an event id (64 lowercase hex characters)")
    a = _single(event, "a")
    if a is not None:
        _check_coordinate(a)
    big_p = _single(event, "P")
    if big_p is not None and _pubkey_tag(big_p, "P") not in (event.pubkey, nostr_pubkey):
        raise ZapError("the zap request's P tag must be the sender's pubkey (or the receipt signer's)")
    _check_amount_tag(event, amount_msat)
    _check_lnurl_tag(event, lnurl)
    k = _single(event, "k")
    if k is not None and (decimal(k, 5) is None or int(k) > 65535):
        raise ZapError("the zap request's k tag must be an event kind (a number up to 65535)")
    return ZapRequest(raw=text, event=event, recipient=p, event_id=e, coordinate=a,
                      relays=_relays(event, allow_local_relays), sender=event.pubkey,
                      amount_msat=amount_msat, target_kind=k)


def _check_amount(amount_msat: object) -> None:
    if (not isinstance(amount_msat, int) or isinstance(amount_msat, bool)
            or not 0 < amount_msat <= MAX_AMOUNT_MSAT):
        raise ZapError("the amount must be a positive whole number of millisatoshis")


def _event(text: object) -> Event:
    if not isinstance(text, str) or not text:
        raise ZapError("the nostr parameter must carry the zap request (a JSON Nostr event)")
    if len(text) > MAX_REQUEST_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_REQUEST_BYTES:
        raise ZapError(f"the zap request is larger than {MAX_REQUEST_BYTES} bytes")
    try:
        obj = load_json(text, "the zap request")
    except BadRequest as exc:
        raise ZapError(str(exc)) from None
    try:
        return parse_event(obj)
    except NostrError as exc:
        raise ZapError(f"the zap request is not a valid Nostr event: {exc}") from None


def _values(event: Event, name: str) -> list[tuple[str, ...]]:
    return [t for t in event.tags if t[0] == name]


def _single(event: Event, name: str, *, required: bool = False) -> str | None:
    tags = _values(event, name)
    if len(tags) > 1:
        raise ZapError(f"the zap request must have at most one {name} tag, it has {len(tags)}")
    if not tags:
        if required:
            raise ZapError(f"the zap request must have a {name} tag")
        return None
    if len(tags[0]) < 2 or not tags[0][1]:
        raise ZapError(f"the zap request's {name} tag has no value")
    return tags[0][1]


def _pubkey_tag(value: str | None, name: str) -> str:
    try:
        parse_pubkey(value)
    except NostrError as exc:
        raise ZapError(f"the zap request's {name} tag: {exc}") from None
    return value  # type: ignore[return-value]


def _check_coordinate(value: str) -> None:
    """NIP-01: "<kind>:<pubkey hex>:<d tag>" for an addressable event (kind 30000-39999),
    "<kind>:<pubkey hex>:" for a replaceable one (0, 3, 10000-19999)."""
    parts = value.split(":", 2)
    reason = "the zap request's a tag must be an event coordinate, kind:pubkey:d-tag"
    if len(parts) != 3 or decimal(parts[0], 5) is None or not is_hex(parts[1], 32):
        raise ZapError(reason)
    kind = int(parts[0])
    if not (30000 <= kind < 40000 or kind in (0, 3) or 10000 <= kind < 20000):
        raise ZapError(f"the zap request's a tag must point to a replaceable or addressable event, not kind {kind}")


def _check_amount_tag(event: Event, amount_msat: int) -> None:
    tags = _values(event, "amount")
    if len(tags) > 1:
        raise ZapError("the zap request must have at most one amount tag")
    if not tags:
        return
    value = tags[0][1] if len(tags[0]) > 1 else ""
    tagged = decimal(value, 19)
    if tagged is None:
        raise ZapError("the zap request's amount tag must be a whole number of millisatoshis")
    if tagged != amount_msat:
        raise ZapError(f"the zap request is for {tagged} msat but the amount asked is {amount_msat} msat")


def _check_lnurl_tag(event: Event, lnurl: str | None) -> None:
    tags = _values(event, "lnurl")
    if len(tags) > 1:
        raise ZapError("the zap request must have at most one lnurl tag")
    if lnurl is None or not tags:
        return
    value = tags[0][1] if len(tags[0]) > 1 else ""
    if value.strip().lower() != lnurl.strip().lower():
        raise ZapError("the zap request's lnurl tag is not this Lightning Address's lnurl")


def _relays(event: Event, allow_local: bool) -> tuple[str, ...]:
    tags = _values(event, "relays")
    if not tags:
        raise ZapError("the zap request must have a relays tag naming where to publish the zap receipt")
    entries = [url for t in tags for url in t[1:]][:MAX_RELAY_ENTRIES]
    kept: list[str] = []
    for entry in entries:
        if not entry or len(entry) > MAX_RELAY_URL:
            continue
        try:
            url = relay_url(entry)
        except NostrError:
            continue
        if not allow_local and not is_public_host(urlsplit(url).hostname or ""):
            continue
        if url not in kept:
            kept.append(url)
            if len(kept) == MAX_RELAYS:
                break
    if not kept:
        raise ZapError("the zap request's relays tag names no usable relay (ws:// or wss:// on a public host)")
    return tuple(kept)


def is_public_host(hostname: str) -> bool:
    """False for hosts a server should not be sent to by strangers: IP literals that are
    not globally routable (loopback, private, link-local, ...) and local names. A name
    is only judged by its text here; what it resolves to is checked on connecting."""
    host = hostname.strip("[]").lower().rstrip(".")
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host != "localhost" and not host.endswith(_LOCAL_SUFFIXES) and "." in host
    return is_public_ip(ip)


def is_public_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


# -- the zap receipt (Appendix E) ----------------------------------------------------------
def zap_receipt(keys: Keys, request: ZapRequest, bolt11: str, preimage: str | None, paid_at: int) -> Event:
    """The kind-9735 receipt for a paid zap, signed with the server's `nostrPubkey` keys:
    created_at = paid_at (so the same payment always makes the same receipt content),
    content empty, tags p (recipient), P (sender), e / a / k as the request had them,
    bolt11 (the paid invoice), description (the request's text exactly as received),
    and preimage when given. Raises ZapError for inputs that cannot make a receipt."""
    if not isinstance(bolt11, str) or not 0 < len(bolt11) <= MAX_BOLT11 or not bolt11.isascii() \
            or not bolt11.lower().startswith("ln") or not bolt11.isalnum():
        raise ZapError("bolt11 must be a BOLT11 invoice")
    if preimage is not None and not is_hex(preimage.lower() if isinstance(preimage, str) else preimage, 32):
        raise ZapError("the preimage must be 32 bytes of hex")
    if not isinstance(paid_at, int) or isinstance(paid_at, bool) or not 0 <= paid_at < 2**40:
        raise ZapError("paid_at must be a Unix time in seconds")
    tags: list[list[str]] = [["p", request.recipient], ["P", request.sender]]
    if request.event_id is not None:
        tags.append(["e", request.event_id])
    if request.coordinate is not None:
        tags.append(["a", request.coordinate])
    if request.target_kind is not None:
        tags.append(["k", request.target_kind])
    tags += [["bolt11", bolt11], ["description", request.raw]]
    if preimage is not None:
        tags.append(["preimage", preimage.lower()])
    return sign_event(keys, ZAP_RECEIPT, "", tags, created_at=paid_at)


def description_hash(request: ZapRequest) -> bytes:
    """sha256 of the request's text: the BOLT11 `h` the zap's invoice must commit to."""
    return hashlib.sha256(request.raw.encode("utf-8")).digest()


def receipt_filter(*, recipient: str | None = None, event_id: str | None = None, coordinate: str | None = None,
                   authors: tuple[str, ...] = (), since: int | None = None,
                   limit: int | None = None) -> dict[str, Any]:
    """A NIP-01 filter for zap receipts (kind 9735): by recipient (#p), zapped event
    (#e) or coordinate (#a), signed by `authors` (the nostrPubkeys to trust, Appendix F)."""
    flt: dict[str, Any] = {"kinds": [ZAP_RECEIPT]}
    for key, value in (("#p", recipient), ("#e", event_id), ("#a", coordinate)):
        if value is not None:
            flt[key] = [value]
    if authors:
        flt["authors"] = list(authors)
    if since is not None:
        flt["since"] = since
    if limit is not None:
        flt["limit"] = limit
    return flt
