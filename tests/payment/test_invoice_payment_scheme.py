"""micropay-invoice offers a Payment (MPP charge) challenge on its invoice, and
micropay-verify accepts the Payment credential once (the plugin's side, on the sandbox)."""
import pytest

from micropay.payment import scheme as pa
from micropay.core.errors import PaymentCredentialMalformed
from micropay.plugin.invoices import InvoiceIssuer
from micropay.lightning.memrecords import MemoryRecords
from micropay.lightning.sandbox import SandboxNetwork
from micropay.store import CORE_SCHEMA
from micropay.store.sqlite import SqliteStore
from micropay.l402.tokens import RootKeyRing, TokenService


@pytest.fixture
async def issuer(tmp_path):
    net = SandboxNetwork()
    node, payer = net.add_node("merchant"), net.add_node("payer", 10**9)
    store = SqliteStore(str(tmp_path / "s.sqlite3"), (CORE_SCHEMA,))
    await store.open()
    tokens = TokenService(RootKeyRing.load_or_create(tmp_path / "keys.json"), "shop")
    yield InvoiceIssuer(node, MemoryRecords(), tokens, store), payer
    await store.close()


async def test_an_invoice_in_whole_sats_carries_a_payment_challenge_that_verifies_once(issuer):
    issuer, payer = issuer
    inv = await issuer.issue(21_000, "an article", label="a-1", credits=1)
    (charge,) = pa.parse_challenges([inv["payment_challenge"]])
    request = pa.decode_request(charge)
    assert request["methodDetails"]["invoice"] == inv["bolt11"] and request["amount"] == "21"
    assert charge.realm == "shop" and pa.parse_rfc3339(charge.expires) == inv["expires_at"]
    paid = await payer.pay(inv["bolt11"])
    ok = await issuer.verify(pa.format_credential(charge, paid.preimage))
    assert ok["valid"] and ok["label"] == "a-1" and ok["payment_hash"] == inv["payment_hash"]
    assert pa.unb64url(ok["receipt"])
    again = await issuer.verify(pa.format_credential(charge, paid.preimage))
    assert not again["valid"] and "already used" in again["reason"]
    # one payment, one envelope: the L402 token of the same invoice is spent too
    l402 = await issuer.verify(f"{inv['token']}:{paid.preimage}")
    assert l402["credits_left"] == 0


async def test_a_wrong_preimage_or_a_forged_challenge_is_not_valid(issuer):
    issuer, payer = issuer
    inv = await issuer.issue(5_000, "x", label="a-2")
    (charge,) = pa.parse_challenges([inv["payment_challenge"]])
    bad = await issuer.verify(pa.format_credential(charge, "00" * 32))
    assert not bad["valid"] and "preimage" in bad["reason"]
    forged = pa.Challenge("AAAA", charge.realm, charge.method, charge.intent, charge.request, charge.expires,
                          charge.opaque)
    paid = await payer.pay(inv["bolt11"])
    out = await issuer.verify(pa.format_credential(forged, paid.preimage))
    assert not out["valid"] and "no such challenge" in out["reason"]
    with pytest.raises(PaymentCredentialMalformed):
        await issuer.verify("Payment %%%")


async def test_amounts_a_charge_cannot_express_and_bundles_get_no_payment_challenge(issuer):
    issuer, _ = issuer
    assert (await issuer.issue(1_500, "odd", label="a-3"))["payment_challenge"] is None
    assert (await issuer.issue(5_000, "bundle", label="a-4", credits=5))["payment_challenge"] is None
