"""Large lightningd replies through ClnRpc (goal: an 8 MB reply in under 0.3 s).

    python bench/bench_rpc_reader.py

A fake lightningd on a unix socket answers one call with a listinvoices-like reply of
1, 4 and 8 MB, written in 64 KiB pieces. Measured: from the call to its parsed result.
Baseline in the same run: reading the same bytes from the same socket and json.loads
on the whole, the least any client must do.
"""
from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))
from micropay.lightning.cln import ClnRpc  # noqa: E402


def reply_of(size: int, req_id: int) -> bytes:
    one = {"label": "x", "bolt11": "lnbcrt" + "q" * 300, "description": "ü" * 40, "status": "paid"}
    n = size // len(json.dumps(one, ensure_ascii=False).encode())
    doc = {"jsonrpc": "2.0", "id": req_id, "result": {"invoices": [dict(one, label=f"l{i}") for i in range(n)]}}
    return (json.dumps(doc, ensure_ascii=False) + "\n\n").encode()


async def serve(path: str, payload_for):
    async def handle(reader, writer):
        try:
            await answer(reader, writer)
        except (asyncio.CancelledError, ConnectionError):
            pass

    async def answer(reader, writer):
        data = b""
        while True:
            chunk = await reader.read(4096)
            if not chunk:
                return
            data += chunk
            try:
                req = json.loads(data)
            except ValueError:
                continue
            data = b""
            body = payload_for(req.get("id", 0))
            for i in range(0, len(body), 65536):
                writer.write(body[i:i + 65536])
            await writer.drain()
    return await asyncio.start_unix_server(handle, path)


async def run(size: int, rounds: int = 3) -> tuple[float, float]:
    path = str(Path(tempfile.mkdtemp()) / "rpc")
    cache: dict[int, bytes] = {}
    server = await serve(path, lambda i: cache.setdefault(i, reply_of(size, i)))
    ours, base = [], []
    rpc = ClnRpc(path)
    for r in range(rounds):
        reply_of(size, r + 1)  # warm
        t0 = time.perf_counter()
        await rpc.call("listinvoices", {})
        ours.append(time.perf_counter() - t0)
    await rpc.close()
    for _ in range(rounds):
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 26)
        t0 = time.perf_counter()
        writer.write(json.dumps({"id": 999, "method": "x"}).encode())
        raw = await reader.readuntil(b"\n\n")
        json.loads(raw)
        base.append(time.perf_counter() - t0)
        writer.close()
    server.close()
    return min(ours), min(base)


async def main() -> None:
    for mb in (1, 4, 8):
        ours, base = await run(mb * 1_000_000)
        print(f"{mb} MB reply: ClnRpc {ours * 1000:.0f} ms, baseline (read + json.loads) {base * 1000:.0f} ms, "
              f"ratio {ours / base:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
