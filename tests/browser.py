"""Headless Chromium (Debian's) driven by Playwright, for the paywall tests.
Skips, saying why, when Chromium or Playwright is missing."""
from __future__ import annotations

import contextlib
import os
import shutil

import pytest

CHROMIUM = os.environ.get("MICROPAY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def browser_skip_reason() -> str | None:
    if CHROMIUM is None:
        return "no Chromium on PATH (apt-get install chromium, or set MICROPAY_CHROMIUM)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install '.[test]')"
    return None


@contextlib.asynccontextmanager
async def chromium_page():
    reason = browser_skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.async_api import async_playwright
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-background-networking", "--disable-dev-shm-usage"])
        try:
            page = await browser.new_page()
            yield page
        finally:
            await browser.close()
