"""Signed events (NIP-01): the id is sha256 of the compact JSON array
[0, pubkey, created_at, kind, tags, content]; the signature is BIP-340 over the id."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Iterable

from coincurve import PublicKeyXOnly

from .keys import Keys, NostrError, is_hex, parse_pubkey

MAX_CONTENT = 256 * 1024        # characters; NWC payloads are far smaller
MAX_TAGS = 256
MAX_TAG_ITEMS = 16
MAX_TAG_ITEM = 32 * 1024     # a zap receipt's description tag holds the whole zap request (up to 16 KiB)

Tags = tuple[tuple[str, ...], ...]


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def event_id(pubkey: str, created_at: int, kind: int, tags: Tags, content: str) -> str:
    serial = _compact([0, pubkey, created_at, kind, [list(t) for t in tags], content])
    return hashlib.sha256(serial.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    pubkey: str
    created_at: int
    kind: int
    tags: Tags
    content: str
    sig: str

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "pubkey": self.pubkey, "created_at": self.created_at, "kind": self.kind,
                "tags": [list(t) for t in self.tags], "content": self.content, "sig": self.sig}

    def first(self, name: str) -> str | None:
        """The first value of the first tag called `name`."""
        for t in self.tags:
            if len(t) >= 2 and t[0] == name:
                return t[1]
        return None


def sign_event(keys: Keys, kind: int, content: str, tags: Iterable[Iterable[str]] = (),
               created_at: int | None = None) -> Event:
    tags_t: Tags = tuple(tuple(t) for t in tags)
    at = int(time.time()) if created_at is None else created_at
    eid = event_id(keys.pubkey, at, kind, tags_t, content)
    return Event(eid, keys.pubkey, at, kind, tags_t, content, keys.sign(bytes.fromhex(eid)).hex())


def _int(value: object, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise NostrError(f"event {name} must be an integer in [{lo}, {hi}]")
    return value


def parse_event(obj: object) -> Event:
    """An event from untrusted JSON, checked: field types and bounds, the id recomputed,
    the signature verified. Raises NostrError."""
    if not isinstance(obj, dict):
        raise NostrError("an event is a JSON object")
    eid, pubkey, sig, content, tags = (obj.get(k) for k in ("id", "pubkey", "sig", "content", "tags"))
    if not is_hex(eid, 32) or not is_hex(sig, 64):
        raise NostrError("event id and sig must be lowercase hex of 32 and 64 bytes")
    parse_pubkey(pubkey)
    created_at = _int(obj.get("created_at"), "created_at", 0, 2**40)
    kind = _int(obj.get("kind"), "kind", 0, 65535)
    if not isinstance(content, str) or len(content) > MAX_CONTENT:
        raise NostrError(f"event content must be a string of at most {MAX_CONTENT} characters")
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        raise NostrError(f"event tags must be a list of at most {MAX_TAGS} tags")
    out = []
    for t in tags:
        if (not isinstance(t, list) or not t or len(t) > MAX_TAG_ITEMS
                or not all(isinstance(x, str) and len(x) <= MAX_TAG_ITEM for x in t)):
            raise NostrError("each event tag must be a non-empty list of short strings")
        out.append(tuple(t))
    tags_t = tuple(out)
    try:
        computed = event_id(pubkey, created_at, kind, tags_t, content)  # type: ignore[arg-type]
    except UnicodeError:                              # a lone surrogate: not UTF-8, not an event
        raise NostrError("event text is not valid Unicode") from None
    if computed != eid:
        raise NostrError("event id does not match its content")
    if not PublicKeyXOnly(bytes.fromhex(pubkey)).verify(bytes.fromhex(sig), bytes.fromhex(eid)):  # type: ignore[arg-type]
        raise NostrError("event signature does not verify")
    return Event(eid, pubkey, created_at, kind, tags_t, content, sig)  # type: ignore[arg-type]
