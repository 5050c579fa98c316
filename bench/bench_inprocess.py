"""CPU the gate adds to a first-seen paid request, measured without sockets or wrk: raw
HTTP bytes go straight into aiohttp's protocol over an in-memory transport, in this one
process, against the same requests on a bare aiohttp handler.

    python bench/bench_inprocess.py [--n 10000] [--rounds 3] [--turns] [--calls]

bench_paid.py measures the same paths over real sockets, and on a shared 2-vCPU host its
rounds wander by 20-40%: the kernel's and wrk's share moves with the host. Here the bare
and the gated app take turns in chunks of 256 requests, so drift hits both alike, and
what is left is Python and SQLite work. Read the added/bare ratio first: it moves less
than the microseconds when the host's speed changes.

Each round mints `n` 402s on `bench/_server.py`'s stub route (16 connections at a time,
as bench_paid's wrk), pays them with the stub's preimages, and sends each credential
once: L402 on /mint (a one-credit token: verify, debit, receipt), L402 on /pass (verify,
a pass receipt signed once) and a Payment charge on /mint (verify, consume). Every
answer must be 200. `--turns` also counts, per paid request, the event loop's turns
and the callbacks it ran (fewer waits inside the gate show up here exactly); `--calls`
the function calls the gate adds per request (cProfile), a count the host's speed does
not move.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
import tomllib
from pathlib import Path

from aiohttp import web

import _server

from micropay.l402.macaroon import Macaroon
from micropay.l402.tokens import decode_identifier
from micropay.l402.wire import format_authorization, parse_challenges
from micropay.payment import scheme as pa

CONNECTIONS = 16
CHUNK = 256
CALLS_N = 1024          # requests per handler counted by --calls


class _Transport(asyncio.Transport):
    """What aiohttp's protocol writes to: the bytes go to the connection's buffer."""

    def __init__(self, conn: "_Connection") -> None:
        super().__init__()
        self._conn, self._closing = conn, False

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def write(self, data) -> None:
        self._conn.received(data)

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self._conn.received(chunk)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    abort = close

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return True


class _Connection:
    """One keep-alive client connection: a request's bytes in, its whole response out."""

    def __init__(self, server) -> None:
        self.protocol = server()
        self.protocol.connection_made(_Transport(self))
        self.buffer = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None

    def received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None and not self.waiter.done() and self._complete():
            self.waiter.set_result(bytes(self.buffer))

    def _complete(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        length = int(head[at + 17:].split(b"\r\n", 1)[0]) if at >= 0 else 0
        return len(self.buffer) >= end + 4 + length

    async def request(self, raw: bytes) -> bytes:
        self.buffer = bytearray()
        self.waiter = asyncio.get_running_loop().create_future()
        self.protocol.data_received(raw)
        return await self.waiter


def _raw(path: str, headers: dict[str, str]) -> bytes:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{lines}\r\n".encode()


def _status(response: bytes) -> int:
    return int(response[9:12])


def _challenge_values(response: bytes) -> list[str]:
    head = response[:response.find(b"\r\n\r\n")].decode().split("\r\n")[1:]
    return [line.split(":", 1)[1].strip() for line in head if line.lower().startswith("www-authenticate:")]


async def _drive(conns: list[_Connection], requests: list[bytes]) -> tuple[float, list[bytes]]:
    """Every connection sends its share one after another, all at once: process CPU
    microseconds per request, and the responses."""
    out: list[bytes] = [b""] * len(requests)

    async def one(k: int) -> None:
        for i in range(k, len(requests), len(conns)):
            out[i] = await conns[k].request(requests[i])
    start = time.process_time()
    await asyncio.gather(*(one(k) for k in range(len(conns))))
    return (time.process_time() - start) / len(requests) * 1e6, out


async def _calls(conns: list[_Connection], requests: list[bytes], expect: int, after=None) -> tuple[float, float]:
    """Function calls per request while serving `requests` in chunks (cProfile): Python
    functions (a coroutine counts once per resumption), and all calls with C functions.
    The host's speed does not move these counts, so on a noisy host they show what a change
    to the code removed where the CPU times cannot. The driver's own calls are in every
    handler's count alike. `after`: awaited after each chunk, counted too (work a handler
    leaves behind it). Every answer must have the status `expect`."""
    import cProfile
    import pstats
    profile = cProfile.Profile()
    profile.enable()
    try:
        answers = []
        for start in range(0, len(requests), CHUNK):
            answers += (await _drive(conns, requests[start:start + CHUNK]))[1]
            if after is not None:
                await after()
    finally:
        profile.disable()
    refused = [a[:12] for a in answers if _status(a) != expect]
    assert not refused, f"{len(refused)} counted answers were not {expect}, e.g. {refused[0]!r}"
    stats = pstats.Stats(profile).stats          # type: ignore[attr-defined]
    python = sum(v[1] for k, v in stats.items() if k[0] != "~")
    return python / len(requests), sum(v[1] for v in stats.values()) / len(requests)


class _TurnCounter:
    """Counts the loop's turns and the callbacks it ran while enabled."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.turns = self.callbacks = 0
        self.on = False
        run_once, counter = loop._run_once, self       # type: ignore[attr-defined]

        def counted() -> None:
            if counter.on:
                counter.turns += 1
                counter.callbacks += len(loop._ready)     # type: ignore[attr-defined]
            run_once()
        loop._run_once = counted                          # type: ignore[attr-defined]


async def _gated_runner() -> tuple[web.AppRunner, _server.StubNode]:
    from micropay.seller.configfile import parse_config
    from micropay.sidecar.app import build_app, create_runtime
    from micropay.sidecar.server import settle_heap
    cfg = parse_config(tomllib.loads(_server.BENCH_CONFIG), "bench").with_overrides(
        data_dir=Path(tempfile.mkdtemp(prefix="micropay-bench-")), trust_forwarded_for=True, store_url=None)
    stub = _server.StubNode()
    rt = await create_runtime(cfg, node=stub)
    rt.extra_routes += [("GET", "/pass", _server.payload), ("GET", "/mint", _server.payload)]
    runner = web.AppRunner(build_app(rt), access_log=None)
    await runner.setup()
    settle_heap()
    return runner, stub


async def _credentials(conns: list[_Connection], stub: _server.StubNode, path: str, kind: str, n: int,
                       tag: str) -> list[bytes]:
    _, answers = await _drive(conns, [_raw(path, {"X-Forwarded-For": f"10.{tag}.{i // 256 % 256}.{i % 256}"})
                                      for i in range(n)])
    preimages, stub.preimages = stub.preimages, {}
    out = []
    for answer in answers:
        assert _status(answer) == 402, answer[:200]
        values = _challenge_values(answer)
        if kind == "payment":
            ch = next(c for c in pa.parse_challenges(values) if c.intent == "charge")
            cred = pa.format_credential(ch, preimages[pa.decode_request(ch)["methodDetails"]["paymentHash"]])
        else:
            ch = parse_challenges(values)[0]
            payment_hash, _ = decode_identifier(Macaroon.deserialize(ch.macaroon).identifier)
            cred = format_authorization(ch.macaroon, preimages[payment_hash.hex()])
        out.append(_raw(path, {"Authorization": cred}))
    return out


async def main(n: int, rounds: int, turns: bool, calls: bool = False) -> None:
    runner, stub = await _gated_runner()
    cases = {"L402, pay per request": ("/mint", "l402"), "L402 pass, first request": ("/pass", "l402"),
             "Payment charge": ("/mint", "payment")}
    bare_app = web.Application()
    for path in ("/mint", "/pass"):
        bare_app.router.add_get(path, _server.payload)
    bare_runner = web.AppRunner(bare_app, access_log=None)
    await bare_runner.setup()
    gated = [_Connection(runner.server) for _ in range(CONNECTIONS)]
    bare = [_Connection(bare_runner.server) for _ in range(CONNECTIONS)]
    counter = _TurnCounter(asyncio.get_running_loop()) if turns else None
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    counts: dict[str, tuple[float, float]] = {}
    for r in range(rounds):
        for name, (path, kind) in cases.items():
            requests = await _credentials(gated, stub, path, kind, n, str(r * 3 + len(results[name]) % 3))
            await asyncio.sleep(0.5)           # the 402s' records are written behind them
            gc.collect()
            b_us = g_us = 0.0
            if counter is not None:
                counter.turns = counter.callbacks = 0
            for start in range(0, n, CHUNK):
                chunk = requests[start:start + CHUNK]
                us, _ = await _drive(bare, chunk)
                b_us += us * len(chunk)
                if counter is not None:
                    counter.on = True
                us, answers = await _drive(gated, chunk)
                if counter is not None:
                    counter.on = False
                g_us += us * len(chunk)
                refused = [a[:12] for a in answers if _status(a) != 200]
                assert not refused, f"{name}: {len(refused)} answers were not 200, e.g. {refused[0]!r}"
            results[name].append((b_us / n, g_us / n))
            if counter is not None:
                counts[name] = (counter.turns / n, counter.callbacks / n)
    for name, rows in results.items():
        ratios = [(g - b) / b for b, g in rows]
        mid = sorted(range(len(rows)), key=lambda i: ratios[i])[len(rows) // 2]
        b, g = rows[mid]
        line = (f"{name:26}: gate adds {g - b:6.1f} us ({statistics.median(ratios):.2f}x bare; bare {b:5.1f} us, "
                f"gated {g:6.1f} us; added/bare by round: {', '.join(f'{x:.2f}' for x in ratios)})")
        if name in counts:
            line += f"  loop turns {counts[name][0]:.3f}, callbacks {counts[name][1]:.2f} per request"
        print(line)
    print(f"(median round of {rounds}, {n} first-seen credentials each, {CONNECTIONS} connections, no sockets)")
    if calls:
        for name, (path, kind) in cases.items():
            requests = await _credentials(gated, stub, path, kind, CALLS_N, "250")
            await asyncio.sleep(0.5)
            b_py, b_all = await _calls(bare, requests, 200)
            g_py, g_all = await _calls(gated, requests, 200)
            print(f"{name:26}: gate adds {g_py - b_py:6.1f} Python calls per request ({g_all - b_all:6.1f} with C "
                  f"calls; bare {b_py:.1f} / {b_all:.1f})")
    await runner.cleanup()
    await bare_runner.cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--turns", action="store_true", help="count the loop's turns and callbacks per request")
    ap.add_argument("--calls", action="store_true", help="also count the function calls the gate adds per request")
    a = ap.parse_args()
    asyncio.run(main(a.n, a.rounds, a.turns, a.calls))
