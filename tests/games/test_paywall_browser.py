"""The paywall page in headless Chromium against the sandbox: QR code, lightning: link,
live unlock over SSE without a reload; a returning reader gets the content at once."""
import pytest

from ..browser import chromium_page
from ..games_util import start_game_sidecar


@pytest.fixture
async def gs(tmp_path):
    g = await start_game_sidecar(tmp_path)
    yield g
    await g.close()


async def test_paywall_unlocks_live_when_paid(gs):
    async with chromium_page() as page:
        await page.goto(f"{gs.url}/paywall/article-1")
        assert await page.title() == "The article"
        await page.wait_for_selector("body[data-state=awaiting-payment]", timeout=10_000)
        assert await page.text_content("#price") == "2 sat"
        invoice = (await page.text_content("#invoice")).strip()
        assert invoice.startswith("lnbcrt20n")
        assert await page.get_attribute("#ln-link", "href") == f"lightning:{invoice}"
        assert await page.locator("#qr svg path").count() == 1      # the QR code is drawn
        assert not await page.is_visible("#content")
        await page.evaluate("window.__noReload = 42")
        await gs.payer.pay(invoice)
        await page.wait_for_selector("#secret", state="visible", timeout=5_000)
        assert await page.text_content("#secret") == "The secret ending."
        assert await page.evaluate("window.__noReload") == 42       # same document: no reload
        assert not await page.is_visible("#pay")
        pid = await page.evaluate("document.body.dataset.purchase")
        _, p, _ = await gs.call("GET", f"/v1/purchases/{pid}")
        assert p["status"] == "paid" and p["player_id"].startswith("web:")
        # the same reader comes back: unlocked at once, no new invoice
        await page.reload()
        await page.wait_for_selector("#secret", state="visible", timeout=5_000)
        assert await page.evaluate("document.body.dataset.purchase") == pid


async def test_paywall_content_needs_payment(gs):
    async with chromium_page() as page:
        await page.goto(f"{gs.url}/paywall/article-1")
        await page.wait_for_selector("body[data-state=awaiting-payment]", timeout=10_000)
        pid = await page.evaluate("document.body.dataset.purchase")
        token = gs.games.purchases.client_token(pid)
        status, body, _ = await gs.call("GET", f"/paywall/article-1/content?purchase={pid}&token={token}",
                                        headers={})
        assert status == 402 and b"secret" not in (body if isinstance(body, bytes) else b"")
