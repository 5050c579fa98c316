"""The rune from docs/operators.md, used remotely through commando."""
import pytest
from pyln.client import RpcError

from .util import opts

STREAM_RUNE = [["method=streampay-start", "method=streampay-status", "method=streampay-stop"],
               ["method/streampay-start", "pnameamount_msat<1001"],
               ["method/streampay-start", "pnamemax_total_msat<100001"]]


def test_stream_rune_limits_remote_callers(node_factory):
    l1, l2, l3 = node_factory.line_graph(3, opts=opts(), wait_for_announce=True)
    rune = l2.rpc.createrune(restrictions=STREAM_RUNE)["rune"]

    def remote(method, params):
        return l1.rpc.call("commando", {"peer_id": l2.info["id"], "rune": rune, "method": method,
                                        "params": params})

    ok = remote("streampay-start", {"destination": l3.info["id"], "amount_msat": 1000, "interval_s": 60,
                                    "max_total_msat": 5000})
    assert remote("streampay-status", {"id": ok["id"]})["id"] == ok["id"]
    for params in ({"destination": l3.info["id"], "amount_msat": 5000, "interval_s": 60, "max_total_msat": 9000},
                   {"destination": l3.info["id"], "amount_msat": 1000, "interval_s": 60, "max_total_msat": 500000},
                   {"destination": l3.info["id"], "amount_msat": 1000, "interval_s": 60}):   # no cap given
        with pytest.raises(RpcError, match="[Nn]ot authorized|[Ff]ailed"):
            remote("streampay-start", params)
    with pytest.raises(RpcError):
        remote("micropay-fetch", {"url": "http://127.0.0.1:1/"})
    remote("streampay-stop", {"id": ok["id"]})
    assert len(l2.rpc.call("streampay-list", {})["streams"]) == 1
