"""Signed receipts that anyone holding the server's public key can verify offline.

Format (the `Payment-Receipt` header value):
    base64url(canonical JSON payload) "." base64url(signature), no padding
Canonical JSON: keys sorted, separators "," and ":", ASCII only (non-ASCII escaped),
integers only. Signature: secp256k1 ECDSA over SHA-256(canonical bytes), 64-byte compact
r||s with low S. The payload names the signer's compressed public key ("pubkey", hex);
a verifier pins the key it trusts (from /.well-known/l402.json or its own config).

Receipts signed together (ReceiptBatcher: those a busy gate asks for in the same turn of
its event loop) share one signature over a Merkle root and carry their path to it:
    base64url(payload) "." base64url(signature) "." base64url(proof)
leaf = SHA-256(0x00 || payload bytes); parent = SHA-256(0x01 || left || right); a node
without a sibling moves up unchanged. The proof lists, from the leaf up, one byte (0: the
sibling is on the right, 1: on the left) and the sibling's 32 bytes. The signature is
over SHA-256(BATCH_TAG || root). One ECDSA signature (~45 us here) then serves a whole
batch; a batch of one is an ordinary two-part receipt.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import re
from json.encoder import encode_basestring_ascii as _json_str
from pathlib import Path
from typing import Any

from coincurve import PrivateKey, PublicKey
from coincurve.ecdsa import cdata_to_der, deserialize_compact

from .errors import ConfigError, InvalidReceipt
from .secretfile import read_secret, write_secret

RECEIPT_HEADER = "Payment-Receipt"
MAX_RECEIPT_LEN = 8192
BATCH_TAG = b"micropay-receipt-batch/v1\x00"   # what a batch signature covers, before the root
MAX_BATCH = 256                                   # receipts under one signature: a proof of 8 steps
MAX_PROOF_STEPS = 16


# One encoder for every receipt: json.dumps with options builds a new one per call.
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def canonical_json(payload: dict[str, Any]) -> bytes:
    return _canonical(payload).encode("ascii")


def request_receipt_json(*, pubkey: str, service: str, payment_hash: str, token_id: str, method: str,
                         path: str, credits_remaining: int, ts: int) -> bytes:
    """canonical_json of a pay-per-request receipt, written out in its (sorted) key order:
    the same bytes for less than the generic encoder's cost on the first-seen path
    (bench/bench_parts.py prints both).
    `payment_hash`, `token_id` and `pubkey` are hex; the numbers are ints."""
    return ('{"credits_remaining":%d,"method":%s,"path":%s,"payment_hash":"%s","pubkey":"%s","service":%s,'
            '"token_id":"%s","ts":%d,"type":"request","v":1}'
            % (_int(credits_remaining), _json_str(method), _json_str(path), _hex(payment_hash), _hex(pubkey),
               _json_str(service), _hex(token_id), _int(ts))).encode("ascii")


def pass_receipt_json(*, pubkey: str, service: str, payment_hash: str, token_id: str, scope: str,
                      valid_until: int | None, issued_at: int) -> bytes:
    """canonical_json of a pass token's receipt (see request_receipt_json)."""
    return ('{"issued_at":%d,"payment_hash":"%s","pubkey":"%s","scope":%s,"service":%s,"token_id":"%s",'
            '"type":"pass","v":1,"valid_until":%s}'
            % (_int(issued_at), _hex(payment_hash), _hex(pubkey), _json_str(scope), _json_str(service),
               _hex(token_id), "null" if valid_until is None else "%d" % _int(valid_until))).encode("ascii")


def _hex(text: str) -> str:
    """`text` as it is, which JSON writes unescaped: ASCII letters and digits only."""
    if not (text.isascii() and text.isalnum()):
        raise ValueError("a receipt's hashes, ids and key are hex")
    return text


def _int(n: int) -> int:
    if type(n) is not int:       # noqa: E721 - a bool is an int, and JSON spells it otherwise
        raise TypeError("a receipt's numbers are ints")
    return n


