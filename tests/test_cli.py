"""End to end through real processes: `micropay serve` and `micropay get`."""
import json
import urllib.request

import pytest

from .helpers_proc import ServerProcess, free_port, run_cli


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


def test_cli_budget_refusal_is_a_clear_error(demo_server, tmp_path):
    server, _ = demo_server
    res = run_cli("get", "--max-msat", "10", "--cache", "", f"{server.url}/api/joke", cwd=tmp_path)
    assert res.returncode == 2
    assert "per-request budget" in res.stderr and "Traceback" not in res.stderr


def test_verify_receipt_cli(demo_server, tmp_path):
    server, _ = demo_server
    import asyncio

    from micropay.client import Budget, L402Client, SandboxHttpWallet

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
    assert f"{cfg}: routes[0].price_msat" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("check-config", str(cfg), cwd=tmp_path)
    assert res.returncode == 2


def test_keys_rotate_and_list(tmp_path):
    first = run_cli("keys", "list", "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert first.returncode == 0 and "current" in first.stdout
    rot = run_cli("keys", "rotate", "--data-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert rot.returncode == 0 and rot.stdout.count("\n") == 3   # new key line + two keys


def test_cln_backend_without_a_node_is_a_clear_error(tmp_path):
    res = run_cli("serve", "--backend", "cln", "--data-dir", str(tmp_path / "d"), cwd=tmp_path, timeout=30)
    assert res.returncode == 2 and "needs the node's socket" in res.stderr
    res = run_cli("serve", "--backend", "cln", "--lightning-dir", str(tmp_path / "ln"), "--network", "regtest",
                  "--data-dir", str(tmp_path / "d"), cwd=tmp_path, timeout=30)
    assert res.returncode == 2
    assert f"cannot connect to lightningd at {tmp_path / 'ln' / 'regtest' / 'lightning-rpc'}" in res.stderr
    assert "Traceback" not in res.stderr
