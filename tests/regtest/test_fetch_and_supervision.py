"""The plugin runs the sidecar for its node, and another node consumes the paid API
through micropay-fetch."""
import os
import re
import signal

import pytest
from pyln.client import RpcError
from pyln.testing.utils import wait_for

from ..helpers_proc import free_port
from .util import opts

SIDECAR_CONFIG = """
service = "nodeapi"
demo = true
[[routes]]
method = "GET"
path = "/api/joke"
price_msat = 21000
[[routes]]
method = "GET"
path = "/api/fortune/*"
price_msat = 9000
credits = 2
stream_msat = 4000
"""


def sidecar_pids(node) -> list[int]:
    """Every sidecar the plugin has started, oldest first (from the whole log)."""
    node.daemon.logs_catchup()
    return [int(p) for p in re.findall(r"sidecar started \(pid (\d+)\)", "\n".join(node.daemon.logs))]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:          # a zombie is not alive
        return f.read().split(")")[-1].split()[0] != "Z"


def pair_with_sidecar(node_factory, tmp_path):
    """l1 -> l2, both with micropay; l2's plugin runs the sidecar. Returns l1, l2, port."""
    port = free_port()
    cfg = tmp_path / "sidecar.toml"
    cfg.write_text(SIDECAR_CONFIG)
    l1, l2 = node_factory.line_graph(2, opts=[opts(), opts(**{"micropay-listen": f"127.0.0.1:{port}",
                                                              "micropay-sidecar-config": str(cfg)})],
                                     wait_for_announce=True)
    return l1, l2, port


def test_supervised_sidecar_and_micropay_fetch(node_factory, tmp_path):
    l1, l2, port = pair_with_sidecar(node_factory, tmp_path)
    wait_for(lambda: len(sidecar_pids(l2)) == 1)
    pid = sidecar_pids(l2)[0]
    url = f"http://127.0.0.1:{port}"

    def fetch(path, **kw):
        return l1.rpc.call("micropay-fetch", {"url": url + path, **kw})

    wait_for(lambda: _up(url))
    res = fetch("/api/joke")
    assert res["status"] == 200 and res["amount_msat"] == 21000 and "joke" in res["body"]
    assert res["receipt"]["type"] == "request" and any("invoice for 21000 msat" in m for m in res["log"])
    assert fetch("/api/fortune/1")["amount_msat"] == 9000
    assert fetch("/api/fortune/2")["amount_msat"] == 0            # the second credit, no payment
    with pytest.raises(RpcError, match="per-request budget"):      # over this call's budget
        fetch("/api/joke", max_msat=1000)
    # the sidecar dies: the plugin restarts it
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(sidecar_pids(l2)) == 2)
    new_pid = sidecar_pids(l2)[1]
    assert new_pid != pid and not alive(pid)
    assert l2.daemon.is_in_log("sidecar exited with -9; restarting")
    wait_for(lambda: _up(url))
    assert fetch("/api/joke")["status"] == 200
    # and stops it with the node
    l2.stop()
    wait_for(lambda: not alive(new_pid), timeout=30)


def _up(url: str) -> bool:
    import urllib.request
    try:
        urllib.request.urlopen(url + "/healthz", timeout=1).read()
        return True
    except OSError:
        return False


def test_streamed_payments_top_up_metered_access(node_factory, tmp_path):
    import urllib.error
    import urllib.request
    l1, l2, port = pair_with_sidecar(node_factory, tmp_path)
    url = f"http://127.0.0.1:{port}/api/fortune/7"
    wait_for(lambda: _up(f"http://127.0.0.1:{port}"))
    s = l1.rpc.call("streampay-start", {"destination": l2.info["id"], "amount_msat": 5000, "interval_s": 1,
                                        "max_total_msat": 16_000, "max_fee_msat": 100})

    def get():
        req = urllib.request.Request(url, headers={"X-Micropay-Stream": s["id"]})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    wait_for(lambda: l1.rpc.call("streampay-status", {"id": s["id"]})["state"] == "completed", timeout=60)
    paid = l1.rpc.call("streampay-status", {"id": s["id"]})["paid_msat"]
    wait_for(lambda: [x["received_msat"] for x in l2.rpc.call("streampay-received",
                                                               {"stream_id": s["id"]})["sessions"]] == [paid])
    statuses = [get() for _ in range(5)]
    assert statuses.count(200) == paid // 4000 and statuses[-1] == 402
