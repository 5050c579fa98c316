"""The micropay plugin loaded into real lightningd nodes."""
import hashlib
import os

import pytest
from pyln.client import RpcError

from .util import opts

METHODS = {"micropay-invoice", "micropay-verify", "micropay-list", "micropay-fetch", "streampay-start",
           "streampay-list", "streampay-status", "streampay-pause", "streampay-resume", "streampay-stop",
           "streampay-received"}


def test_plugin_loads_lists_methods_and_options_and_rejects_bad_params(node_factory):
    node = node_factory.get_node(options=opts())
    commands = {c["command"].split()[0] for c in node.rpc.help()["help"]}
    assert METHODS <= commands
    configs = node.rpc.listconfigs()["configs"]
    assert configs["micropay-invoice-expiry"]["value_int"] == 3600
    assert configs["micropay-service"]["value_str"] == "micropay"
    for method, params in [
        ("micropay-invoice", {"amount_msat": -5, "description": "x"}),
        ("micropay-invoice", {"amount_msat": 1000, "description": ""}),
        ("micropay-invoice", {"amount_msat": 1000, "description": "x", "credits": "lots"}),
        ("micropay-list", {"status": "weird"}),
        ("micropay-invoice", {"description": "missing amount"}),
        ("micropay-verify", {"credential": "L402 !!:00"}),
        ("streampay-start", {"destination": "nothex", "amount_msat": 1000, "interval_s": 10}),
        ("streampay-start", {"destination": node.info["id"], "amount_msat": 1000, "interval_s": 0}),
        ("micropay-fetch", {"url": "ftp://x"}),
    ]:
        with pytest.raises(RpcError) as info:
            node.rpc.call(method, params)
        assert info.value.error["code"] == -32602, (method, info.value.error)
        assert "Traceback" not in info.value.error["message"]
    with pytest.raises(RpcError) as info:                 # well-formed, but no such stream: not found
        node.rpc.call("streampay-status", {"id": "nope"})
    assert info.value.error["code"] == 1404 and "no stream with that id" in info.value.error["message"]
    # positional parameters, CLN style
    inv = node.rpc.call("micropay-invoice", [2000, "positional", "pos-label"])
    assert inv["label"] == "pos-label" and inv["amount_msat"] == 2000


def test_invoice_paid_by_another_node_then_verifies(node_factory):
    l1, l2 = node_factory.line_graph(2, opts=[{}, opts(listener=True)], wait_for_announce=True)
    inv = l2.rpc.call("micropay-invoice", {"amount_msat": 50_000, "description": "article 7",
                                           "label": "article-7", "credits": 3,
                                           "metadata": {"sku": "a7"}})
    assert inv["bolt11"].startswith("lnbcrt")
    assert l2.rpc.call("micropay-invoice", {"amount_msat": 50_000, "description": "article 7",
                                            "label": "article-7", "credits": 3,
                                            "metadata": {"sku": "a7"}}) == inv
    with pytest.raises(RpcError):    # same label, different parameters
        l2.rpc.call("micropay-invoice", {"amount_msat": 1, "description": "article 7", "label": "article-7"})
    guess = os.urandom(32).hex()
    before = l2.rpc.call("micropay-verify", {"credential": f"{inv['token']}:{guess}"})
    assert before["valid"] is False and "preimage" in before["reason"]
    assert l2.rpc.call("micropay-list", {"status": "unpaid"})["invoices"][0]["label"] == "article-7"
    paid = l1.rpc.xpay(inv["bolt11"])
    assert hashlib.sha256(bytes.fromhex(paid["payment_preimage"])).hexdigest() == inv["payment_hash"]
    after = l2.rpc.call("micropay-verify", {"credential": f"L402 {inv['token']}:{paid['payment_preimage']}"})
    assert after["valid"] is True and after["credits_left"] == 3
    assert "credits=3" in after["caveats"]
    listed = l2.rpc.call("micropay-list", {"status": "paid"})["invoices"]
    assert [i["label"] for i in listed] == ["article-7"] and listed[0]["metadata"] == {"sku": "a7"}
    line = l2.daemon.wait_for_log("listener got micropay_invoice_paid")
    assert inv["payment_hash"] in line and '"amount_msat": 50000' in line and '"sku": "a7"' in line
    # the listing pages through the node's invoices: ours among others, a page at a time
    for i in range(3):
        l2.rpc.invoice(1000, f"not-ours-{i}", "someone else's")
        l2.rpc.call("micropay-invoice", {"amount_msat": 1000 + i, "description": f"page {i}", "label": f"page-{i}"})
    first = l2.rpc.call("micropay-list", {"limit": 2})
    assert [i["label"] for i in first["invoices"]] == ["article-7", "page-0"] and first["next_start"]
    rest = l2.rpc.call("micropay-list", {"start": first["next_start"], "limit": 10})
    assert [i["label"] for i in rest["invoices"]] == ["page-1", "page-2"] and rest["next_start"] is None


def test_dynamic_options_take_effect_without_restart(node_factory):
    node = node_factory.get_node(options=opts())
    node.rpc.setconfig("micropay-invoice-expiry", 600)
    inv = node.rpc.call("micropay-invoice", {"amount_msat": 1000, "description": "short-lived"})
    assert inv["expires_at"] - inv["created_at"] in (599, 600, 601)
    node.rpc.setconfig("micropay-stream-max-total-msat", 5000)
    with pytest.raises(RpcError, match="max_total_msat must be at most 5000"):
        node.rpc.call("streampay-start", {"destination": "02" + "ab" * 32, "amount_msat": 1000, "interval_s": 60,
                                          "max_total_msat": 6000})


def test_refuses_to_start_with_a_readable_key_file(node_factory, tmp_path):
    data = tmp_path / "mp"
    data.mkdir()
    (data / "root_keys.json").write_text("{}")
    (data / "root_keys.json").chmod(0o644)
    node = node_factory.get_node(options=opts(**{"micropay-data-dir": str(data)}))
    assert node.daemon.is_in_log("disabled itself at init: micropay could not start: .*chmod 600")
    assert "micropay-invoice" not in {c["command"].split()[0] for c in node.rpc.help()["help"]}
