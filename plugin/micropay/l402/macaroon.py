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
import hmac
from dataclasses import dataclass

from ..core.errors import MalformedCredential
from ..core.hmacs import FixedKeyHmac, hmac_chain, hmac_sha256

_VERSION_V2 = 2
_EOS, _LOCATION, _IDENTIFIER, _VID, _SIGNATURE = 0, 1, 2, 4, 6
_EOS_BYTE = bytes((_EOS,))
_KEY_GENERATOR = b"macaroons-key-generator"
MAX_MACAROON_BYTES = 8192


derive_key = FixedKeyHmac(_KEY_GENERATOR)


def chain_signature(root_key: bytes, identifier: bytes, caveats: tuple[bytes, ...]) -> bytes:
    return hmac_chain(derive_key(root_key), (identifier, *caveats))


def minted(root_key: bytes, identifier: bytes, location: bytes, caveats: tuple[bytes, ...]) -> str:
    """Macaroon.mint(...).serialize() for short fields (every token we mint: identifier,
    location and each caveat under 128 bytes), without the Macaroon in between."""
    if len(location) >= 0x80 or len(identifier) >= 0x80 or max(map(len, caveats), default=0) >= 0x80:
        return Macaroon.mint(root_key, identifier, location.decode(), caveats).serialize()
    signature = chain_signature(root_key, identifier, caveats)
    return binascii.b2a_base64(_short_fields(location, identifier, caveats, signature), newline=False).decode()


def _short_fields(location: bytes, identifier: bytes, caveats: tuple[bytes, ...], signature: bytes) -> bytes:
    """The V2 binary form when every field is under 128 bytes: one-byte lengths, one join."""
    parts = [bytes((_VERSION_V2, _LOCATION, len(location))) if location else bytes((_VERSION_V2,)),
             location, bytes((_IDENTIFIER, len(identifier))), identifier, _EOS_BYTE]
    for caveat in caveats:
        parts += (bytes((_IDENTIFIER, len(caveat))), caveat, _EOS_BYTE)
    parts += (bytes((_EOS, _SIGNATURE, len(signature))), signature)
    return b"".join(parts)


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
                        hmac_sha256(self.signature, caveat), self.location)

    def verify_signature(self, root_key: bytes) -> bool:
        expected = chain_signature(root_key, self.identifier, self.caveats)
        return hmac.compare_digest(expected, self.signature)

    # -- serialization -------------------------------------------------
    def to_bytes(self) -> bytes:
        location = self.location.encode()
        if len(location) < 0x80 and len(self.identifier) < 0x80 and len(self.signature) < 0x80 \
                and max(map(len, self.caveats), default=0) < 0x80:
            return _short_fields(location, self.identifier, self.caveats, self.signature)
        return self._fields_bytes()

    def _fields_bytes(self) -> bytes:
        """to_bytes for fields of any length (varint lengths)."""
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
        location = b""
        ftype, value, pos = _field(data, 1)
        if ftype == _LOCATION:
            location = value
            ftype, value, pos = _field(data, pos)
        if ftype != _IDENTIFIER:
            raise MalformedCredential("macaroon has no identifier")
        identifier = value
        ftype, _, pos = _field(data, pos)
        if ftype != _EOS:
            raise MalformedCredential("unexpected field in macaroon header")
        caveats: list[bytes] = []
        n = len(data)
        while True:
            # Fast path for the usual first-party caveat: IDENTIFIER, 1-byte length, EOS.
            if pos + 1 < n and data[pos] == _IDENTIFIER and data[pos + 1] < 0x80:
                start = pos + 2
                end = start + data[pos + 1]
                if end < n and data[end] == _EOS:
                    caveats.append(data[start:end])
                    pos = end + 1
                    continue
            ftype, value, pos = _field(data, pos)
            if ftype == _EOS:
                break
            if ftype == _LOCATION:  # caveat location: only meaningful for third-party caveats
                ftype, value, pos = _field(data, pos)
            if ftype != _IDENTIFIER:
                raise MalformedCredential("caveat has no identifier")
            ftype2, _, pos = _field(data, pos)
            if ftype2 == _VID:
                raise MalformedCredential("third-party caveats are not supported")
            if ftype2 != _EOS:
                raise MalformedCredential("unexpected field in caveat")
            caveats.append(value)
        ftype, signature, pos = _field(data, pos)
        if ftype != _SIGNATURE or len(signature) != 32:
            raise MalformedCredential("macaroon signature missing or not 32 bytes")
        if pos != len(data):
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
    if len(s) % 4:
        s += "=" * (-len(s) % 4)
    try:
        return binascii.a2b_base64(s, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedCredential("invalid base64") from exc


def _put_varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _put_field(out: bytearray, ftype: int, value: bytes) -> None:
    if len(value) < 0x80:                 # every field type is < 0x80: one byte each
        out.append(ftype)
        out.append(len(value))
    else:
        _put_varint(out, ftype)
        _put_varint(out, len(value))
    out += value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(data):
            raise MalformedCredential("truncated macaroon")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 28:
            raise MalformedCredential("varint too long in macaroon")


def _field(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """One field at `pos`: (type, value, next position). Single-byte varints, by far
    the common case, are read inline."""
    if pos >= len(data):
        raise MalformedCredential("truncated macaroon")
    ftype = data[pos]
    if ftype < 0x80:
        pos += 1
    else:
        ftype, pos = _varint(data, pos)
    if ftype == _EOS:
        return _EOS, b"", pos
    if ftype not in (_LOCATION, _IDENTIFIER, _VID, _SIGNATURE):
        raise MalformedCredential(f"unknown macaroon field type {ftype}")
    if pos < len(data) and data[pos] < 0x80:
        n = data[pos]
        pos += 1
    else:
        n, pos = _varint(data, pos)
    end = pos + n
    if end > len(data):
        raise MalformedCredential("truncated macaroon field")
    return ftype, data[pos:end], end
