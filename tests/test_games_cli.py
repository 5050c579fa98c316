"""The apikey and webhooks commands, and the contrib example game, as real processes."""
import json
import subprocess
import sys
from pathlib import Path

from .helpers_proc import run_cli

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
    assert (tmp_path / "data" / "micropay.sqlite3").stat().st_mode & 0o077 == 0
    gone = run_cli("apikey", "revoke", rec["kid"], "--config", "g.toml", cwd=tmp_path)
    assert gone.returncode == 0 and "revoked" in gone.stdout
    assert "revoked" in run_cli("apikey", "list", "--config", "g.toml", cwd=tmp_path).stdout
    again = run_cli("apikey", "revoke", rec["kid"], "--config", "g.toml", cwd=tmp_path)
    assert again.returncode == 2 and "no active key" in again.stderr and "Traceback" not in again.stderr
    bad = run_cli("apikey", "create", "--name", "x", "--scope", "admin", "--config", "g.toml", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_webhooks_commands(tmp_path):
    import asyncio

    from micropay.store import open_store_from_url
    from micropay.store.games import NewEvent

    (tmp_path / "g.toml").write_text(CONFIG)

    async def seed():
        store = open_store_from_url(f"sqlite:///{tmp_path / 'data' / 'micropay.sqlite3'}")
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
    run_cli("webhooks", "rotate-secret", "srv", "--drop-old", "--config", "g.toml", cwd=tmp_path)
    assert len(secret.read_text().split()) == 1


def test_contrib_game_runs_with_one_command(tmp_path):
    script = Path(__file__).resolve().parents[1] / "contrib" / "game" / "run.py"
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "inventory of player-1: {'gems': 100}" in res.stdout and "run: OK" in res.stdout
    assert "granted 100 gems to player-1" in res.stdout
