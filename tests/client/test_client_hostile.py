"""`micropay get` against servers and inputs that misbehave: one line and an exit code,
never a traceback, never a payment it should not make, never unbounded memory."""
import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from ..conftest import serve_app
from ..helpers_proc import run_cli


@pytest.fixture
async def hostile(sidecar):
    """A server that misbehaves, next to a real sandbox sidecar (another origin)."""
    wrote = {"huge402": 0}

    async def real_challenge() -> dict[str, str]:
        async with aiohttp.ClientSession() as s, s.get(sidecar.url + "/api/joke") as r:
            return {"WWW-Authenticate": r.headers.getall("WWW-Authenticate")[0]}

    async def huge402(request):
        resp = web.StreamResponse(status=402)
        await resp.prepare(request)
        try:
            for _ in range(800):                     # up to 50 MB, unless the client hangs up
                await resp.write(b"x" * 65536)
                wrote["huge402"] += 65536
        except (ConnectionError, RuntimeError):
            pass
        return resp

    async def huge200(request):
        resp = web.StreamResponse()
        resp.content_length = 40 * 1024 * 1024
        await resp.prepare(request)
        try:
            for _ in range(640):
                await resp.write(b"y" * 65536)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    async def nested402(request):
        if request.headers.get("Authorization"):
            return web.Response(text="paid content")
        return web.Response(status=402, text="[" * 50_000, headers=await real_challenge())

    async def redirect(request):
        raise web.HTTPFound(sidecar.url + "/api/joke")

    async def text_wallet(request):
        return web.Response(text="ok, paid")

    app = web.Application()
    app.router.add_get("/huge402", huge402)
    app.router.add_get("/huge200", huge200)
    app.router.add_get("/nested402", nested402)
    app.router.add_get("/redirect", redirect)
    app.router.add_post("/textwallet/pay", text_wallet)
    runner, url = await serve_app(app)
    yield sidecar, url, wrote
    await runner.cleanup()


async def cli(*args, cwd):
    return await asyncio.to_thread(run_cli, *args, cwd=cwd)


def one_line_error(res, code=2):
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, res.stderr
    return errors[0]


async def wallet_balance(sidecar, name="default"):
    async with aiohttp.ClientSession() as s, s.get(f"{sidecar.url}/sandbox/wallets/{name}") as r:
        return (await r.json())["balance_msat"]


async def test_a_huge_402_body_is_not_read_into_memory(hostile, tmp_path):
    sidecar, url, wrote = hostile
    res = await cli("get", "--cache", "", f"{url}/huge402", cwd=tmp_path)
    assert res.returncode == 1 and "HTTP 402" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stdout) == 0            # a challenge body over 64 KiB is dropped, not printed
    assert wrote["huge402"] < 50 * 1024 * 1024


async def test_a_response_over_the_body_limit_is_refused(hostile, tmp_path):
    _, url, _ = hostile
    line = one_line_error(await cli("get", "--cache", "", f"{url}/huge200", cwd=tmp_path))
    assert "larger than 33554432 bytes" in line


async def test_a_deeply_nested_402_body_is_no_crash(hostile, tmp_path):
    sidecar, url, _ = hostile
    res = await cli("get", "--cache", "", "--wallet", f"{sidecar.url}/sandbox/wallets/n", f"{url}/nested402",
                    cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "paid content", res.stderr
    assert "Traceback" not in res.stderr


async def test_a_402_from_another_origin_after_a_redirect_is_not_paid(hostile, tmp_path):
    sidecar, url, _ = hostile
    before = await wallet_balance(sidecar, "r")
    line = one_line_error(await cli("get", "--cache", "", "--wallet", f"{sidecar.url}/sandbox/wallets/r",
                                    f"{url}/redirect", cwd=tmp_path))
    assert "after a redirect" in line and sidecar.url in line
    assert await wallet_balance(sidecar, "r") == before


async def test_a_wallet_that_answers_without_json(hostile, tmp_path):
    sidecar, url, _ = hostile
    line = one_line_error(await cli("get", "--cache", "", "--wallet", f"{url}/textwallet",
                                    f"{sidecar.url}/api/joke", cwd=tmp_path))
    assert "without JSON" in line


async def test_bad_urls_caches_and_budgets_are_one_line(hostile, tmp_path):
    sidecar, _, _ = hostile
    line = one_line_error(await cli("get", "--cache", "", "http://127.0.0.1:99999/x", cwd=tmp_path))
    assert "99999" in line
    cache = tmp_path / "client.json"
    cache.write_text("{not json")
    cache.chmod(0o600)
    line = one_line_error(await cli("get", "--cache", str(cache), f"{sidecar.url}/api/joke", cwd=tmp_path))
    assert "token cache is corrupt" in line
    res = await cli("get", "--max-msat", "-5", f"{sidecar.url}/api/joke", cwd=tmp_path)
    assert res.returncode == 2 and "non-negative integer" in res.stderr and "Traceback" not in res.stderr
    res = await cli("get", "--help", cwd=tmp_path)
    assert all(f"default {n}" in res.stdout for n in (10000, 100000, 1000000, 1000))


async def test_a_receipt_that_does_not_verify_under_the_pinned_key_exits_3(hostile, tmp_path):
    sidecar, _, _ = hostile
    other = "02" + "79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
    res = await cli("get", "--cache", "", "--receipt-pubkey", other, f"{sidecar.url}/api/joke", cwd=tmp_path)
    assert res.returncode == 3 and "does not verify" in res.stderr and "Traceback" not in res.stderr
    assert "joke" in json.loads(res.stdout)       # the answer is still printed
    async with aiohttp.ClientSession() as s, s.get(sidecar.url + "/.well-known/l402.json") as r:
        mine = (await r.json())["receipt_pubkey"]
    res = await cli("get", "--cache", "", "--receipt-pubkey", mine, f"{sidecar.url}/api/joke", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
