"""Request bodies a client sends slowly, cuts off or trickles, on every endpoint that
reads one (review findings): micropay's own endpoints (sandbox wallets, the purchases
API) have the same body deadline as the gate and the proxy; a client gone mid-body costs
a bounded number of log lines; a streamed body holds an upstream connection for a
bounded time only."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest

from ..conftest import make_config, start_sidecar
from ..games_util import GAMES_TOML, start_game_sidecar
from ..rawhttp import RecordingUpstream


async def _trickled_status(port: int, path: str, headers: str = "", limit_s: float = 10.0) -> tuple[int, float]:
    """POST to `path` a body declared as 100 bytes and sent a byte every 0.3 s; (the
    response's status, seconds until it came). Bounded: `limit_s`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
                     "Content-Length: 100\r\n\r\n{".encode())

        async def trickle() -> None:
            for _ in range(int(limit_s / 0.3)):
                await asyncio.sleep(0.3)
                try:
                    writer.write(b" ")
                    await writer.drain()
                except ConnectionError:
                    return
        sender = asyncio.create_task(trickle())
        try:
            line = await asyncio.wait_for(reader.readline(), limit_s)
        finally:
            sender.cancel()
        return int(line.split()[1]) if line else 0, time.monotonic() - started
    finally:
        writer.close()


async def test_a_trickled_body_to_the_sandbox_pay_endpoint_gets_408_within_body_timeout_s(tmp_path):
    sc = await start_sidecar(make_config(tmp_path, "body_timeout_s = 1\n"))
    try:
        status, took = await _trickled_status(sc.port, "/sandbox/wallets/x/pay")
        print(f"sandbox pay, trickled body: {status} after {took:.1f} s")
        assert status == 408 and took < 3
    finally:
        await sc.runner.cleanup()


async def test_a_trickled_body_to_the_purchases_api_gets_408_within_body_timeout_s(tmp_path):
    gs = await start_game_sidecar(tmp_path, "body_timeout_s = 1\n" + GAMES_TOML)
    try:
        status, took = await _trickled_status(gs.sc.port, "/v1/purchases", f"Authorization: Bearer {gs.key}\r\n")
        print(f"purchases API, trickled body: {status} after {took:.1f} s")
        assert status == 408 and took < 3
    finally:
        await gs.close()


UPLOAD_ROUTE = '''
[[routes]]
method = ["POST"]
path = "/api/upload"
price_msat = 3000
'''


async def _cut_off(port: int, path: str) -> None:
    """A POST that declares 100 bytes, sends 3 and resets the connection."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc".encode())
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()
    except ConnectionError:
        pass


class _Lines(logging.Handler):
    """Counts the lines the log would get (a traceback is many), access log aside."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines, self.access = 0, 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.endswith("access"):
            self.access += 1
        else:
            self.lines += len(self.format(record).splitlines())


@pytest.mark.parametrize("path", ["/api/upload", "/free-upload", "/sandbox/wallets/x/pay"])
async def test_200_bodies_cut_off_mid_way_write_a_bounded_number_of_log_lines(tmp_path, path):
    """The gate (a priced POST: it binds the body), the proxy (a free one) and an own
    endpoint read the body; the client resets the connection in the middle of it."""
    from micropay.sidecar.limits import flush_throttled_logs
    up = await RecordingUpstream().start()
    sc = await start_sidecar(make_config(tmp_path, f'service = "cut"\nupstream = "{up.url}"\n{UPLOAD_ROUTE}'))
    lines, root = _Lines(), logging.getLogger()
    root.addHandler(lines)
    level, root.level = root.level, logging.INFO
    try:
        sem = asyncio.Semaphore(50)

        async def one() -> None:
            async with sem:
                await _cut_off(sc.port, path)
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(200))), 30)
        await asyncio.sleep(0.5)
        flush_throttled_logs()
        print(f"{path}: 200 bodies cut off -> {lines.lines} log lines (and {lines.access} access lines)")
        assert lines.lines <= 10
        assert lines.access <= 200
        assert not up.seen                          # no cut-off body reached the upstream
    finally:
        root.removeHandler(lines)
        root.level = level
        await sc.runner.cleanup()
        await up.runner.cleanup()
