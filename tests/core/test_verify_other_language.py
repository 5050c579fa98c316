"""A game server in another language can verify receipts and webhooks offline:
contrib/verify-node/verify.mjs (Node.js standard library only) against ours."""
import shutil
import subprocess
from pathlib import Path

import pytest

from micropay.games.signing import sign
from micropay.core.receipts import ReceiptSigner

NODE = shutil.which("node")
SCRIPT = Path(__file__).resolve().parents[2] / "contrib" / "verify-node" / "verify.mjs"
pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js is not on PATH; the Node verifier cannot be run")


def node(*args):
    return subprocess.run([NODE, str(SCRIPT), *args], capture_output=True, text=True, timeout=30)


def test_node_verifies_a_purchase_receipt(tmp_path):
    signer = ReceiptSigner.load_or_create(tmp_path / "k")
    receipt = signer.sign({"v": 1, "type": "purchase", "purchase_id": "pur_1", "sku": "gems",
                           "player_id": "zoë", "amount_msat": 50000, "payment_hash": "ab" * 32,
                           "preimage": "cd" * 32, "paid_at": 1_800_000_000})
    ok = node("receipt", receipt, signer.pubkey_hex)
    assert ok.returncode == 0, ok.stderr
    assert '"player_id":"zoë"' in ok.stdout
    other = ReceiptSigner.load_or_create(tmp_path / "k2")
    assert node("receipt", receipt, other.pubkey_hex).returncode == 1
    payload, sig = receipt.split(".")
    forged = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1] + "." + sig
    assert node("receipt", forged, signer.pubkey_hex).returncode == 1


def test_node_verifies_receipts_signed_in_a_batch(tmp_path):
    signer = ReceiptSigner.load_or_create(tmp_path / "k")
    receipts = signer.sign_many([{"v": 1, "type": "request", "n": i} for i in range(5)])
    for i, receipt in enumerate(receipts):
        assert receipt.count(".") == 2
        ok = node("receipt", receipt, signer.pubkey_hex)
        assert ok.returncode == 0, ok.stderr
        assert f'"n":{i}' in ok.stdout
    payload, sig, proof = receipts[0].split(".")
    other_payload = receipts[1].split(".")[0]
    assert node("receipt", f"{other_payload}.{sig}.{proof}", signer.pubkey_hex).returncode == 1


def test_node_verifies_a_webhook(tmp_path):
    body = b'{"data":{"purchase":{"id":"pur_1"}},"id":7,"type":"purchase.paid"}'
    (tmp_path / "body").write_bytes(body)
    header = sign(body, ["whsec_new", "whsec_old"], 1_800_000_000)
    ok = node("webhook", str(tmp_path / "body"), header, "whsec_old", "1800000100")
    assert ok.returncode == 0 and '"id":7' in ok.stdout, ok.stderr
    late = node("webhook", str(tmp_path / "body"), header, "whsec_old", "1800000400")
    assert late.returncode == 1 and "tolerance" in late.stderr
    assert node("webhook", str(tmp_path / "body"), header, "whsec_wrong", "1800000000").returncode == 1
