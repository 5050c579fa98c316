import json
import stat

import pytest
from coincurve import PrivateKey

from micropay.core.receipts import InvalidReceipt, ReceiptSigner, canonical_json, verify_receipt


def test_sign_and_verify_offline(tmp_path):
    signer = ReceiptSigner.load_or_create(tmp_path / "receipt_key")
    assert stat.S_IMODE((tmp_path / "receipt_key").stat().st_mode) == 0o600
    r = signer.sign({"v": 1, "payment_hash": "ab" * 32, "amount_msat": 1000, "note": "caf\u00e9"})
    payload = verify_receipt(r, signer.pubkey_hex)
    assert payload["amount_msat"] == 1000 and payload["pubkey"] == signer.pubkey_hex
    assert ReceiptSigner.load_or_create(tmp_path / "receipt_key").pubkey_hex == signer.pubkey_hex


def test_tampering_and_wrong_key_are_detected():
    signer = ReceiptSigner(PrivateKey())
    r = signer.sign({"v": 1, "amount_msat": 1000})
    payload_b64, sig = r.split(".")
    import base64
    body = json.loads(base64.urlsafe_b64decode(payload_b64 + "=="))
    body["amount_msat"] = 1
    forged = base64.urlsafe_b64encode(canonical_json(body)).decode().rstrip("=") + "." + sig
    with pytest.raises(InvalidReceipt, match="signature"):
        verify_receipt(forged)
    with pytest.raises(InvalidReceipt, match="another key"):
        verify_receipt(r, ReceiptSigner(PrivateKey()).pubkey_hex)


@pytest.mark.parametrize("bad", ["", "abc", "a.b.c", "!!.??", "e30.AAAA"])
def test_garbage_is_an_invalid_receipt(bad):
    with pytest.raises(InvalidReceipt):
        verify_receipt(bad)


def test_signature_is_standard_ecdsa_over_sha256():
    """A verifier in another language: ECDSA(secp256k1, SHA-256(payload bytes)), r||s."""
    import base64, hashlib
    from coincurve import PublicKey
    from coincurve.ecdsa import cdata_to_der, deserialize_compact
    key = PrivateKey()
    r = ReceiptSigner(key).sign({"v": 1})
    p, s = (base64.urlsafe_b64decode(x + "==") for x in r.split("."))
    assert len(s) == 64
    assert PublicKey(key.public_key.format()).verify(cdata_to_der(deserialize_compact(s)),
                                                     hashlib.sha256(p).digest(), hasher=None)
