"""NIP-04 payload encryption, the older scheme NWC still allows when a client asks for it:
AES-256-CBC keyed with the ECDH shared x, PKCS#7 padding, "<base64 ciphertext>?iv=<base64 iv>".
It is unauthenticated; NIP-44 is preferred wherever both sides speak it."""
from __future__ import annotations

import base64
import binascii
import os

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .keys import Keys, NostrError

MAX_PAYLOAD = 128 * 1024


def encrypt(plaintext: str, keys: Keys, pubkey: str, iv: bytes | None = None) -> str:
    iv = os.urandom(16) if iv is None else iv
    padder = padding.PKCS7(128).padder()
    data = padder.update(plaintext.encode("utf-8")) + padder.finalize()
    enc = Cipher(algorithms.AES(keys.shared_x(pubkey)), modes.CBC(iv)).encryptor()
    ct = enc.update(data) + enc.finalize()
    return f"{base64.b64encode(ct).decode()}?iv={base64.b64encode(iv).decode()}"


def decrypt(payload: str, keys: Keys, pubkey: str) -> str:
    if not isinstance(payload, str) or len(payload) > MAX_PAYLOAD or payload.count("?iv=") != 1:
        raise NostrError("not a NIP-04 payload")
    ct_b64, iv_b64 = payload.split("?iv=")
    try:
        ct, iv = base64.b64decode(ct_b64, validate=True), base64.b64decode(iv_b64, validate=True)
    except (binascii.Error, ValueError):
        raise NostrError("NIP-04 payload is not base64") from None
    if len(iv) != 16 or not ct or len(ct) % 16:
        raise NostrError("not a NIP-04 payload")
    dec = Cipher(algorithms.AES(keys.shared_x(pubkey)), modes.CBC(iv)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        data = unpadder.update(dec.update(ct) + dec.finalize()) + unpadder.finalize()
        return data.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise NostrError("NIP-04 payload does not decrypt") from None
