"""The paywall offers the wallet the browser has, in headless Chromium against the
sandbox: an injected `window.webln` pays with one click; Bitcoin Connect (the npm bundle,
built here with esbuild as docs/games.md shows) connected to an NWC wallet served by the
plugin's NWC service pays with one click. Either way the page unlocks when the purchase's
record says paid, over SSE."""
import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest


from ..browser import chromium_page
from ..games_util import GAMES_TOML, start_game_sidecar
from ..nwc.util import nwc_service

JS = Path(__file__).resolve().parents[1] / "js"


def build_bitcoin_connect(out: Path) -> Path:
    """The browser bundle of @getalby/bitcoin-connect (installed in tests/js by .ci/run)."""
    if shutil.which("node") is None:
        pytest.skip("node is not on PATH")
    if not (JS / "node_modules" / "@getalby" / "bitcoin-connect").is_dir():
        pytest.skip("@getalby/bitcoin-connect is not installed: npm ci --prefix tests/js (.ci/run does it)")
    subprocess.run([str(JS / "node_modules" / ".bin" / "esbuild"), str(JS / "bitcoin_connect_entry.js"), "--bundle",
                    "--format=iife", "--global-name=bitcoinConnect", "--minify", "--platform=browser",
                    "--external:@lightninglabs/lnc-web", "--external:crypto", f"--outfile={out}"],
                   check=True, capture_output=True, timeout=120)
    return out


async def test_webln_pays_with_one_click(tmp_path):
    gs = await start_game_sidecar(tmp_path)
    try:
        async with chromium_page() as page:
            paid = []

            async def pay(invoice):
                paid.append(invoice)
                return (await gs.payer.pay(invoice)).preimage
            await page.expose_function("sandboxPay", pay)
            await page.add_init_script("""window.webln = {
                enable: async () => {}, sendPayment: async (pr) => ({preimage: await window.sandboxPay(pr)})};""")
            await page.goto(f"{gs.url}/paywall/article-1")
            await page.wait_for_selector("body[data-state=awaiting-payment]", timeout=10_000)
            assert await page.is_visible("#webln-pay") and not await page.is_visible("#bc-pay")
            await page.click("#webln-pay")
            await page.wait_for_selector("#secret", state="visible", timeout=10_000)
            assert paid == [(await page.text_content("#invoice")).strip()]
    finally:
        await gs.close()


async def test_without_a_browser_wallet_no_button_shows(tmp_path):
    gs = await start_game_sidecar(tmp_path)
    try:
        async with chromium_page() as page:
            await page.goto(f"{gs.url}/paywall/article-1")
            await page.wait_for_selector("body[data-state=awaiting-payment]", timeout=10_000)
            assert not await page.is_visible("#webln-pay") and not await page.is_visible("#bc-pay")
            status, _, _ = await gs.call("GET", "/paywall/_wallets/bitcoin-connect.js", headers={})
            assert status == 404
    finally:
        await gs.close()


async def test_bitcoin_connect_with_an_nwc_wallet_pays_with_one_click(tmp_path, nostr_relay):
    bundle = build_bitcoin_connect(tmp_path / "bitcoin-connect.js")
    gs = await start_game_sidecar(tmp_path, GAMES_TOML + f'\n[paywall]\nbitcoin_connect_file = "{bundle}"\n')
    try:
        async with nwc_service(gs.payer, tmp_path, nostr_relay.url, alias="reader's node") as runner:
            await _pay_with_bitcoin_connect(gs, runner)
    finally:
        await gs.close()


async def unlock_with_bitcoin_connect(page_url: str, nwc_uri: str, timeout_s: float) -> None:
    """In Chromium: open the paywall, connect the reader's NWC wallet in Bitcoin Connect
    (what pasting the URI into its modal does), pay with one click, wait for the content."""
    async with chromium_page() as page:
        await page.goto(page_url)
        await page.wait_for_selector("body[data-state=awaiting-payment]", timeout=20_000)
        assert await page.is_visible("#bc-pay")
        await page.evaluate("uri => window.bitcoinConnect.connectNWC(uri)", nwc_uri)
        for _ in range(200):
            if await page.evaluate("() => window.bitcoinConnect.isConnected()"):
                break
            await asyncio.sleep(0.1)
        await page.click("#bc-pay")
        await page.wait_for_selector("#secret", state="visible", timeout=timeout_s * 1000)


async def _pay_with_bitcoin_connect(gs, runner):
    """Connect the reader's NWC wallet in Bitcoin Connect, then one click pays."""
    created = await runner.service.create("browser", budget_msat=100_000, budget_period="daily",
                                          methods=("pay_invoice", "get_info", "get_balance"), max_fee_msat=0)
    await runner.changed()
    await asyncio.sleep(0.3)
    await unlock_with_bitcoin_connect(f"{gs.url}/paywall/article-1", created["uri"], timeout_s=30)
    assert (await runner.service.list())[0]["used_msat"] == 2000


def test_a_missing_bundle_is_a_config_error(tmp_path):
    import tomllib

    from micropay.core.errors import ConfigError
    from micropay.seller.configfile import parse_config
    text = GAMES_TOML + '\n[paywall]\nbitcoin_connect_file = "nowhere/bitcoin-connect.js"\n'
    with pytest.raises(ConfigError, match="bitcoin_connect_file.*is not a file"):
        parse_config(tomllib.loads(text), str(tmp_path / "game.toml"))


async def test_the_bundle_is_served_same_origin_and_allowed_by_the_csp(tmp_path):
    import aiohttp
    bundle = tmp_path / "bc.js"
    bundle.write_text("window.bitcoinConnect = undefined;")
    gs = await start_game_sidecar(tmp_path, GAMES_TOML + f'\n[paywall]\nbitcoin_connect_file = "{bundle}"\n')
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(gs.url + "/paywall/article-1") as r:
                csp = r.headers["Content-Security-Policy"]
                assert "script-src 'self' 'unsafe-inline'" in csp and "connect-src 'self' wss: ws:" in csp
                assert '<script src="/paywall/_wallets/bitcoin-connect.js">' in await r.text()
            async with s.get(gs.url + "/paywall/_wallets/bitcoin-connect.js") as r:
                assert r.status == 200 and r.content_type == "text/javascript"
                assert await r.text() == "window.bitcoinConnect = undefined;"
    finally:
        await gs.close()
