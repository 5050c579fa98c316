"""End to end through real processes: `micropay serve` and `micropay get`."""
import json
import urllib.request
from pathlib import Path

import pytest

from ..helpers_proc import ServerProcess, free_port, run_cli


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo")
    port = free_port()
    server = ServerProcess(["serve", "--listen", f"127.0.0.1:{port}"], cwd, port)
    yield server, cwd
    assert server.stop() == 0          # graceful shutdown on SIGTERM
    assert "shutting down" in server.read_log()


def test_serve_announces_sandbox_mode(demo_server):
    server, _ = demo_server
    assert "SANDBOX MODE" in server.read_log()


def test_paid_request_end_to_end_from_the_cli(demo_server, tmp_path):
    server, _ = demo_server
    cache = str(tmp_path / "client.json")
    res = run_cli("get", "--wallet", "sandbox", "--cache", cache, f"{server.url}/api/joke", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "joke" in json.loads(res.stdout)
    assert "invoice for 1000 msat" in res.stderr and "paid 1000 msat" in res.stderr
    assert "receipt verified" in res.stderr and "HTTP 200" in res.stderr
    wallet = json.loads(urllib.request.urlopen(f"{server.url}/sandbox/wallets/default").read())
    assert wallet["balance_msat"] == 100_000_000_000 - 1000


def test_cli_answers_with_the_payment_scheme_when_asked(demo_server, tmp_path):
    server, _ = demo_server
    res = run_cli("get", "--prefer", "payment", "--cache", str(tmp_path / "c.json"), f"{server.url}/api/joke",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "joke" in json.loads(res.stdout)
    assert "Payment charge of 1000 msat" in res.stderr and "Payment receipt for" in res.stderr
    assert "HTTP 200" in res.stderr


def test_cli_budget_refusal_is_a_clear_error(demo_server, tmp_path):
    server, _ = demo_server
    res = run_cli("get", "--max-msat", "10", "--cache", "", f"{server.url}/api/joke", cwd=tmp_path)
    assert res.returncode == 2
    assert "per-request budget" in res.stderr and "Traceback" not in res.stderr


def test_budget_show_and_reset_start_the_budgets_over(demo_server, tmp_path):
    server, _ = demo_server
    cache = str(tmp_path / "client.json")
    url = f"{server.url}/api/joke"
    assert run_cli("get", "--cache", cache, url, cwd=tmp_path).returncode == 0
    over = run_cli("get", "--cache", cache, "--total-budget-msat", "2500", url, cwd=tmp_path)
    assert over.returncode == 2 and "total budget" in over.stderr          # 1000 spent + 1000 + fee limit 1000
    shown = run_cli("budget", "show", "--cache", cache, cwd=tmp_path)
    assert shown.returncode == 0 and "1000 msat in 1 payments" in shown.stdout
    assert f"{server.url.split('//')[1]}: 1000 msat in the last 24 hours" in shown.stdout
    reset = run_cli("budget", "reset", "--cache", cache, cwd=tmp_path)
    assert reset.returncode == 0 and "forgot 1 completed payments" in reset.stdout
    again = run_cli("get", "--cache", cache, "--total-budget-msat", "2500", url, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    folder = run_cli("get", "--cache", str(tmp_path), url, cwd=tmp_path)
    assert folder.returncode == 2 and "is a directory" in folder.stderr and "Traceback" not in folder.stderr


def test_verify_receipt_cli(demo_server, tmp_path):
    server, _ = demo_server
    import asyncio

    from micropay.client.payer import Budget, L402Client, SandboxHttpWallet

    async def fetch():
        c = L402Client(SandboxHttpWallet(f"{server.url}/sandbox/wallets/r"), Budget())
        return await c.get(f"{server.url}/api/echo")

    result = asyncio.run(fetch())
    receipt = result.headers["Payment-Receipt"]
    pub = json.loads(urllib.request.urlopen(f"{server.url}/.well-known/l402.json").read())["receipt_pubkey"]
    ok = run_cli("verify-receipt", receipt, "--pubkey", pub, cwd=tmp_path)
    assert ok.returncode == 0 and json.loads(ok.stdout)["type"] == "pass"
    bad = run_cli("verify-receipt", receipt[:-4] + "AAAA", "--pubkey", pub, cwd=tmp_path)
    assert bad.returncode == 2 and "does not verify" in bad.stderr


def test_bad_config_fails_at_startup_naming_file_and_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('upstream = "http://127.0.0.1:1"\n[[routes]]\npath = "/x"\nprice_msat = 0\n')
    res = run_cli("serve", "--config", str(cfg), cwd=tmp_path, timeout=30)
    assert res.returncode == 2
    assert f"{cfg}:4: routes[0].price_msat" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("check-config", str(cfg), cwd=tmp_path)
    assert res.returncode == 2


def test_keys_rotate_and_list(tmp_path):
    empty = run_cli("keys", "list", "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert empty.returncode == 2 and "no root key file" in empty.stderr
    assert not (tmp_path / "d").exists()                          # listing creates nothing
    (tmp_path / "c.toml").write_text('data_dir = "d"\ndemo = true\n')
    rot = run_cli("keys", "rotate", "--config", "c.toml", cwd=tmp_path)
    assert rot.returncode == 0 and rot.stdout.count("\n") == 3   # new key line + two keys
    listed = run_cli("keys", "list", "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert listed.returncode == 0 and listed.stdout.count("current") == 1 and " UTC" in listed.stdout


def test_cln_backend_without_a_node_is_a_clear_error(tmp_path):
    res = run_cli("serve", "--backend", "cln", "--data-dir", str(tmp_path / "d"), cwd=tmp_path, timeout=30)
    assert res.returncode == 2 and "needs the node's socket" in res.stderr
    res = run_cli("serve", "--backend", "cln", "--lightning-dir", str(tmp_path / "ln"), "--network", "regtest",
                  "--data-dir", str(tmp_path / "d"), cwd=tmp_path, timeout=30)
    assert res.returncode == 2
    assert f"cannot connect to lightningd at {tmp_path / 'ln' / 'regtest' / 'lightning-rpc'}" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_supervised_sidecar_dies_with_its_supervisor(tmp_path):
    """--exit-with-stdin: when the process holding the other end of stdin is killed -9,
    the sidecar shuts down (it never outlives the plugin that supervises it)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    port = free_port()
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-m', 'micropay.cli', 'serve', '--listen', '127.0.0.1:{port}', "
        f"'--data-dir', {str(tmp_path / 'd')!r}, '--exit-with-stdin'], stdin=subprocess.PIPE)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            break
        except OSError:
            time.sleep(0.1)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _running(child):
        time.sleep(0.1)
    assert not _running(child)


def _running(pid: int) -> bool:
    from pathlib import Path
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def test_a_leftover_sidecar_is_stopped_and_nothing_else(tmp_path):
    import asyncio
    import subprocess
    import sys

    from micropay.plugin.supervisor import stop_leftover
    data = tmp_path / "d"
    port = free_port()
    ours = subprocess.Popen([sys.executable, "-m", "micropay.cli", "serve", "--listen", f"127.0.0.1:{port}",
                             "--data-dir", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    other = subprocess.Popen(["sleep", "60"])
    try:
        await asyncio.sleep(1.5)
        (tmp_path / "other.pid").write_text(str(other.pid))
        await stop_leftover(tmp_path / "other.pid", data)          # not a sidecar of ours: left alone
        assert other.poll() is None
        (tmp_path / "ours.pid").write_text(str(ours.pid))
        await stop_leftover(tmp_path / "ours.pid", data)
        assert ours.wait(5) is not None
    finally:
        other.kill()
        ours.kill()


def test_sandbox_invoice_to_try_payouts(demo_server, tmp_path):
    server, _ = demo_server
    res = run_cli("sandbox-invoice", "2500", "--server", server.url, "--wallet", "player", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("lnbcrt25n"), res.stderr
    import bolt11
    assert bolt11.decode(res.stdout.strip()).amount_msat == 2500


def test_naming_a_node_means_the_cln_backend(tmp_path):
    sock = tmp_path / "lightning-rpc"
    res = run_cli("serve", "--rpc-file", str(sock), "--data-dir", str(tmp_path / "d"), cwd=tmp_path, timeout=30)
    assert res.returncode == 2 and f"cannot connect to lightningd at {sock}" in res.stderr   # not the sandbox
    res = run_cli("serve", "--backend", "sandbox", "--rpc-file", str(sock), cwd=tmp_path, timeout=30)
    assert res.returncode == 2 and "do not go with --backend sandbox" in res.stderr


def test_sandbox_banner_suggests_a_route_of_the_running_config(tmp_path):
    port = free_port()
    (tmp_path / "own.toml").write_text(f'listen = "127.0.0.1:{port}"\nupstream = "http://127.0.0.1:9"\n'
                                       '[backend]\nkind = "sandbox"\n[[routes]]\npath = "/v1/items/{id}"\n'
                                       'price_msat = 5\n[[routes]]\npath = "/v1/report"\nprice_msat = 7\n')
    server = ServerProcess(["serve", "--config", "own.toml"], tmp_path, port)
    try:
        log = server.read_log()
    finally:
        server.stop()
    assert "SANDBOX MODE" in log and f"micropay get --wallet sandbox http://127.0.0.1:{port}/v1/report" in log
    assert "/api/joke" not in log


def test_version_and_a_closed_pipe(tmp_path):
    import subprocess
    import sys

    from micropay import __version__
    res = run_cli("--version", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == f"micropay {__version__}"
    assert run_cli("keys", "rotate", "--data-dir", "d", cwd=tmp_path).returncode == 0
    # `micropay keys list | head -0`: the reader is gone before anything is written
    p = subprocess.Popen([sys.executable, "-m", "micropay.cli", "keys", "list", "--data-dir", "d"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(30)
    assert "Broken pipe" not in err and "BrokenPipeError" not in err and "Traceback" not in err, err


def test_network_sets_the_fleets_network_and_where_a_nodes_socket_is(tmp_path):
    """--network names the fleet's network in fleet mode (over the config's [backend]
    network, whose default is regtest), and is still where --lightning-dir's socket is."""
    from micropay.cli import _config_from_args, build_parser
    from micropay.core.errors import ConfigError
    (tmp_path / "fleet.toml").write_text('demo = true\n[backend]\nkind = "fleet"\nnetwork = "signet"\n')

    def cfg(*argv):
        return _config_from_args(build_parser().parse_args(["serve", *argv]))
    assert cfg("--backend", "fleet").fleet.network == "regtest"
    assert cfg("--backend", "fleet", "--network", "bitcoin").fleet.network == "bitcoin"
    assert cfg("--config", str(tmp_path / "fleet.toml")).fleet.network == "signet"
    assert cfg("--config", str(tmp_path / "fleet.toml"), "--network", "testnet4").fleet.network == "testnet4"
    with pytest.raises(ConfigError, match="fleet's network"):
        cfg("--backend", "fleet", "--network", "liquid")
    assert cfg("--backend", "cln", "--lightning-dir", "/ln").rpc_file == Path("/ln/bitcoin/lightning-rpc")
    assert cfg("--backend", "cln", "--lightning-dir", "/ln", "--network", "regtest").rpc_file == \
        Path("/ln/regtest/lightning-rpc")
