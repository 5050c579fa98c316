"""What a new user meets on the documented paths (issue 18, section 4): the demo's
session route and what `micropay get` says about it, the start-up banner, `get -v`,
the embedded gate's discovery and sandbox warning, the lazy purchases API, and the
small things (plurals, help, credits left, budget messages, headers)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import tomllib
import urllib.request

import pytest
from aiohttp import ClientSession, web

from micropay.client.payer import Budget, BudgetExceeded, L402Client, SandboxHttpWallet, TokenCache
from micropay.seller.configfile import demo_config, parse_config
from micropay.lightning.bolt11codec import decode_invoice

from .conftest import serve_app
from .helpers_proc import ServerProcess, free_port, run_cli


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("newcomer")
    port = free_port()
    server = ServerProcess(["serve", "--listen", f"127.0.0.1:{port}"], cwd, port)
    yield server
    server.stop()


def get(server, tmp_path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("get", "--cache", str(tmp_path / "c.json"), *args, cwd=tmp_path)


def test_a_session_route_without_session_says_to_use_it(demo, tmp_path):
    res = get(demo, tmp_path, f"{demo.url}/api/story")
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("micropay: HTTP 402") and "--session" in last, res.stderr
    done = get(demo, tmp_path, "--session", f"{demo.url}/api/story?n=2")
    assert done.returncode == 0, done.stderr
    assert "closed, refund 3 sat succeeded" in done.stderr and "opened a channel" in done.stdout


def test_the_banner_suggests_a_command_per_kind_of_route(demo):
    log = demo.read_log()
    assert f"micropay get --wallet sandbox {demo.url}/api/joke" in log
    assert f"micropay get --wallet sandbox {demo.url}/api/fortune/1" in log
    assert f"micropay get --session --wallet sandbox {demo.url}/api/story" in log


def test_a_catalog_only_config_gets_no_command_in_the_banner():
    from micropay.cli import sandbox_banner
    cfg = parse_config(tomllib.loads('service = "g"\n[[catalog]]\nsku = "gems"\nprice_msat = 1000\n'), "g.toml")
    banner = sandbox_banner(cfg)
    assert "SANDBOX MODE" in banner and "micropay get" not in banner and "Pay them" not in banner


def test_get_v_is_accepted_where_documented_and_logs_what_the_client_does(demo, tmp_path):
    for args in (["get", "-v"], ["-v", "get"]):
        res = run_cli(*args, "--cache", "", f"{demo.url}/api/joke", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert "DEBUG micropay.client: sent GET" in res.stderr and "-> HTTP 402" in res.stderr
        assert "asyncio" not in res.stderr


def test_a_cached_tokens_request_shows_the_credits_left(demo, tmp_path):
    assert get(demo, tmp_path, f"{demo.url}/api/fortune/1").returncode == 0
    res = get(demo, tmp_path, f"{demo.url}/api/fortune/2")
    assert res.returncode == 0
    assert "used the cached token for GET /api/fortune/2: 8 credits left" in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "micropay: HTTP 200; paid with a cached token, 8 credits left"


def test_a_body_without_a_final_newline_gets_one(demo, tmp_path):
    res = get(demo, tmp_path, "-q", f"{demo.url}/api/joke")
    assert res.returncode == 0 and res.stdout.endswith("}\n") and res.stderr == ""


def test_get_help_explains_every_argument_and_names_the_default_wallet(tmp_path):
    res = run_cli("get", "--help", cwd=tmp_path)
    text = " ".join(res.stdout.split())
    assert "the http(s) URL to request" in text
    assert "-X METHOD, --method METHOD HTTP method (default GET)" in text
    assert "-q, --quiet print only the body" in text
    assert "sandbox/wallets/default" in text and "the default" in text


def test_check_config_counts_in_words(tmp_path):
    (tmp_path / "one.toml").write_text('upstream = "http://127.0.0.1:9"\n[[routes]]\npath = "/a"\nprice_msat = 1000\n')
    res = run_cli("check-config", "one.toml", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "(1 route, 0 catalog items, 0 webhooks," in res.stdout


def test_sandbox_invoice_without_an_amount_is_amountless(demo, tmp_path):
    res = run_cli("sandbox-invoice", "--server", demo.url, "--wallet", "refunds", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert decode_invoice(res.stdout.strip()).amount_msat is None


def test_well_known_names_the_payment_scheme(demo):
    doc = json.loads(urllib.request.urlopen(f"{demo.url}/.well-known/l402.json").read())
    assert doc["scheme"] == ["L402", "LSAT", "Payment"]


async def test_budget_messages_word_the_fee_alike_and_say_how_to_start_over(tmp_path):
    from micropay.client.payer import Spend
    for budget, word in ((Budget(max_per_host_per_day_msat=1500), "daily"), (Budget(max_total_msat=1500), "total")):
        cache = TokenCache(tmp_path / f"{word}.json")
        client = L402Client(SandboxHttpWallet("http://127.0.0.1:9/x"), budget, cache)
        with cache.locked() as state:
            state.spends["aa"] = Spend("aa", "h:1", 1000, 0, 1_900_000_000, "paid", "http://h:1", "", "")
        with pytest.raises(BudgetExceeded) as info:
            client._check_budget("h:1", 1000, 1_900_000_000.0)
        msg = info.value.message
        assert f"the {word} budget" in msg and "(+ up to 1000 msat fee)" in msg and "fees included" in msg
        assert "micropay budget reset" in msg


def test_apikey_list_has_a_header(tmp_path):
    (tmp_path / "g.toml").write_text('service = "g"\ndata_dir = "data"\n[[catalog]]\nsku = "x"\nprice_msat = 1000\n')
    assert run_cli("apikey", "create", "--name", "srv", "--config", "g.toml", cwd=tmp_path).returncode == 0
    listed = run_cli("apikey", "list", "--config", "g.toml", cwd=tmp_path).stdout.splitlines()
    assert listed[0] == "id\tstate\tscopes\tname" and listed[1].endswith("\tsrv")


async def test_the_embedded_gate_serves_discovery_and_warns_in_sandbox_mode(tmp_path, caplog):
    cfg = parse_config(tomllib.loads('service = "shop"\n[[routes]]\nmethod = "GET"\npath = "/report"\n'
                                     'price_msat = 2000\n'), "shop.toml").with_overrides(data_dir=tmp_path / "d")
    from micropay.sidecar import embed
    app = web.Application()
    embed(app, cfg)

    async def report(request):
        return web.json_response({})
    app.router.add_get("/report", report)
    with caplog.at_level(logging.WARNING, logger="micropay"):
        runner, url = await serve_app(app)
    try:
        async with ClientSession() as s, s.get(f"{url}/.well-known/l402.json") as r:
            assert r.status == 200
            doc = await r.json()
        assert doc["sandbox"] is True and [x["path"] for x in doc["routes"]] == ["/report"]
        assert doc["service"] == "shop" and doc["receipt_pubkey"]
        assert any("SANDBOX MODE" in rec.getMessage() for rec in caplog.records)
    finally:
        await runner.cleanup()


LOADED = """
import asyncio, json, sys
from pathlib import Path
from micropay.cli import build_parser
from micropay.seller.configfile import demo_config, load_config
from micropay.sidecar.app import build_app, create_runtime
build_parser()
async def main():
    cfg = load_config(Path(sys.argv[1])) if len(sys.argv) > 1 else demo_config()
    rt = await create_runtime(cfg.with_overrides(data_dir=Path("data")))
    build_app(rt)
    print(json.dumps({"games": rt.games is not None,
                      "modules": sorted(n for n in sys.modules if n.startswith("micropay.games"))}))
    await rt.store.close()
