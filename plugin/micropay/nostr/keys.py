"""Nostr keys: a 32-byte secret and its x-only public key (BIP-340), and the ECDH shared
point's x coordinate both encryptions start from (unhashed, unlike coincurve's `ecdh`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from coincurve import PrivateKey, PublicKey

HEX = frozenset("0123456789abcdef")


class NostrError(ValueError):
    """Malformed or unverifiable Nostr data: an event, a key, an encrypted payload."""


def is_hex(text: object, n_bytes: int) -> bool:
    return isinstance(text, str) and len(text) == 2 * n_bytes and not (set(text) - HEX)


def parse_pubkey(text: object) -> bytes:
    """A 64-character lowercase hex x-only key that is a point of the curve."""
    if not is_hex(text, 32):
        raise NostrError("a public key is 64 lowercase hex characters")
    raw = bytes.fromhex(text)  # type: ignore[arg-type]
    try:
        PublicKey(b"\x02" + raw)
    except ValueError:
        raise NostrError("the public key is not a point of secp256k1") from None
    return raw


@dataclass(frozen=True)
class Keys:
    """A secret key and its public key. repr never shows the secret."""

    secret: bytes = field(repr=False)
    pubkey: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != 32:
            raise NostrError("a secret key is 32 bytes")
        try:
            pub = PrivateKey(self.secret).public_key_xonly.format().hex()
        except ValueError:
            raise NostrError("the secret key is out of range for secp256k1") from None
        object.__setattr__(self, "pubkey", pub)

    @classmethod
    def generate(cls) -> "Keys":
        while True:
            try:
                return cls(os.urandom(32))
            except NostrError:          # out of range: about 2**-128 of draws
                continue

    @classmethod
    def from_hex(cls, text: str) -> "Keys":
        if not is_hex(text, 32):
            raise NostrError("a secret key is 64 lowercase hex characters")
        return cls(bytes.fromhex(text))

    def shared_x(self, pubkey: str) -> bytes:
        """The x coordinate of secret * P, where P is `pubkey` with an even y."""
        point = PublicKey(b"\x02" + parse_pubkey(pubkey)).multiply(self.secret)
        return point.format(compressed=True)[1:]

    def sign(self, digest: bytes) -> bytes:
        """A BIP-340 signature of a 32-byte digest, with fresh auxiliary randomness."""
        return PrivateKey(self.secret).sign_schnorr(digest, os.urandom(32))