def _b64u(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode("ascii")


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

    def encode(self, payload: dict[str, Any] | bytes) -> bytes:
        """A receipt's signed bytes: canonical_json of the payload with this signer's
        pubkey added; bytes are taken as that already (request_receipt_json, ...)."""
        return payload if isinstance(payload, bytes) else canonical_json(dict(payload, pubkey=self.pubkey_hex))

    def sign(self, payload: dict[str, Any] | bytes) -> str:
        data = self.encode(payload)
        sig = self._key.sign_recoverable(data, hasher=_sha256)[:64]
        return f"{_b64u(data)}.{_b64u(sig)}"

    def sign_many(self, payloads: list[dict[str, Any] | bytes]) -> list[str]:
        """Receipts for all of `payloads` under one signature (see the module's doc)."""
        if len(payloads) == 1:
            return [self.sign(payloads[0])]
        if not payloads or len(payloads) > MAX_BATCH:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH} receipts")
        datas = [self.encode(p) for p in payloads]
        root, proofs = merkle([_sha256(b"\x00" + d) for d in datas])
        sig = _b64u(self._key.sign_recoverable(BATCH_TAG + root, hasher=_sha256)[:64])
        return [f"{_b64u(d)}.{sig}.{_b64u(bytes(proof))}" for d, proof in zip(datas, proofs)]


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def merkle(leaves: list[bytes]) -> tuple[bytes, list[bytearray]]:
    """The root over `leaves` and each leaf's proof (direction byte + sibling per level)."""
    nodes = list(leaves)
    members = [[i] for i in range(len(leaves))]
    proofs = [bytearray() for _ in leaves]
    while len(nodes) > 1:
        up, up_members = [], []
        for j in range(0, len(nodes), 2):
            if j + 1 == len(nodes):             # no sibling: moves up unchanged
                up.append(nodes[j])
                up_members.append(members[j])
                continue
            left, right = nodes[j], nodes[j + 1]
            for i in members[j]:
                proofs[i] += b"\x00" + right
            for i in members[j + 1]:
                proofs[i] += b"\x01" + left
            up.append(_sha256(b"\x01" + left + right))
            up_members.append(members[j] + members[j + 1])
        nodes, members = up, up_members
    return nodes[0], proofs


def _root(leaf: bytes, proof: bytes) -> bytes:
    if not proof or len(proof) % 33 or len(proof) // 33 > MAX_PROOF_STEPS:
        raise InvalidReceipt("receipt proof must be 1 to 16 steps of 33 bytes")
    node = leaf
    for k in range(0, len(proof), 33):
        side, sibling = proof[k], proof[k + 1:k + 33]
        if side == 0:
            node = _sha256(b"\x01" + node + sibling)
        elif side == 1:
            node = _sha256(b"\x01" + sibling + node)
        else:
            raise InvalidReceipt("receipt proof has a bad direction byte")
    return node


class ReceiptBatcher:
    """Signs the receipts asked for in the same turn of the event loop together: a gate
    under load answers many first-seen credentials per turn, and they then share one
    ECDSA signature. A lone request waits one loop turn, not more."""

    def __init__(self, signer: ReceiptSigner) -> None:
        self.signer = signer
        self._pending: list[tuple[dict[str, Any] | bytes, asyncio.Future[str]]] = []

    def sign(self, payload: dict[str, Any] | bytes) -> "asyncio.Future[str]":
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()
        self._pending.append((payload, done))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        elif len(self._pending) >= MAX_BATCH:
            self._flush()
        return done

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            receipts = self.signer.sign_many([payload for payload, _ in batch])
        except Exception as exc:               # noqa: BLE001 - each waiter hears it
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for (_, done), receipt in zip(batch, receipts):
            if not done.done():
                done.set_result(receipt)


def verify_receipt(receipt: str, pubkey_hex: str | None = None) -> dict[str, Any]:
    """Return the payload if the signature holds under `pubkey_hex` (or, if None, under
    the key the receipt names — which proves integrity but not who signed)."""
    if not isinstance(receipt, str) or len(receipt) > MAX_RECEIPT_LEN or receipt.count(".") not in (1, 2):
        raise InvalidReceipt("receipt must be <payload>.<signature> or <payload>.<signature>.<proof>")
    payload_b64, sig_b64, *proof_b64 = receipt.split(".")
    data, sig = _unb64u(payload_b64), _unb64u(sig_b64)
    signed = data if not proof_b64 else BATCH_TAG + _root(_sha256(b"\x00" + data), _unb64u(proof_b64[0]))
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
        ok = pub.verify(cdata_to_der(deserialize_compact(sig)), signed, hasher=_sha256)
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise InvalidReceipt("receipt signature does not verify")
    return payload
