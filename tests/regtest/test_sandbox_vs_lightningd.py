"""The sandbox's invoices are real BOLT11: lightningd's own decoder accepts them."""
from micropay.lightning.sandbox import SandboxNetwork


async def test_sandbox_invoice_passes_lightningd_decode(node_factory):
    node = node_factory.get_node()
    sandbox = SandboxNetwork().add_node("merchant")
    inv = await sandbox.create_invoice(21_000, "label-1", "a coffee", 900)
    decoded = node.rpc.decode(inv.bolt11)
    assert decoded["valid"] is True
    assert decoded["type"] == "bolt11 invoice"
    assert decoded["amount_msat"] == 21_000
    assert decoded["payment_hash"] == inv.payment_hash
    assert decoded["payee"] == sandbox.id
    assert decoded["description"] == "a coffee"
    assert decoded["expiry"] == 900
