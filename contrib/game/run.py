#!/usr/bin/env python3
"""Run the example game end to end against the sandbox, with one command:

    python contrib/game/run.py

It starts the micropay sidecar (sandbox backend) and the game server on free ports on
127.0.0.1, creates an API key, then plays a player's client: buy 100 gems through the
game server, watch the purchase over SSE, pay the invoice with a sandbox wallet, and
check that the game server (webhook + offline receipt check) granted the gems.
Exits 0 when every step worked; everything runs in a temporary directory, removed at
the end unless --keep is given.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None) -> dict:
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"{}")


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"run: {what} exited early (code {proc.returncode})")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"run: {what} did not come up at {url}")


def step(msg: str) -> None:
    print(f"run: {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="contrib/game/run.py",
        description="Run the example game end to end against the sandbox: start the micropay sidecar and "
                    "the game server on free 127.0.0.1 ports, buy 100 gems as a player, pay from a "
                    "sandbox wallet and check that the game granted them. Exits 0 when every step worked.")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary work directory (config, keys, sidecar.log, database) and print "
                         "its path at the end")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="micropay-game-"))
    side_port, game_port = free_port(), free_port()
    cfg = (HERE / "game.toml").read_text()
    cfg = cfg.replace("127.0.0.1:8402", f"127.0.0.1:{side_port}").replace("127.0.0.1:8500", f"127.0.0.1:{game_port}")
    (work / "game.toml").write_text(cfg)
    micropay = [sys.executable, "-m", "micropay.cli"]
    procs: list[subprocess.Popen] = []
    try:
        key = subprocess.run(micropay + ["apikey", "create", "--name", "game-server", "--config", "game.toml",
                                         "--json"], cwd=work, check=True, capture_output=True, text=True)
        api_key = json.loads(key.stdout)["key"]
        step("API key created for the game server (only its hash is stored)")
        side = subprocess.Popen(micropay + ["serve", "--config", "game.toml"], cwd=work,
                                stdout=open(work / "sidecar.log", "w"), stderr=subprocess.STDOUT)
        procs.append(side)
        sidecar = f"http://127.0.0.1:{side_port}"
        wait_http(f"{sidecar}/healthz", side, "the sidecar")
        pubkey = http("GET", f"{sidecar}/.well-known/l402.json")["receipt_pubkey"]
        step(f"sidecar up at {sidecar} (sandbox), receipt key {pubkey[:16]}...")
        env = dict(os.environ, MICROPAY_URL=sidecar, MICROPAY_API_KEY=api_key, MICROPAY_RECEIPT_PUBKEY=pubkey,
                   MICROPAY_WEBHOOK_SECRET_FILE=str(work / ".micropay" / "webhook-game-server.secret"),
                   GAME_LISTEN=f"127.0.0.1:{game_port}")
        game = subprocess.Popen([sys.executable, str(HERE / "game_server.py")], env=env, cwd=work,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(game)
        game_url = f"http://127.0.0.1:{game_port}"
        wait_http(f"{game_url}/inventory/nobody", game, "the game server")
        step(f"game server up at {game_url}")

        # -- the player's client --------------------------------------------------------
        buy = http("POST", f"{game_url}/buy", {"player_id": "player-1", "sku": "gems-100", "order_id": "order-1"})
        step(f"player-1 buys 100 gems: purchase {buy['id']}, {buy['price_msat']} msat")
        events = urllib.request.urlopen(
            f"{sidecar}/v1/purchases/{buy['id']}/events?token={buy['client_token']}", timeout=20)
        paid = http("POST", f"{sidecar}/sandbox/wallets/player-1/pay", {"bolt11": buy["invoice"]})
        step(f"paid from the sandbox wallet (preimage {paid['preimage'][:16]}...)")
        for raw in events:
            line = raw.decode().strip()
            if line.startswith("event: "):
                step(f"SSE: {line[7:]}")
                if line == "event: purchase.paid":
                    break
        events.close()
        deadline = time.monotonic() + 20
        inventory: dict = {}
        while time.monotonic() < deadline and inventory.get("gems") != 100:
            inventory = http("GET", f"{game_url}/inventory/player-1")
            time.sleep(0.1)
        if inventory.get("gems") != 100:
            step(f"FAILED: the game did not grant the gems: {inventory}")
            return 1
        step(f"inventory of player-1: {inventory} (webhook verified, receipt checked offline)")
        again = http("POST", f"{game_url}/buy", {"player_id": "player-1", "sku": "gems-100", "order_id": "order-1"})
        assert again["id"] == buy["id"], "the same order must give the same purchase"
        step("retrying the same order returns the same purchase: nothing is sold twice")
        step("OK")
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                out, _ = p.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                out = None
            if out and p is procs[-1]:
                print(out.rstrip(), flush=True)
        if args.keep:
            step(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
