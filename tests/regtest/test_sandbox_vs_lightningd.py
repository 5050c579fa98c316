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


async def test_description_hash_invoices_agree_between_sandbox_and_lightningd(node_factory):
    """An invoice committing to sha256(description) (LNURL-pay metadata, NWC's
    description_hash): lightningd decodes the sandbox's, and our decoder reads
    lightningd's (made with deschashonly), with the same hash either way."""
    import hashlib

    from micropay.lightning.cln import ClnNode
    node = node_factory.get_node()
    metadata = '[["text/plain","Tips for the stream"],["text/identifier","alice@example.com"]]'
    digest = hashlib.sha256(metadata.encode()).hexdigest()
    sandbox = SandboxNetwork().add_node("merchant")
    inv = await sandbox.create_invoice(21_000, "tip-1", metadata, 900, hash_description=True)
    decoded = node.rpc.decode(inv.bolt11)
    assert decoded["valid"] is True and decoded["description_hash"] == digest and "description" not in decoded
    cln = ClnNode(node.rpc.socket_path)
    await cln.connect()
    try:
        made = await cln.create_invoice(5_000, "tip-2", metadata, 900, hash_description=True)
        assert made.bolt11 == (await cln.create_invoice(5_000, "tip-2", metadata, 900, hash_description=True)).bolt11
        for dec in (await cln.decode(made.bolt11), await sandbox.decode(made.bolt11)):
            assert dec.description_hash == digest and dec.description == "" and dec.amount_msat == 5_000
    finally:
        await cln.close()
