"""A client that trickles its request headers is disconnected after header_timeout_s."""
import asyncio
import time

from ..conftest import make_config, start_sidecar


async def test_trickled_headers_are_cut_off_but_slow_bodies_and_idle_keepalive_are_not(tmp_path):
    sc = await start_sidecar(make_config(tmp_path, 'demo = true\nheader_timeout_s = 1\n'))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        closed_after = None
        for i in range(40):                       # a header line every 0.2 s, for at most 8 s
            await asyncio.sleep(0.2)
            if reader.at_eof():
                closed_after = time.monotonic() - started
                break
            try:
                writer.write(f"X-Slow-{i}: 1\r\n".encode())
                await writer.drain()
            except ConnectionError:
                closed_after = time.monotonic() - started
                break
            try:
                if await asyncio.wait_for(reader.read(1), 0.01) == b"":
                    closed_after = time.monotonic() - started
                    break
            except asyncio.TimeoutError:
                pass
        writer.close()
        assert closed_after is not None and 0.9 <= closed_after <= 3.0, closed_after

        # a whole request on a connection that then idles, and a second request: both served
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        for _ in range(2):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
            await reader.readexactly(length)
            await asyncio.sleep(1.5)               # idle longer than the header timeout
        writer.close()
    finally:
        await sc.runner.cleanup()