asyncio.run(main())
"""


def loaded(tmp_path, *config: str) -> dict:
    res = subprocess.run([sys.executable, "-c", LOADED, *config], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_sidecar_without_games_never_loads_the_purchases_api(tmp_path):
    got = loaded(tmp_path)
    assert got == {"games": False, "modules": ["micropay.games", "micropay.games.cli", "micropay.games.config"]}


def test_games_load_with_a_catalog_and_stay_while_purchases_await_payment(tmp_path):
    (tmp_path / "g.toml").write_text('service = "g"\ndata_dir = "data"\n[[catalog]]\nsku = "x"\nprice_msat = 1000\n')
    got = loaded(tmp_path, "g.toml")
    assert got["games"] and "micropay.games.service" in got["modules"]
    # a purchase awaiting payment, then the catalog is removed: its payment is still recorded
    import sqlite3
    db = sqlite3.connect(tmp_path / "data" / "micropay.sqlite3")
    db.execute("INSERT INTO micropay_purchases (id, idempotency_key, sku, player_id, price_msat, metadata, status, "
               "bolt11, payment_hash, created_at, expires_at) VALUES ('pur_1', 'k', 'x', 'p', 1000, '{}', "
               "'pending', 'lnbcrt1', 'ab', 1, 9999999999)")
    db.commit()
    db.close()
    (tmp_path / "plain.toml").write_text('service = "g"\ndata_dir = "data"\n')
    assert loaded(tmp_path, "plain.toml")["games"] is True
    db = sqlite3.connect(tmp_path / "data" / "micropay.sqlite3")
    db.execute("UPDATE micropay_purchases SET status = 'expired'")
    db.commit()
    db.close()
    assert loaded(tmp_path, "plain.toml")["games"] is False
