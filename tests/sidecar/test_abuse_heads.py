"""Request heads under abuse (issue 18, review of section 1): a request line and its
headers are bounded in total bytes (431 past `max_request_head_bytes`, so one address's
connections cannot hold megabytes each), an idle keep-alive connection is closed after
`keepalive_timeout_s`, and a next request's partial headers sent while a request is at
the upstream get the header deadline too. Bounded loads on 127.0.0.1 only."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aiohttp import web

from micropay.seller.config import Config
from micropay.sidecar.app import build_app, create_runtime, make_runner

from ..conftest import make_config, start_sidecar
from ..helpers_proc import ServerProcess, free_port

FIELD = b"a" * 64_000


def _status(answer: bytes) -> bytes:
    return answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.") else b""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> float | None:
    started = time.monotonic()
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), max(0.01, seconds - (time.monotonic() - started)))
            if not data:
                return time.monotonic() - started
    except asyncio.TimeoutError:
        return None
    except ConnectionError:
        return time.monotonic() - started


async def _big_head(port: int, fields: int, hold_s: float) -> tuple[bytes, bool]:
    """Send a request head of `fields` 64,000-byte headers, never ending it; returns what
    the server answered (b"" if nothing) and whether it closed the connection within
    `hold_s` (its 431 may be lost to the reset a close with unread bytes causes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.5", 0))
    got, closed = b"", False
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for k in range(fields):
            writer.write(b"X-H%d: " % k + FIELD + b"\r\n")
            await writer.drain()
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(4096), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if not data:
                closed = True
                break
            got += data
    except ConnectionError:
        closed = True
    finally:
        writer.close()
    return got, closed


async def test_50_connections_of_2_mib_heads_from_one_address_grow_rss_by_less_than_30_mb(tmp_path):
    (tmp_path / "heads.toml").write_text(f'demo = true\ndata_dir = "{tmp_path / "data"}"\n')
    port = free_port()
    server = await asyncio.to_thread(ServerProcess, ["serve", "--config", str(tmp_path / "heads.toml"),
                                                     "--listen", f"127.0.0.1:{port}"], tmp_path, port)
    try:
        before = rss_kib(server.proc.pid)
        peak = before
        tasks = [asyncio.create_task(_big_head(port, 32, 3.0)) for _ in range(50)]
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.1)
            peak = max(peak, rss_kib(server.proc.pid))
        results = await asyncio.gather(*tasks)
        answers = [a for a, _ in results]
        n431 = sum(_status(a) == b"431" for a in answers)
        print(f"RSS before {before / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
              f"growth {(peak - before) / 1024:.1f} MiB; "
              f"{n431} of 50 read a 431, {sum(c for _, c in results)} of 50 closed by the server")
        assert peak - before < 30 * 1024, f"RSS grew by {(peak - before) / 1024:.1f} MiB"
        assert all(closed for _, closed in results), "connections with oversized heads still open"
        assert n431 and all(_status(a) in (b"431", b"") for a in answers), answers[:3]
        assert server.proc.poll() is None
    finally:
        await asyncio.to_thread(server.stop)


async def test_a_head_over_max_request_head_bytes_gets_431_and_one_under_is_served(tmp_path):
    sc = await start_sidecar(make_config(tmp_path, 'demo = true\nmax_request_head_bytes = 4096\n'))
    try:
        for fields, size, status in [(3, 1000, b"200"), (5, 1000, b"431"), (1, 5000, b"431"), (60, 60, b"431")]:
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
            head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
                b"X-H%d: %s\r\n" % (k, b"b" * size) for k in range(fields)) + b"\r\n"
            writer.write(head)
            line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
            assert line.split()[1] == status, (fields, size, line)
            writer.close()
        # in pieces: counted across reads
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for k in range(10):
            writer.write(b"X-H%d: %s\r\n" % (k, b"c" * 500))
            await writer.drain()
            await asyncio.sleep(0.02)
        line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
        assert _status(line) == b"431", line
        writer.close()
    finally:
        await sc.runner.cleanup()


async def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout_s(tmp_path):
    sc = await start_sidecar(make_config(tmp_path, 'demo = true\nkeepalive_timeout_s = 1\n'))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 200")
        waited = await _closed_within(reader, 4.0)
        writer.close()
        assert waited is not None, "an idle keep-alive connection still open after 4 s (keepalive_timeout_s = 1)"
        print(f"idle keep-alive connection closed after {waited:.2f} s (keepalive_timeout_s = 1)")
    finally:
        await sc.runner.cleanup()


async def test_the_default_keepalive_timeout_is_75_s_not_aiohttps_3630(tmp_path):
    assert Config().keepalive_timeout_s == 75
    rt = await create_runtime(make_config(tmp_path, 'demo = true\n'))
    runner = make_runner(build_app(rt))
    await runner.setup()
    try:
        assert runner.server._kwargs["keepalive_timeout"] == 75
        handler = runner.server()
        assert handler.keepalive_timeout == 75
    finally:
        await runner.cleanup()


async def test_partial_headers_of_a_pipelined_request_during_a_slow_one_get_the_header_deadline(tmp_path):
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="slow")
    app = web.Application()
    app.router.add_get("/slow", slow)
    up = web.AppRunner(app)
    await up.setup()
    site = web.TCPSite(up, "127.0.0.1", 0)
    await site.start()
    up_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    sc = await start_sidecar(make_config(tmp_path, f'upstream = "http://127.0.0.1:{up_port}"\n'
                                                   'header_timeout_s = 1\n'))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: b\r\n")      # and then silence
        await writer.drain()
        started = time.monotonic()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head                      # the slow request is answered
        waited = await _closed_within(reader, 4.0)
        writer.close()
        assert waited is not None, "the connection with partial headers was still open 4 s after the response"
        print(f"closed {time.monotonic() - started:.2f} s after the partial headers were sent (header_timeout_s = 1)")
    finally:
        await sc.runner.cleanup()
        await up.cleanup()


def test_the_new_limits_are_read_from_the_file_and_checked(tmp_path):
    import pytest
    from micropay.core.errors import ConfigError
    cfg = make_config(tmp_path, 'keepalive_timeout_s = 5\nmax_request_head_bytes = 16384\n')
    assert (cfg.keepalive_timeout_s, cfg.max_request_head_bytes) == (5, 16384)
    for bad in ('max_request_head_bytes = 100', 'max_request_head_bytes = 2000000', 'keepalive_timeout_s = 0'):
        with pytest.raises(ConfigError):
            make_config(tmp_path, bad + "\n")
