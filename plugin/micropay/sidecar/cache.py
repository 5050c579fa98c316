"""Caches of admitted credentials, bounded in bytes as well as in entries.

A cache keyed by what a client sends (its Authorization header, its raw path) must not
let a client decide how much memory each entry takes: one pass token with 60 KB query
strings would otherwise cost 60 KB per entry. Small keys are kept as they are (a dict
lookup of a tuple, the hot path); a key longer than INLINE_KEY_CHARS is kept as its
SHA-256, 32 bytes whatever the client sent. Every entry is counted in bytes (its key
as stored plus a fixed allowance for the value), and the oldest entries go once the
total passes the budget.
"""
from __future__ import annotations

import hashlib
from typing import Generic, TypeVar

V = TypeVar("V")
Key = "tuple[str, str, str] | bytes"

# An L402 or Payment header is a few hundred characters; a request line's path rarely
# passes a few hundred either. Longer keys are hashed.
INLINE_KEY_CHARS = 2048
# What an entry costs besides its key: the dict slot, the tuple, the value object (a
# Paid record with its headers dict, a Bearer) — measured at about 300-400 bytes.
ENTRY_OVERHEAD = 512


def request_key(auth: str, method: str, raw_path: str) -> "tuple[str, str, str] | bytes":
    """The key of a request's credential, method and raw path in a request cache."""
    if len(auth) + len(raw_path) <= INLINE_KEY_CHARS:
        return (auth, method, raw_path)
    return digest_key(auth, method, raw_path)


def digest_key(auth: str, method: str, raw_path: str) -> bytes:
    # Raw header bytes that are not UTF-8 arrive as surrogates: encoded back as they came.
    return hashlib.sha256("\n".join((method, raw_path, auth)).encode("utf-8", "surrogateescape")).digest()


def key_bytes(key: object) -> int:
    if isinstance(key, tuple):
        return sum(map(len, key)) + ENTRY_OVERHEAD
    return len(key) + ENTRY_OVERHEAD          # type: ignore[arg-type]


class BoundedCache(dict, Generic[V]):
    """A dict (lookups are plain dict lookups) whose `put` keeps its entries within
    `max_entries` and `max_bytes` (each entry counted by key_bytes), dropping the oldest
    first."""

    def __init__(self, max_bytes: int, max_entries: int = 100_000) -> None:
        super().__init__()
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.nbytes = 0

    def put(self, key: object, value: V) -> None:
        size = key_bytes(key)
        if key in self:
            super().__setitem__(key, value)
            return
        while self and (self.nbytes + size > self.max_bytes or len(self) >= self.max_entries):
            oldest = next(iter(self))
            super().__delitem__(oldest)
            self.nbytes -= key_bytes(oldest)
        super().__setitem__(key, value)
        self.nbytes += size

    def pop(self, key, default=None):  # type: ignore[override]
        if key not in self:
            return default
        self.nbytes -= key_bytes(key)
        return super().pop(key)

    def clear(self) -> None:
        super().clear()
        self.nbytes = 0
