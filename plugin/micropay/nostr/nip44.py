"""NIP-44 version 2 payload encryption.

conversation key = HKDF-extract(salt "nip44-v2", shared x); per message, a random 32-byte
nonce and HKDF-expand(conversation key, nonce, 76) give the ChaCha20 key (32), its nonce
(12) and an HMAC-SHA256 key (32). The plaintext (1..65535 bytes of UTF-8) is prefixed
with its length (u16, big endian) and zero-padded to a size class; the payload is
base64(0x02 || nonce || ciphertext || HMAC(nonce || ciphertext)).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from .keys import Keys, NostrError

VERSION = 2
SALT = b"nip44-v2"
MIN_PLAINTEXT, MAX_PLAINTEXT = 1, 65535
MIN_PAYLOAD, MAX_PAYLOAD = 132, 87472          # base64 characters
MIN_DECODED, MAX_DECODED = 99, 65603           # bytes


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def conversation_key(keys: Keys, pubkey: str) -> bytes:
    """The same 32 bytes from either side: ours with their pubkey, theirs with ours."""
    return _hmac(SALT, keys.shared_x(pubkey))


def _message_keys(conv: bytes, nonce: bytes) -> tuple[bytes, bytes, bytes]:
    okm, block, i = b"", b"", 1
    while len(okm) < 76:                       # HKDF-expand (RFC 5869) with info = nonce
        block = _hmac(conv, block + nonce + bytes([i]))
        okm += block
        i += 1
    return okm[:32], okm[32:44], okm[44:76]


def padded_len(n: int) -> int:
    if n <= 32:
        return 32
    next_power = 1 << (n - 1).bit_length()
    chunk = 32 if next_power <= 256 else next_power // 8
    return chunk * ((n - 1) // chunk + 1)


def _chacha(key: bytes, nonce: bytes, data: bytes) -> bytes:
    # cryptography takes a 16-byte nonce: the 32-bit block counter (little endian, 0) first
    return Cipher(algorithms.ChaCha20(key, b"\x00\x00\x00\x00" + nonce), mode=None).encryptor().update(data)


def encrypt(plaintext: str, conv: bytes, nonce: bytes | None = None) -> str:
    raw = plaintext.encode("utf-8")
    if not MIN_PLAINTEXT <= len(raw) <= MAX_PLAINTEXT:
        raise NostrError(f"NIP-44 encrypts {MIN_PLAINTEXT} to {MAX_PLAINTEXT} bytes")
    nonce = os.urandom(32) if nonce is None else nonce
    key, cnonce, mkey = _message_keys(conv, nonce)
    padded = len(raw).to_bytes(2, "big") + raw + bytes(padded_len(len(raw)) - len(raw))
    ct = _chacha(key, cnonce, padded)
    return base64.b64encode(bytes([VERSION]) + nonce + ct + _hmac(mkey, nonce + ct)).decode()


def decrypt(payload: str, conv: bytes) -> str:
    """Raises NostrError for anything but an authentic version-2 payload."""
    if not isinstance(payload, str) or not payload or payload[0] == "#":
        raise NostrError("not a NIP-44 version 2 payload")
    if not MIN_PAYLOAD <= len(payload) <= MAX_PAYLOAD:
        raise NostrError("NIP-44 payload length out of bounds")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise NostrError("NIP-44 payload is not base64") from None
    if not MIN_DECODED <= len(data) <= MAX_DECODED or data[0] != VERSION:
        raise NostrError("not a NIP-44 version 2 payload")
    nonce, ct, mac = data[1:33], data[33:-32], data[-32:]
    key, cnonce, mkey = _message_keys(conv, nonce)
    if not hmac.compare_digest(_hmac(mkey, nonce + ct), mac):
        raise NostrError("NIP-44 payload fails authentication")
    padded = _chacha(key, cnonce, ct)
    n = int.from_bytes(padded[:2], "big")
    if n < MIN_PLAINTEXT or len(padded) != 2 + padded_len(n):
        raise NostrError("NIP-44 payload has invalid padding")
    try:
        return padded[2:2 + n].decode("utf-8")
    except UnicodeDecodeError:
        raise NostrError("NIP-44 plaintext is not UTF-8") from None
