"""LNURL-pay as Lightning Addresses use it: the wire format, both sides, and no I/O.

LUD-06 (payRequest and its callback), LUD-09 (successAction), LUD-12 (comments),
LUD-16 (`name@host` -> `https://host/.well-known/lnurlp/name`), LUD-21 (verify).
Amounts are millisatoshis, as on the wire. The invoice a callback returns must commit
to sha256 of the exact metadata string (BOLT11 `h`) and carry exactly the amount asked.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

__all__ = ["LnurlError", "PayRequest", "Callback", "address_parts", "address_url", "metadata_text",
           "metadata_hash", "pay_request", "error", "callback_answer", "parse_pay_request", "callback_url",
           "parse_callback_answer", "check_invoice", "MAX_COMMENT", "NAME"]

# LUD-16 allows a-z 0-9 - _ . in the name ("_" alone is a host's default identifier); we
# also take + (as many servers do), refuse the rest and a leading dot (no "." or ".."), so
# a name is always safe in a URL path and a label.
NAME = re.compile(r"(?!\.)[a-z0-9._+-]{1,64}")
_HOST = re.compile(r"(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")
MAX_COMMENT = 2000                 # the largest commentAllowed we serve or follow
MAX_METADATA = 64 * 1024           # a payRequest's metadata string, read or written
MAX_SUCCESS_TEXT = 144             # LUD-09's limit for a message and a URL's description
MAX_INVOICE = 8 * 1024


class LnurlError(ValueError):
    """A Lightning Address or LNURL-pay document that cannot be used; the text says why
    (for a service's own ERROR answer, its reason)."""


# -- addresses (LUD-16) -------------------------------------------------------------------
def address_parts(address: Any) -> tuple[str, str]:
    """(name, host) of `name@host`, where host may carry a port; lower-cased. LnurlError
    when it is not a Lightning Address."""
    if not isinstance(address, str) or len(address) > 320 or address.count("@") != 1:
        raise LnurlError("a Lightning Address looks like name@host")
    name, host = address.strip().lower().split("@")
    if not NAME.fullmatch(name):
        raise LnurlError("the name of a Lightning Address is 1-64 of a-z 0-9 . _ + - (not starting with a dot)")
    hostname, port = _split_port(host)
    if not (_HOST.fullmatch(hostname) or _is_ip(hostname)):
        raise LnurlError(f"{host!r} is not a host name")
    return name, host


def _split_port(host: str) -> tuple[str, int | None]:
    if host.startswith("["):                      # [v6]:port
        end = host.find("]")
        if end < 0:
            raise LnurlError(f"{host!r} is not a host name")
        rest = host[end + 1:]
        hostname = host[1:end]
        if not _is_ip(hostname):
            raise LnurlError(f"{host!r} is not a host name")
    else:
        hostname, sep, rest = host.partition(":")
        rest = sep + rest
    if not rest:
        return hostname, None
    if not re.fullmatch(r":[0-9]{1,5}", rest) or not 0 < int(rest[1:]) < 65536:
        raise LnurlError(f"{host!r} has a bad port")
    return hostname, int(rest[1:])


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def plain_http_ok(host: str) -> bool:
    """Hosts reached over http:// rather than https://: .onion (LUD-16) and loopback (a
    node's own tests and local setups; nothing leaves the machine)."""
    hostname, _ = _split_port(host)
    if hostname.endswith(".onion") or hostname == "localhost":
        return True
    return _is_ip(hostname) and ipaddress.ip_address(hostname).is_loopback


def address_url(address: str) -> str:
    """Where a Lightning Address's payRequest is served."""
    name, host = address_parts(address)
    scheme = "http" if plain_http_ok(host) else "https"
    return f"{scheme}://{host}/.well-known/lnurlp/{name}"


# -- the server's side --------------------------------------------------------------------
def metadata_text(text: str, identifier: str, *, long_text: str | None = None,
                  image: tuple[str, str] | None = None) -> str:
    """The metadata string: a JSON array of [mime, content] pairs. `identifier`: the
    address (LUD-16's text/identifier); `image`: (png or jpeg, base64)."""
    entries: list[list[str]] = [["text/plain", text], ["text/identifier", identifier]]
    if long_text:
        entries.append(["text/long-desc", long_text])
    if image is not None:
        entries.append([f"image/{image[0]};base64", image[1]])
    return json.dumps(entries, separators=(",", ":"), ensure_ascii=False)


def metadata_hash(metadata: str) -> str:
    return hashlib.sha256(metadata.encode("utf-8")).hexdigest()


def pay_request(callback: str, min_sendable_msat: int, max_sendable_msat: int, metadata: str, *,
                comment_allowed: int = 0, nostr_pubkey: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"tag": "payRequest", "callback": callback, "minSendable": min_sendable_msat,
                           "maxSendable": max_sendable_msat, "metadata": metadata}
    if comment_allowed:
        doc["commentAllowed"] = comment_allowed
    if nostr_pubkey is not None:
        doc["allowsNostr"] = True
        doc["nostrPubkey"] = nostr_pubkey
    return doc


def error(reason: str) -> dict[str, str]:
    return {"status": "ERROR", "reason": reason}


def callback_answer(bolt11: str, *, success_action: dict[str, str] | None = None,
                    verify: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"pr": bolt11, "routes": []}
    if success_action is not None:
        doc["successAction"] = success_action
    if verify is not None:
        doc["verify"] = verify
    return doc


def success_message(message: str) -> dict[str, str]:
    if not 0 < len(message) <= MAX_SUCCESS_TEXT:
        raise LnurlError(f"a success message is 1-{MAX_SUCCESS_TEXT} characters")
    return {"tag": "message", "message": message}


def success_url(description: str, url: str) -> dict[str, str]:
    if not 0 < len(description) <= MAX_SUCCESS_TEXT:
        raise LnurlError(f"a success URL's description is 1-{MAX_SUCCESS_TEXT} characters")
    return {"tag": "url", "description": description, "url": url}


# -- the payer's side ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PayRequest:
    callback: str
    min_sendable_msat: int
    max_sendable_msat: int
    metadata: str
    comment_allowed: int = 0
    nostr_pubkey: str | None = None

    @property
    def identifier(self) -> str | None:
        for entry in json.loads(self.metadata):
            if (isinstance(entry, list) and len(entry) == 2 and entry[0] in ("text/identifier", "text/email")
                    and isinstance(entry[1], str)):
                return entry[1]
        return None


def _reason(doc: Any) -> None:
    if isinstance(doc, dict) and str(doc.get("status", "")).upper() == "ERROR":
        reason = doc.get("reason")
        raise LnurlError(f"the service refused: {str(reason)[:200] if reason else 'no reason given'}")


def _msat(doc: dict[str, Any], key: str) -> int:
    v = doc.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= 21_000_000 * 10**11:
        raise LnurlError(f"{key} must be a positive whole number of millisatoshis")
    return v


def parse_pay_request(doc: Any) -> PayRequest:
    """Check a payRequest (LUD-06), as a payer must before using it."""
    _reason(doc)
    if not isinstance(doc, dict) or doc.get("tag") != "payRequest":
        raise LnurlError("the answer is not an LNURL payRequest (tag must be \"payRequest\")")
    callback = doc.get("callback")
    if not isinstance(callback, str) or not _callback_ok(callback):
        raise LnurlError("the payRequest's callback must be an https:// URL (http:// only for .onion or loopback)")
    lo, hi = _msat(doc, "minSendable"), _msat(doc, "maxSendable")
    if lo > hi:
        raise LnurlError("the payRequest's minSendable is above its maxSendable")
    metadata = doc.get("metadata")
    if not isinstance(metadata, str) or len(metadata) > MAX_METADATA:
        raise LnurlError("the payRequest's metadata must be a string (a JSON array)")
    try:
        entries = json.loads(metadata)
    except ValueError:
        raise LnurlError("the payRequest's metadata is not JSON") from None
    # LUD-06: a list of [mime, content] entries, one of them text/plain; entries this payer
    # does not use may hold other JSON, and are not looked at
    if not isinstance(entries, list) or not any(
            isinstance(e, list) and len(e) == 2 and e[0] == "text/plain" and isinstance(e[1], str) for e in entries):
        raise LnurlError("the payRequest's metadata must be a list of [mime, content] entries with a text/plain one")
    comment = doc.get("commentAllowed", 0)
    if isinstance(comment, bool) or not isinstance(comment, int) or comment < 0:
        comment = 0
    pubkey = doc.get("nostrPubkey") if doc.get("allowsNostr") is True else None
    if pubkey is not None and not (isinstance(pubkey, str) and re.fullmatch(r"[0-9a-f]{64}", pubkey)):
        pubkey = None
    return PayRequest(callback, lo, hi, metadata, min(comment, MAX_COMMENT), pubkey)


def _callback_ok(url: str) -> bool:
    if len(url) > 2048:
        return False
    try:
        u = urllib.parse.urlsplit(url)
        host = u.netloc.rpartition("@")[2].lower()
        if not host:
            return False
        return u.scheme == "https" or (u.scheme == "http" and plain_http_ok(host))
    except (ValueError, LnurlError):
        return False


def callback_url(req: PayRequest, amount_msat: int, *, comment: str | None = None,
                 nostr: str | None = None) -> str:
    """The callback URL asking for `amount_msat` (with the comment if the service takes
    one, and a zap request)."""
    if not req.min_sendable_msat <= amount_msat <= req.max_sendable_msat:
        raise LnurlError(f"{amount_msat} msat is outside what the address accepts "
                         f"({req.min_sendable_msat}-{req.max_sendable_msat} msat)")
    params = [("amount", str(amount_msat))]
    if comment and req.comment_allowed:
        params.append(("comment", comment[:req.comment_allowed]))
    if nostr is not None:
        params.append(("nostr", nostr))
    sep = "&" if urllib.parse.urlsplit(req.callback).query else "?"
    return req.callback + sep + urllib.parse.urlencode(params)


@dataclass(frozen=True, slots=True)
class Callback:
    bolt11: str
    success_action: dict[str, Any] | None = None
    verify: str | None = None


def parse_callback_answer(doc: Any) -> Callback:
    _reason(doc)
    if not isinstance(doc, dict) or not isinstance(doc.get("pr"), str) or not doc["pr"]:
        raise LnurlError("the callback did not answer with an invoice (pr)")
    if len(doc["pr"]) > MAX_INVOICE:
        raise LnurlError("the callback's invoice is too long")
    action = doc.get("successAction")
    verify = doc.get("verify")
    return Callback(doc["pr"], action if isinstance(action, dict) else None,
                    verify if isinstance(verify, str) and _callback_ok(verify) else None)


def check_invoice(req: PayRequest, amount_msat: int, invoice_amount_msat: int | None,
                  invoice_description_hash: str | None) -> None:
    """What a payer checks of the callback's invoice (LUD-06): exactly the amount asked,
    and a description hash that is sha256 of the payRequest's metadata."""
    if invoice_amount_msat != amount_msat:
        raise LnurlError(f"the invoice is for {invoice_amount_msat} msat, not the {amount_msat} msat asked")
    if (invoice_description_hash or "").lower() != metadata_hash(req.metadata):
        raise LnurlError("the invoice's description hash is not sha256 of the payRequest's metadata")
