"""HMAC-SHA256 (RFC 2104) for the hot paths: macaroon signature chains, Payment challenge
ids. The same digests as `hmac.digest(key, msg, hashlib.sha256)`, cheaper for the short
messages these are: hmac.digest sets OpenSSL's HMAC up anew on every call (about twice the
cost of the hash itself here)."""
from __future__ import annotations

import hashlib

_sha256 = hashlib.sha256
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA256 under a key used once (a macaroon chain's keys change at every step).
    Keys longer than the 64-byte block are hashed first, as RFC 2104 says."""
    if len(key) > 64:
        key = _sha256(key).digest()
    key = key.ljust(64, b"\0")
    return _sha256(key.translate(_OPAD) + _sha256(key.translate(_IPAD) + msg).digest()).digest()


def hmac_chain(key: bytes, msgs: tuple[bytes, ...]) -> bytes:
    """A macaroon's signature chain: HMAC-SHA256 of each message under the result of
    the step before, starting from `key`. The same as hmac_sha256 in a loop, in one
    call (a minted token's chain is six steps)."""
    for msg in msgs:
        if len(key) > 64:
            key = _sha256(key).digest()
        key = key.ljust(64, b"\0")
        key = _sha256(key.translate(_OPAD) + _sha256(key.translate(_IPAD) + msg).digest()).digest()
    return key


class FixedKeyHmac:
    """HMAC-SHA256 under one key, with the padded-key blocks hashed once."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = _sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner, self._outer = _sha256(key.translate(_IPAD)), _sha256(key.translate(_OPAD))

    def __call__(self, msg: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()
