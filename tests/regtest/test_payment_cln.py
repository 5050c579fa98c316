"""The "Payment" scheme (MPP, Lightning charge) on a real network: the sidecar on node B
through Core Lightning, node A paying the challenge's invoice with xpay."""
import json

import aiohttp

from micropay.payment import scheme as pa
from micropay.client.payer import Budget, L402Client, NodeWallet, TokenCache
from micropay.lightning.cln import ClnNode

from .test_l402_cln import cln_sidecar, wait_until


async def fetch(url, headers=None):
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
        return r.status, r.headers.copy(), await r.read()


async def test_a_charge_paid_with_xpay_is_served_once(node_factory, tmp_path):
    l1, l2 = node_factory.line_graph(2, wait_for_announce=True)
    sc = await cln_sidecar(tmp_path, l2.rpc.socket_path)
    try:
        status, headers, body = await fetch(sc.url + "/api/joke")
        assert status == 402 and headers["Cache-Control"] == "no-store"
        (charge,) = pa.parse_challenges(headers.getall("WWW-Authenticate"))
        request = pa.decode_request(charge)
        details = request["methodDetails"]
        assert request["amount"] == "21" and request["currency"] == "sat" and details["network"] == "regtest"
        decoded = l1.rpc.decode(details["invoice"])
        assert decoded["payee"] == l2.info["id"] and decoded["amount_msat"] == 21000
        assert decoded["payment_hash"] == details["paymentHash"] == json.loads(body)["payment_hash"]
        assert pa.parse_rfc3339(charge.expires) <= decoded["created_at"] + decoded["expiry"]

        paid = l1.rpc.call("xpay", {"invstring": details["invoice"]})
        credential = pa.format_credential(charge, paid["payment_preimage"])
        status, headers, body = await fetch(sc.url + "/api/joke", {"Authorization": credential})
        assert status == 200 and "joke" in json.loads(body)
        receipt = json.loads(pa.unb64url(headers["Payment-Receipt"]))
        assert receipt == {"method": "lightning", "challengeId": charge.id, "reference": details["paymentHash"],
                           "status": "success", "timestamp": receipt["timestamp"]}
        status, headers, body = await fetch(sc.url + "/api/joke", {"Authorization": credential})
        assert status == 402 and json.loads(body)["error"] == "payment_unknown_challenge"

        async def settled():               # the node's settlement reaches the sidecar as for L402
            rec = await sc.rt.l402.get_challenge(details["paymentHash"])
            return rec is not None and rec.paid_at is not None and rec.received_msat == 21000
        assert await wait_until(settled)
    finally:
        await sc.runner.cleanup()


async def test_the_client_pays_a_charge_from_its_node(node_factory, tmp_path):
    l1, l2 = node_factory.line_graph(2, wait_for_announce=True)
    sc = await cln_sidecar(tmp_path, l2.rpc.socket_path)
    payer = ClnNode(l1.rpc.socket_path)
    await payer.connect()
    try:
        client = L402Client(NodeWallet(payer), Budget(max_per_request_msat=50_000), TokenCache(tmp_path / "c.json"),
                            prefer_payment=True)
        res = await client.get(sc.url + "/api/joke")
        assert res.status == 200 and res.paid_msat == 21000 and res.receipt["reference"] == res.payment_hash
        sent = [p for p in l1.rpc.listsendpays()["payments"] if p["status"] == "complete"]
        assert sum(p["amount_msat"] for p in sent) == 21000 and not client.cache.state.tokens
    finally:
        await sc.runner.cleanup()
        await payer.close()


def test_the_plugin_issues_and_verifies_payment_credentials(node_factory):
    from .util import opts
    l1, l2 = node_factory.line_graph(2, opts=[{}, opts()], wait_for_announce=True)
    inv = l2.rpc.call("micropay-invoice", {"amount_msat": 21000, "description": "an article", "label": "a-1",
                                           "credits": 1})
    (charge,) = pa.parse_challenges([inv["payment_challenge"]])
    paid = l1.rpc.call("xpay", {"invstring": inv["bolt11"]})
    credential = pa.format_credential(charge, paid["payment_preimage"])
    ok = l2.rpc.call("micropay-verify", {"credential": credential})
    assert ok["valid"] and ok["scheme"] == "Payment" and ok["label"] == "a-1"
    assert json.loads(pa.unb64url(ok["receipt"]))["reference"] == inv["payment_hash"]
    again = l2.rpc.call("micropay-verify", [credential])
    assert not again["valid"] and "already used" in again["reason"]
    l402 = l2.rpc.call("micropay-verify", {"credential": f"{inv['token']}:{paid['payment_preimage']}"})
    assert l402["valid"] and l402["credits_left"] == 0
