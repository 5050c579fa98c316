"""An operator's path, through lightning-cli where the docs show lightning-cli: bad option
values never take the node down, help and check describe every method, errors carry
documented codes and no tracebacks, and reckless installs the plugin from a clone."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pyln.client import RpcError
from pyln.testing.utils import wait_for

from .util import opts

REPO = Path(__file__).resolve().parents[2]

# option -> values setconfig must refuse: not a number, negative, zero where invalid, too large
BAD_VALUES = {
    "micropay-invoice-expiry": ["abc", "-5", "0", "31536001"],
    "micropay-stream-min-interval": ["abc", "-1", "0", "86401"],
    "micropay-stream-max-total-msat": ["abc", "-1", "2100000000000000001"],
    "micropay-fetch-max-msat": ["abc", "-100", "0"],
    "micropay-fetch-day-budget-msat": ["1e3", "-1", "0"],
    "micropay-payout-player-day-msat": ["abc", "-1"],
    "micropay-payout-day-msat": ["x1", "-1"],
    "micropay-payout-max-fee-msat": ["abc", "-5"],
}


def cli(node, *args: str, keywords: bool = False) -> tuple[int, dict | str]:
    """The real lightning-cli against the node, as an operator types it."""
    cmd = ["lightning-cli", f"--lightning-dir={node.daemon.lightning_dir}", "--network=regtest"]
    cmd += ["-k"] if keywords else []
    res = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60)
    try:
        return res.returncode, json.loads(res.stdout)
    except ValueError:
        return res.returncode, res.stdout + res.stderr


def test_bad_setconfig_values_are_refused_and_the_node_stays_up(node_factory):
    node = node_factory.get_node(options=opts(), may_reconnect=True)
    before = node.rpc.listconfigs()["configs"]
    for option, values in BAD_VALUES.items():
        for value in values:
            # `lightning-cli setconfig <option> <value>`; -k for values lightning-cli would take for flags
            args = (["setconfig", f"config={option}", f"val={value}"] if value.startswith("-")
                    else ["setconfig", option, value])
            code, out = cli(node, *args, keywords=value.startswith("-"))
            assert code != 0 and isinstance(out, dict) and out["code"] == -32602, (option, value, out)
            assert option in out["message"] and "Traceback" not in out["message"], out
            code, out = cli(node, "check", "command_to_check=setconfig", f"config={option}", f"val={value}",
                            keywords=True)                               # check says the same
            assert code != 0 and out["code"] == -32602, (option, value, out)
            assert node.rpc.getinfo()["id"]                               # still up
    after = node.rpc.listconfigs()["configs"]
    for option in BAD_VALUES:
        assert after[option] == before[option], option                   # old values kept
    assert cli(node, "setconfig", "micropay-invoice-expiry", "600")[0] == 0
    inv = node.rpc.call("micropay-invoice", {"amount_msat": 1000, "description": "x"})
    assert inv["expires_at"] - inv["created_at"] in (599, 600, 601)
    node.restart()                                                        # and it starts again
    assert node.rpc.listconfigs()["configs"]["micropay-invoice-expiry"]["value_int"] == 600
    assert "micropay-invoice" in str(node.rpc.help())


def test_a_bad_value_at_start_disables_the_plugin_saying_why(node_factory, tmp_path):
    node = node_factory.get_node(options=opts(**{"micropay-invoice-expiry": -5}))
    wait_for(lambda: node.daemon.is_in_log(r"UNUSUAL.*micropay cannot start: micropay-invoice-expiry: "
                                           r"must be between 1 and"))
    assert "micropay-invoice" not in str(node.rpc.help())
    bad = tmp_path / "sidecar.toml"
    bad.write_text('[[routes]]\npath = "/x"\nprice_msat = 0\n')
    other = node_factory.get_node(options=opts(**{"micropay-listen": "127.0.0.1:1",
                                                  "micropay-sidecar-config": str(bad)}))
    wait_for(lambda: other.daemon.is_in_log(rf"UNUSUAL.*micropay cannot start: {bad}:3: routes\[0\].price_msat"))  # file:line


def test_help_check_codes_and_literal_command_lines(node_factory):
    l1, l2 = node_factory.line_graph(2, opts=opts(), wait_for_announce=True)
    helps = {h["command"].split()[0]: h for h in l1.rpc.help()["help"]}
    ours = [m for m in helps if m.startswith(("micropay-", "streampay-"))]
    assert len(ours) == 15
    for m in ours:                      # every method described: its usage line, then the description
        usage, _, description = helps[m]["command"].partition("\n")
        assert description.strip(), m
    assert helps["streampay-start"]["command"].startswith(
        "streampay-start destination amount_msat interval_s max_total_msat [max_fee_msat]")
    code, out = cli(l1, "check", "streampay-start", l2.info["id"], "1000")   # missing required parameters
    assert code != 0 and out["code"] == -32602 and "interval_s" in out["message"]
    assert cli(l1, "check", "micropay-invoice", "1000", "coffee")[0] == 0
    code, out = cli(l1, "micropay-nwc-create", "agent", "1000")      # NWC is off without micropay-nwc-relay
    assert code != 0 and out["code"] == -32602 and "micropay-nwc-relay" in out["message"]
    # the documented command line, literally: the token's base64 padding has '=' in it
    inv = l2.rpc.call("micropay-invoice", {"amount_msat": 3000, "description": "doc"})
    paid = l1.rpc.xpay(inv["bolt11"])
    credential = f"{inv['token']}:{paid['payment_preimage']}"
    assert "=" in inv["token"]
    code, out = cli(l2, "micropay-verify", credential)
    assert code == 0 and out["valid"] is True, out
    # errors: documented codes, no tracebacks, nothing at UNUSUAL for expected failures
    code, out = cli(l1, "micropay-fetch", "http://127.0.0.1:9/x")
    assert code != 0 and out["code"] == 1502 and "traceback" not in json.dumps(out).lower()
    for params, expect in [({"destination": l2.info["id"], "amount_msat": 1000, "interval_s": 1}, "max_total_msat"),
                           ({"destination": l1.info["id"], "amount_msat": 1000, "interval_s": 1,
                             "max_total_msat": 9000}, "this node itself"),
                           ({"destination": l2.info["id"], "amount_msat": 1000, "interval_s": 1,
                             "max_total_msat": 9000, "splits": [{"destination": l2.info["id"]},
                                                                {"destination": l2.info["id"]}]}, "same destination")]:
        with pytest.raises(RpcError, match=expect) as err:
            l1.rpc.call("streampay-start", params)
        assert err.value.error["code"] == -32602
    for method, params in [("streampay-list", {"state": "bogus"}), ("streampay-status", {"id": {"a": 1}})]:
        with pytest.raises(RpcError) as err:
            l1.rpc.call(method, params)
        assert err.value.error["code"] == -32602 and "{" not in err.value.error["message"]
    assert not l1.daemon.is_in_log(r"UNUSUAL.*Traceback") and not l1.daemon.is_in_log(r"UNUSUAL.*File \"")


def test_streams_scoped_by_label_with_a_rune(node_factory):
    l1, l2 = node_factory.line_graph(2, opts=opts(), wait_for_announce=True)
    rune = l1.rpc.createrune(restrictions=[
        ["method=streampay-start", "method=streampay-status", "method=streampay-stop", "method=streampay-list"],
        ["pnamelabel^alice-", "pnamelabel_prefix=alice-"]])["rune"]
    mine = l1.rpc.call("streampay-start", {"destination": l2.info["id"], "amount_msat": 1000, "interval_s": 60,
                                           "max_total_msat": 10_000, "label": "alice-1"})
    l1.rpc.call("streampay-start", {"destination": l2.info["id"], "amount_msat": 1000, "interval_s": 60,
                                    "max_total_msat": 10_000, "label": "bob-1"})

    def remote(method, params):
        return l2.rpc.commando(peer_id=l1.info["id"], rune=rune, method=method, params=params)
    assert remote("streampay-status", {"label": "alice-1"})["id"] == mine["id"]
    assert [s["label"] for s in remote("streampay-list", {"label_prefix": "alice-"})["streams"]] == ["alice-1"]
    for method, params in [("streampay-stop", {"label": "bob-1"}), ("streampay-stop", {"id": mine["id"]}),
                           ("streampay-list", {})]:
        with pytest.raises(RpcError, match="Not permitted"):
            remote(method, params)
    assert remote("streampay-stop", {"label": "alice-1"})["state"] == "stopped"


def test_plugin_files_are_private_and_the_front_page_is_not_the_sandbox(node_factory, tmp_path):
    import socket
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "sidecar.toml"
    cfg.write_text('service = "shop"\ndemo = true\n[[routes]]\nmethod = "GET"\npath = "/api/joke"\nprice_msat = 5000\n')
    node = node_factory.get_node(options=opts(**{"micropay-listen": f"127.0.0.1:{port}",
                                                 "micropay-sidecar-config": str(cfg)}))
    node.rpc.call("micropay-invoice", {"amount_msat": 1000, "description": "a write, so the WAL exists"})
    data = Path(node.daemon.lightning_dir) / "regtest" / "micropay"
    wait_for(lambda: (data / "sidecar.pid").exists())

    def page():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read().decode()
        except OSError:
            return ""
    wait_for(lambda: "micropay" in page())
    text = page()
    assert "SANDBOX" not in text and "--wallet sandbox" not in text and "regtest" in text and "/api/joke" in text
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("micropay.sqlite3", "micropay.sqlite3-wal", "micropay.sqlite3-shm", "root_keys.json",
                 "sidecar.log", "sidecar.pid"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name


def _reckless(node, reckless_dir: Path, *args: str) -> subprocess.CompletedProcess:
    conf = Path(node.daemon.lightning_dir) / "regtest" / "config"
    conf.touch()
    return subprocess.run(["reckless", "-d", str(reckless_dir), "-l", str(node.daemon.lightning_dir),
                           "--network", "regtest", *args], capture_output=True, text=True, timeout=900,
                          input="Y\n")


@pytest.mark.skipif(shutil.which("reckless") is None, reason="reckless (from Core Lightning) is not on PATH")
def test_reckless_installs_the_plugin_from_a_clone(node_factory, tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout: nothing to clone")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    # from the plugin's directory in a clone
    node = node_factory.get_node()
    res = _reckless(node, tmp_path / "rk1", "install", str(clone / "plugin" / "micropay"))
    assert res.returncode == 0, res.stdout + res.stderr
    wait_for(lambda: "micropay-invoice" in str(node.rpc.help()))
    assert node.rpc.call("micropay-invoice", {"amount_msat": 1000, "description": "via reckless"})["bolt11"]
    # from the repository as a source (what `reckless source add <repo URL>` does, with a local one)
    other = node_factory.get_node()
    assert _reckless(other, tmp_path / "rk2", "source", "add", str(clone)).returncode == 0
    res = _reckless(other, tmp_path / "rk2", "install", "micropay")
    assert res.returncode == 0, res.stdout + res.stderr
    wait_for(lambda: "streampay-start" in str(other.rpc.help()))
    assert other.rpc.call("streampay-list")["streams"] == []
    print(f"reckless: installed with {sys.version.split()[0]} from a clone and from a source; "
          f"{len(os.listdir(tmp_path / 'rk2' / 'micropay' / 'source' / 'micropay'))} files staged")
