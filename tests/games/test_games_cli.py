"""The apikey and webhooks commands, and the contrib example game, as real processes."""
import json
import stat
import subprocess
import sys
from pathlib import Path

from ..helpers_proc import run_cli

CONFIG = """
service = "g"
data_dir = "data"
[[catalog]]
sku = "gems"
price_msat = 1000
[[webhooks]]
name = "srv"
url = "http://127.0.0.1:9/hook"
"""


def test_apikey_lifecycle(tmp_path):
    (tmp_path / "g.toml").write_text(CONFIG)
    made = run_cli("apikey", "create", "--name", "server", "--scope", "purchases:read", "--config", "g.toml",
                   "--json", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    rec = json.loads(made.stdout)
    assert rec["key"].startswith(f"mpk_{rec['kid']}_") and rec["scopes"] == ["purchases:read"]
    listed = run_cli("apikey", "list", "--config", "g.toml", cwd=tmp_path)
    assert rec["kid"] in listed.stdout and "active" in listed.stdout and rec["key"] not in listed.stdout
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "data" / "micropay.sqlite3").stat().st_mode) == 0o600
    gone = run_cli("apikey", "revoke", rec["kid"], "--config", "g.toml", cwd=tmp_path)
    assert gone.returncode == 0 and "revoked" in gone.stdout
    assert "revoked" in run_cli("apikey", "list", "--config", "g.toml", cwd=tmp_path).stdout
    again = run_cli("apikey", "revoke", rec["kid"], "--config", "g.toml", cwd=tmp_path)
    assert again.returncode == 2 and "no active key" in again.stderr and "Traceback" not in again.stderr
    bad = run_cli("apikey", "create", "--name", "x", "--scope", "admin", "--config", "g.toml", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_webhooks_commands(tmp_path):
    import asyncio

    from micropay.games.repository import NewEvent
    from micropay.games.schema import GAMES_SCHEMA
    from micropay.store import CORE_SCHEMA, open_store_from_url

    (tmp_path / "g.toml").write_text(CONFIG)

    async def seed():
        store = open_store_from_url(f"sqlite:///{tmp_path / 'data' / 'micropay.sqlite3'}",
                                    (CORE_SCHEMA, GAMES_SCHEMA))
        await store.open()
        ev = NewEvent("purchase.paid:pur_1", "purchase.paid", "pur_1", "p", {"purchase": {"id": "pur_1"}}, 1_800_000_000)
        await store.transaction(ev.steps(["srv"]))
        await store.query("UPDATE micropay_webhook_deliveries SET status = 'failed', attempts = 9, "
                          "last_error = 'HTTP 503'")
        await store.close()
    asyncio.run(seed())
    listed = run_cli("webhooks", "list", "--status", "failed", "--config", "g.toml", cwd=tmp_path)
    assert listed.returncode == 0 and "purchase.paid\tpur_1\tsrv\tfailed\tattempts=9" in listed.stdout
    assert "HTTP 503" in listed.stdout
    shown = run_cli("webhooks", "show", "1", "--config", "g.toml", "--json", cwd=tmp_path)
    doc = json.loads(shown.stdout)
    assert doc["event"]["data"]["purchase"]["id"] == "pur_1" and doc["deliveries"][0]["endpoint"] == "srv"
    redo = run_cli("webhooks", "redeliver", "1", "--config", "g.toml", cwd=tmp_path)
    assert redo.returncode == 0 and "queued again for srv" in redo.stdout
    assert "pending" in run_cli("webhooks", "list", "--config", "g.toml", cwd=tmp_path).stdout
    missing = run_cli("webhooks", "show", "99", "--config", "g.toml", cwd=tmp_path)
    assert missing.returncode == 2 and "no deliveries" in missing.stderr

    secret = tmp_path / "data" / "webhook-srv.secret"
    rot = run_cli("webhooks", "rotate-secret", "srv", "--config", "g.toml", cwd=tmp_path)
    assert rot.returncode == 0
    first = secret.read_text().split()
    assert len(first) == 1 and secret.stat().st_mode & 0o077 == 0     # created, then rotated
    run_cli("webhooks", "rotate-secret", "srv", "--config", "g.toml", cwd=tmp_path)
    both = secret.read_text().split()
    assert len(both) == 2 and both[1] == first[0]     # new first, old still signing
    dropped = run_cli("webhooks", "rotate-secret", "srv", "--drop-old", "--config", "g.toml", cwd=tmp_path)
    assert dropped.returncode == 0
    assert secret.read_text().split() == [both[0]]    # the secret the receiver was given, and only it
    nothing = run_cli("webhooks", "rotate-secret", "srv", cwd=tmp_path)
    assert nothing.returncode == 2 and "pass --config" in nothing.stderr


def test_contrib_game_runs_with_one_command(tmp_path):
    script = Path(__file__).resolve().parents[2] / "contrib" / "game" / "run.py"
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "inventory of player-1: {'gems': 100}" in res.stdout and "run: OK" in res.stdout
    assert "granted 100 gems to player-1" in res.stdout
    helped = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=30,
                            cwd=tmp_path)
    assert helped.returncode == 0 and "--keep" in helped.stdout and "run: " not in helped.stdout


def test_a_fresh_sandbox_can_pay_a_player_before_it_sold_anything(tmp_path):
    """games.md's payout steps, in order, on a sidecar that has just started: its sandbox
    node starts with play money, like the wallets."""
    import urllib.request

    from ..helpers_proc import ServerProcess, free_port
    port = free_port()
    (tmp_path / "g.toml").write_text(f'listen = "127.0.0.1:{port}"\n' + CONFIG +
                                     '[payouts]\nper_player_day_msat = 100_000\nper_day_msat = 10_000_000\n')
    key = json.loads(run_cli("apikey", "create", "--name", "payer", "--scope", "payouts:write", "--config",
                             "g.toml", "--json", cwd=tmp_path).stdout)["key"]
    server = ServerProcess(["serve", "--config", "g.toml"], tmp_path, port)
    try:
        invoice = run_cli("sandbox-invoice", "2500", "--wallet", "player-1", "--server", server.url, cwd=tmp_path)
        assert invoice.returncode == 0, invoice.stderr
        req = urllib.request.Request(
            f"{server.url}/v1/payouts", method="POST", headers={"Authorization": f"Bearer {key}",
                                                                "Content-Type": "application/json"},
            data=json.dumps({"player_id": "player-1", "destination": invoice.stdout.strip(),
                             "idempotency_key": "first"}).encode())
        payout = json.loads(urllib.request.urlopen(req, timeout=10).read())
        assert payout["status"] == "paid", payout
        wallet = json.loads(urllib.request.urlopen(f"{server.url}/sandbox/wallets/player-1", timeout=10).read())
        assert wallet["balance_msat"] == 100_000_000_000 + 2500
    finally:
        server.stop()
