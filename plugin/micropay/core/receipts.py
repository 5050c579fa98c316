"""Signed receipts that anyone holding the server's public key can verify offline.

Format (the `Payment-Receipt` header value):
    base64url(canonical JSON payload) "." base64url(signature), no padding
Canonical JSON: keys sorted, separators "," and ":", ASCII only (non-ASCII escaped),
integers only. Signature: secp256k1 ECDSA over SHA-256(canonical bytes), 64-byte compact
r||s with low S. The payload names the signer's compressed public key ("pubkey", hex);
a verifier pins the key it trusts (from /.well-known/l402.json or its own config).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from coincurve import PrivateKey, PublicKey
from coincurve.ecdsa import cdata_to_der, deserialize_compact

from .errors import ConfigError, InvalidReceipt
from .secretfile import read_secret, write_secret

RECEIPT_HEADER = "Payment-Receipt"
MAX_RECEIPT_LEN = 8192


def canonical_json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_B64U = re.compile(r"[A-Za-z0-9_-]+")


def _unb64u(text: str) -> bytes:
    """Strict base64url: the alphabet only, no padding, and the one spelling that
    re-encodes to itself (so a receipt has exactly one valid form)."""
    if not _B64U.fullmatch(text):
        raise InvalidReceipt("receipt is not base64url without padding")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidReceipt("receipt is not base64url") from None
    if _b64u(data) != text:
        raise InvalidReceipt("receipt is not in canonical base64url")
    return data


class ReceiptSigner:
    def __init__(self, key: PrivateKey) -> None:
        self._key = key
        self.pubkey_hex = key.public_key.format(compressed=True).hex()

    @classmethod
    def load_or_create(cls, path: Path) -> "ReceiptSigner":
        if path.exists():
            try:
                return cls(PrivateKey(bytes.fromhex(read_secret(path).decode().strip())))
            except ConfigError:
                raise
            except ValueError:
                raise ConfigError(f"{path}: receipt key file is corrupt") from None
        key = PrivateKey()
        write_secret(path, key.secret.hex().encode() + b"\n")
        return cls(key)

    def sign(self, payload: dict[str, Any]) -> str:
        body = dict(payload, pubkey=self.pubkey_hex)
        data = canonical_json(body)
        sig = self._key.sign_recoverable(data, hasher=lambda m: hashlib.sha256(m).digest())[:64]
        return f"{_b64u(data)}.{_b64u(sig)}"


def verify_receipt(receipt: str, pubkey_hex: str | None = None) -> dict[str, Any]:
    """Return the payload if the signature holds under `pubkey_hex` (or, if None, under
    the key the receipt names — which proves integrity but not who signed)."""
    if not isinstance(receipt, str) or len(receipt) > MAX_RECEIPT_LEN or receipt.count(".") != 1:
        raise InvalidReceipt("receipt must be <payload>.<signature>")
    payload_b64, sig_b64 = receipt.split(".")
    data, sig = _unb64u(payload_b64), _unb64u(sig_b64)
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        raise InvalidReceipt("receipt payload is not JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("pubkey"), str):
        raise InvalidReceipt("receipt payload names no pubkey")
    try:
        canonical = canonical_json(payload)
    except ValueError:   # NaN or Infinity
        canonical = b""
    if canonical != data:
        raise InvalidReceipt("receipt payload is not in canonical form")
    key_hex = pubkey_hex or payload["pubkey"]
    if pubkey_hex is not None and payload["pubkey"] != pubkey_hex:
        raise InvalidReceipt("receipt was signed by another key")
    if len(sig) != 64:
        raise InvalidReceipt("receipt signature must be 64 bytes")
    try:
        pub = PublicKey(bytes.fromhex(key_hex))
        ok = pub.verify(cdata_to_der(deserialize_compact(sig)), data,
                        hasher=lambda m: hashlib.sha256(m).digest())
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise InvalidReceipt("receipt signature does not verify")
    return payload
