"""Connections under abuse (issue 18, section 1): a silent connection is closed within
the header deadline counted from when it was made; one client address holds at most its
share of connections; a server whose open-files limit runs out keeps answering new
clients once the flood is gone, and logs the failed accepts once per interval, not once
per attempt. Every load here is bounded in count and time, on 127.0.0.1."""
from __future__ import annotations

import asyncio
import errno
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ..conftest import make_config, start_sidecar
from ..helpers_proc import free_port


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> float | None:
    """Seconds until the server closed the connection, or None if it did not in time."""
    started = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(1), seconds)
    except asyncio.TimeoutError:
        return None
    except ConnectionError:
        return time.monotonic() - started
    return time.monotonic() - started if data == b"" else None


async def test_200_silent_sockets_are_closed_within_the_header_timeout(tmp_path):
    sc = await start_sidecar(make_config(tmp_path, 'demo = true\nheader_timeout_s = 1\n'))
    conns = []
    try:
        for _ in range(200):
            conns.append(await asyncio.open_connection("127.0.0.1", sc.port))
        started = time.monotonic()
        waited = await asyncio.gather(*(_closed_within(r, 4.0) for r, _ in conns))
        assert all(w is not None for w in waited), f"{sum(w is None for w in waited)} of 200 still open after 4 s"
        assert time.monotonic() - started <= 3.5
        print(f"200 silent sockets closed after {min(waited):.2f}-{max(waited):.2f} s (header_timeout_s = 1)")
        # and a client that sends its request is served as before
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        for _, w in conns:
            w.close()
        await sc.runner.cleanup()


async def test_one_address_holds_at_most_its_share_of_connections(tmp_path):
    sc = await start_sidecar(make_config(tmp_path, 'demo = true\nmax_connections_per_client = 5\n'))
    held = []
    try:
        for _ in range(5):
            held.append(await asyncio.open_connection("127.0.0.1", sc.port, local_addr=("127.0.0.2", 0)))
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, local_addr=("127.0.0.2", 0))
        answer = await asyncio.wait_for(reader.read(), 5)       # answered and closed at once
        writer.close()
        assert answer.startswith(b"HTTP/1.1 429") and b"too_many_connections" in answer, answer
        # another address is served meanwhile
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, local_addr=("127.0.0.3", 0))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
        # once the first address lets go of one, it may connect again
        held.pop()[1].close()
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", sc.port, local_addr=("127.0.0.2", 0))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        for _, w in held:
            w.close()
        await sc.runner.cleanup()


def _low_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def _flood(port: int, n: int) -> list[socket.socket]:
    """`n` connections that never send a byte, from four other loopback addresses,
    opened without waiting (most never get accepted while descriptors are short)."""
    socks = []
    for i in range(n):
        s = socket.socket()
        s.bind((f"127.0.0.{2 + i % 4}", 0))
        s.setblocking(False)
        err = s.connect_ex(("127.0.0.1", port))
        assert err in (0, errno.EINPROGRESS, errno.EAGAIN), os.strerror(err)
        socks.append(s)
    return socks


@pytest.mark.parametrize("limits", ["", "max_connections = 100000\nmax_connections_per_client = 100000\n"],
                         ids=["default-limits", "no-connection-limit"])
def test_a_server_out_of_descriptors_answers_a_new_client_after_the_flood_with_a_bounded_log(tmp_path, limits):
    """`no-connection-limit`: nothing stops accepting before the open-files limit, so
    accept() fails with EMFILE over and over; `default-limits`: max_connections comes
    from that limit and connections past it are refused before it is reached."""
    port = free_port()
    cfg = tmp_path / "flood.toml"
    cfg.write_text(f'demo = true\nheader_timeout_s = 2\ndata_dir = "{tmp_path / "data"}"\n{limits}')
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "micropay.cli", "serve", "--config", str(cfg),
                                 "--listen", f"127.0.0.1:{port}"], cwd=tmp_path, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=_low_open_files,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    socks: list[socket.socket] = []
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        socks = _flood(port, 600)
        time.sleep(3)                                     # the flood goes on, past the open-files limit
        started, answered, last_error = time.monotonic(), None, None
        while time.monotonic() - started < 15:            # a fresh client, while the flood's sockets stay open
            try:
                with urllib.request.urlopen(url, timeout=3) as r:
                    answered = r.status
                break
            except OSError as exc:
                last_error = exc
                time.sleep(0.2)
        assert answered == 200, f"no answer in 15 s ({last_error})"
        print(f"[{limits or 'defaults'!r}] a fresh client answered {time.monotonic() - started:.2f} s after the flood")
        assert proc.poll() is None
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    lines = log_path.read_text(errors="replace").splitlines()
    print(f"{len(lines)} log lines in all")
    assert len(lines) < 60, "\n".join(lines[:80])
    assert not any("Traceback" in line for line in lines), "\n".join(lines[:80])
