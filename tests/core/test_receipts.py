import json
import stat

import pytest
from coincurve import PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from micropay.core.receipts import InvalidReceipt, ReceiptSigner, canonical_json, verify_receipt

_KEY = PrivateKey()


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


@pytest.mark.parametrize("bad", ["", "abc", "a.b.c", "a.b.c.d", "!!.??", "e30.AAAA"])
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


@pytest.mark.parametrize("n", [2, 3, 7, 8, 33, 256])
def test_receipts_signed_in_a_batch_each_verify_and_share_one_signature(n):
    signer = ReceiptSigner(PrivateKey())
    receipts = signer.sign_many([{"v": 1, "type": "request", "n": i} for i in range(n)])
    assert len({r.split(".")[1] for r in receipts}) == 1, "one signature for the batch"
    for i, r in enumerate(receipts):
        assert verify_receipt(r, signer.pubkey_hex)["n"] == i


def test_a_batch_of_one_is_an_ordinary_receipt_and_batches_are_bounded():
    signer = ReceiptSigner(PrivateKey())
    (one,) = signer.sign_many([{"v": 1}])
    assert one.count(".") == 1 and verify_receipt(one, signer.pubkey_hex)["v"] == 1
    with pytest.raises(ValueError):
        signer.sign_many([{"v": 1}] * 257)


def test_a_batch_receipt_cannot_be_moved_onto_another_payload_or_proof():
    import base64
    signer = ReceiptSigner(PrivateKey())
    receipts = signer.sign_many([{"v": 1, "amount_msat": a} for a in (1000, 2000, 3000)])
    payload0, sig, proof0 = receipts[0].split(".")
    payload1, _, proof1 = receipts[1].split(".")
    with pytest.raises(InvalidReceipt, match="signature"):
        verify_receipt(f"{payload1}.{sig}.{proof0}")            # another receipt's payload on this path
    raw = bytearray(base64.urlsafe_b64decode(proof0 + "=" * (-len(proof0) % 4)))
    raw[0] = 2                                                    # not a direction
    bad = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    with pytest.raises(InvalidReceipt, match="direction"):
        verify_receipt(f"{payload0}.{sig}.{bad}")
    raw[0] ^= 3                                                   # the other side: another root
    flipped = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    with pytest.raises(InvalidReceipt, match="signature"):
        verify_receipt(f"{payload0}.{sig}.{flipped}")
    with pytest.raises(InvalidReceipt, match="proof"):
        verify_receipt(f"{payload0}.{sig}.AAAA")                 # 3 bytes: no whole step
    # a two-part receipt made from a batch's payload and signature does not verify
    with pytest.raises(InvalidReceipt, match="signature"):
        verify_receipt(f"{payload0}.{sig}")


async def test_the_batcher_signs_a_turns_receipts_together_and_a_lone_one_alone():
    import asyncio
    from micropay.core.receipts import ReceiptBatcher
    signer = ReceiptSigner(PrivateKey())
    batcher = ReceiptBatcher(signer)
    together = await asyncio.gather(*(batcher.sign({"v": 1, "n": i}) for i in range(10)))
    assert len({r.split(".")[1] for r in together}) == 1
    assert [verify_receipt(r, signer.pubkey_hex)["n"] for r in together] == list(range(10))
    alone = await batcher.sign({"v": 1, "n": 99})
    assert alone.count(".") == 1 and verify_receipt(alone, signer.pubkey_hex)["n"] == 99


_texts = st.text(max_size=40)
_hexes = st.binary(min_size=0, max_size=33).map(bytes.hex)
_ints = st.integers(min_value=-(2 ** 70), max_value=2 ** 70)


@settings(max_examples=300, deadline=None)
@given(service=_texts, method=_texts, path=_texts, payment_hash=_hexes, token_id=_hexes, remaining=_ints,
       ts=_ints)
def test_the_request_receipt_template_is_the_canonical_json(service, method, path, payment_hash, token_id,
                                                            remaining, ts):
    """The hand-written request receipt must be byte for byte what the generic canonical
    encoder makes of the same payload (a verifier re-encodes it to check)."""
    from micropay.core.receipts import request_receipt_json
    signer = ReceiptSigner(_KEY)
    payload = {"v": 1, "type": "request", "service": service, "payment_hash": payment_hash or "0",
               "token_id": token_id or "0", "method": method, "path": path, "credits_remaining": remaining,
               "ts": ts}
    data = request_receipt_json(pubkey=signer.pubkey_hex, service=service, payment_hash=payment_hash or "0",
                                token_id=token_id or "0", method=method, path=path, credits_remaining=remaining,
                                ts=ts)
    assert data == canonical_json(dict(payload, pubkey=signer.pubkey_hex)) == signer.encode(payload)
    assert verify_receipt(signer.sign(data), signer.pubkey_hex) == dict(payload, pubkey=signer.pubkey_hex)


@settings(max_examples=300, deadline=None)
@given(service=_texts, scope=_texts, payment_hash=_hexes, token_id=_hexes, valid_until=st.none() | _ints,
       issued_at=_ints)
def test_the_pass_receipt_template_is_the_canonical_json(service, scope, payment_hash, token_id, valid_until,
                                                         issued_at):
    from micropay.core.receipts import pass_receipt_json
    signer = ReceiptSigner(_KEY)
    payload = {"v": 1, "type": "pass", "service": service, "payment_hash": payment_hash or "0",
               "token_id": token_id or "0", "scope": scope, "valid_until": valid_until, "issued_at": issued_at}
    data = pass_receipt_json(pubkey=signer.pubkey_hex, service=service, payment_hash=payment_hash or "0",
                             token_id=token_id or "0", scope=scope, valid_until=valid_until, issued_at=issued_at)
    assert data == canonical_json(dict(payload, pubkey=signer.pubkey_hex))
    assert verify_receipt(signer.sign_many([data, data])[1], signer.pubkey_hex)["scope"] == scope


@pytest.mark.parametrize("bad", [{"credits_remaining": True}, {"ts": 1.5}, {"token_id": "ab\"cd"},
                                 {"payment_hash": "\u00e9"}, {"payment_hash": ""}])
def test_the_receipt_templates_refuse_what_they_would_spell_differently(bad):
    """A bool, a float, or an id that is not ASCII letters and digits would come out
    unlike canonical_json: the template refuses it rather than sign other bytes."""
    from micropay.core.receipts import request_receipt_json
    kw = dict(pubkey="02" + "ab" * 32, service="s", payment_hash="ab" * 32, token_id="cd" * 32, method="GET",
              path="/p", credits_remaining=1, ts=1)
    with pytest.raises((TypeError, ValueError)):
        request_receipt_json(**dict(kw, **bad))
