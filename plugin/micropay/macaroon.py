"""Macaroons in the libmacaroons V2 binary serialization, first-party caveats only.

Wire layout (as libmacaroons and gopkg.in/macaroon.v2 write it):

    0x02
    [LOCATION field] IDENTIFIER field EOS            -- header
    ( [LOCATION] IDENTIFIER [VID] EOS )*             -- one group per caveat
    EOS                                              -- end of caveats
    SIGNATURE field (32 bytes)

A field is varint(type) varint(len) bytes; EOS is the single varint 0.
Signature chain: sig = HMAC(HMAC("macaroons-key-generator", root_key), identifier),
then sig = HMAC(sig, caveat) for every first-party caveat.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

from .errors import MalformedCredential

_VERSION_V2 = 2
_EOS, _LOCATION, _IDENTIFIER, _VID, _SIGNATURE = 0, 1, 2, 4, 6
_KEY_GENERATOR = b"macaroons-key-generator"
MAX_MACAROON_BYTES = 8192


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, hashlib.sha256)


def derive_key(root_key: bytes) -> bytes:
    return _hmac(_KEY_GENERATOR, root_key)


def chain_signature(root_key: bytes, identifier: bytes, caveats: tuple[bytes, ...]) -> bytes:
    sig = _hmac(derive_key(root_key), identifier)
    for caveat in caveats:
        sig = _hmac(sig, caveat)
    return sig


@dataclass(frozen=True, slots=True)
class Macaroon:
    identifier: bytes
    caveats: tuple[bytes, ...]
    signature: bytes
    location: str = ""

    @classmethod
    def mint(cls, root_key: bytes, identifier: bytes, location: str = "",
             caveats: tuple[bytes, ...] = ()) -> "Macaroon":
        return cls(identifier, tuple(caveats), chain_signature(root_key, identifier, caveats), location)

    def add_first_party_caveat(self, caveat: bytes) -> "Macaroon":
        """Attenuate: anyone holding a macaroon can add caveats, never remove them."""
        return Macaroon(self.identifier, self.caveats + (caveat,),
                        _hmac(self.signature, caveat), self.location)

    def verify_signature(self, root_key: bytes) -> bool:
        expected = chain_signature(root_key, self.identifier, self.caveats)
        return hmac.compare_digest(expected, self.signature)

    # -- serialization -------------------------------------------------
    def to_bytes(self) -> bytes:
        out = bytearray([_VERSION_V2])
        if self.location:
            _put_field(out, _LOCATION, self.location.encode())
        _put_field(out, _IDENTIFIER, self.identifier)
        out.append(_EOS)
        for caveat in self.caveats:
            _put_field(out, _IDENTIFIER, caveat)
            out.append(_EOS)
        out.append(_EOS)
        _put_field(out, _SIGNATURE, self.signature)
        return bytes(out)

    def serialize(self) -> str:
        """Standard base64 with padding, as Aperture and most L402 clients send it."""
        return base64.b64encode(self.to_bytes()).decode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Macaroon":
        if len(data) > MAX_MACAROON_BYTES:
            raise MalformedCredential("macaroon too large")
        if not data or data[0] != _VERSION_V2:
            raise MalformedCredential("not a V2 binary macaroon")
        reader = _Reader(data, 1)
        location = b""
        ftype, value = reader.field()
        if ftype == _LOCATION:
            location = value
            ftype, value = reader.field()
        if ftype != _IDENTIFIER:
            raise MalformedCredential("macaroon has no identifier")
        identifier = value
        if reader.field()[0] != _EOS:
            raise MalformedCredential("unexpected field in macaroon header")
        caveats: list[bytes] = []
        while True:
            ftype, value = reader.field()
            if ftype == _EOS:
                break
            if ftype == _LOCATION:  # caveat location: only meaningful for third-party caveats
                ftype, value = reader.field()
            if ftype != _IDENTIFIER:
                raise MalformedCredential("caveat has no identifier")
            ftype2, _ = reader.field()
            if ftype2 == _VID:
                raise MalformedCredential("third-party caveats are not supported")
            if ftype2 != _EOS:
                raise MalformedCredential("unexpected field in caveat")
            caveats.append(value)
        ftype, signature = reader.field()
        if ftype != _SIGNATURE or len(signature) != 32:
            raise MalformedCredential("macaroon signature missing or not 32 bytes")
        if reader.pos != len(data):
            raise MalformedCredential("trailing bytes after macaroon")
        try:
            loc = location.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedCredential("macaroon location is not UTF-8") from exc
        return cls(identifier, tuple(caveats), signature, loc)

    @classmethod
    def deserialize(cls, text: str) -> "Macaroon":
        return cls.from_bytes(b64decode_any(text))


def b64decode_any(text: str) -> bytes:
    """Decode standard or URL-safe base64, padded or not."""
    if len(text) > MAX_MACAROON_BYTES * 2:
        raise MalformedCredential("base64 value too large")
    s = text.strip()
    if "-" in s or "_" in s:
        s = s.replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedCredential("invalid base64") from exc


def _put_varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _put_field(out: bytearray, ftype: int, value: bytes) -> None:
    _put_varint(out, ftype)
    _put_varint(out, len(value))
    out += value


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def varint(self) -> int:
        shift = result = 0
        while True:
            if self.pos >= len(self.data):
                raise MalformedCredential("truncated macaroon")
            b = self.data[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 28:
                raise MalformedCredential("varint too long in macaroon")

    def field(self) -> tuple[int, bytes]:
        ftype = self.varint()
        if ftype == _EOS:
            return _EOS, b""
        if ftype not in (_LOCATION, _IDENTIFIER, _VID, _SIGNATURE):
            raise MalformedCredential(f"unknown macaroon field type {ftype}")
        n = self.varint()
        end = self.pos + n
        if end > len(self.data):
            raise MalformedCredential("truncated macaroon field")
        value = self.data[self.pos:end]
        self.pos = end
        return ftype, value
