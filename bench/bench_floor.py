"""How far a fleet 402 is from what CPython on aiohttp can do: four handlers in this one
process, without sockets (bench_inprocess.py's driver: raw HTTP bytes into aiohttp's
protocol over an in-memory transport, 16 connections, the four taking turns in chunks
of 256 requests, process CPU time with every thread counted).

    python bench/bench_floor.py [--n 4000] [--rounds 3] [--calls]

- `bare 402`: bench/_server.py's static 402 (a body of the same size, a few headers):
  the baseline, as in bench_challenge.py.
- `canned`: the bytes of one real fleet 402 (its three WWW-Authenticate headers, its
  body), served as they are: what the 402's size costs aiohttp.
- `flat`: the same content computed anew in one handler with as few Python calls as it
  can be written with: a pooled invoice popped from a deque, a token id, the token's
  root key and macaroon chain (HMAC-SHA256 over the same caveats), both L402 headers,
  the Payment charge (its request, opaque and id) and the JSON body, with no admission,
  no record written and no store: the least a CPython handler pays for the content.
- `fleet`: the sidecar in fleet mode on SQLite, its pool filled beforehand
  (bench/_server.py `fill_pool`), every 402 for a client never seen before. Its chunk
  is timed until its records are written and the store's worker is idle, so that what
  it leaves behind its 402s is counted with them and not with the next handler's chunk.

What the gate adds above `flat` is its structure and its store: admission (rate bucket,
unpaid bounds), the reserve, the record and its writer, the calls between the layers.
Issue 20's goal for a fleet 402 on SQLite is 60 us over the bare 402.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import gc
import hashlib
import hmac
import os
import statistics
import tempfile
import time
import tomllib
from pathlib import Path

from aiohttp import web

import _server
from bench_inprocess import CALLS_N, CHUNK, CONNECTIONS, _calls, _Connection, _drive, _raw, _status


async def _fleet_runner(pool: int):
    from micropay.seller.configfile import parse_config
    from micropay.sidecar.app import build_app, create_runtime
    from micropay.sidecar.server import settle_heap
    text = _server.BENCH_CONFIG + '[backend]\nkind = "fleet"\npool_depth = 0\nask_timeout_s = 1\n'
    cfg = parse_config(tomllib.loads(text), "bench").with_overrides(
        data_dir=Path(tempfile.mkdtemp(prefix="micropay-bench-")), trust_forwarded_for=True, store_url=None)
    rt = await create_runtime(cfg)
    await _server.fill_pool(rt.store, pool)
    rt.extra_routes.append(("GET", "/mint", _server.payload))
    runner = web.AppRunner(build_app(rt), access_log=None)
    await runner.setup()
    settle_heap()
    return runner, rt


async def _settled(rt) -> None:
    """Wait until the fleet gate's work behind its 402s is done (the records written, the
    store's worker idle), so that its CPU is counted with its own chunk, not the next
    handler's (process CPU time counts every thread)."""
    await rt.gate.challenger.writer.flush()
    while rt.store._jobs:                       # a reserve top-up or a read on the worker
        await asyncio.sleep(0.001)


def _canned(response: bytes):
    """A handler answering with this response's status line, headers (those aiohttp does
    not write itself) and body."""
    head, body = response.split(b"\r\n\r\n", 1)
    fields = [tuple(line.split(": ", 1)) for line in head.decode().split("\r\n")[1:]]
    own = {"content-length", "content-type", "date", "server"}
    kept = [(k, v) for k, v in fields if k.lower() not in own]
    content_type = next(v for k, v in fields if k.lower() == "content-type").split(";")[0]

    async def canned(request: web.Request) -> web.Response:
        out = web.Response(status=402, body=body, content_type=content_type)
        for k, v in kept:
            out.headers.add(k, v)
        return out
    return canned


def _flat(n: int):
    """The fleet 402's content, computed per request in one function."""
    pool = collections.deque((_server.StubNode.BOLT11, hashlib.sha256(b"flat-%d" % i).hexdigest())
                             for i in range(n))
    root, bind_key, kid = os.urandom(32), os.urandom(32), "0"
    location = ("micropay:" + kid).encode()
    caveats = (b"services=bench:0", b"path=/mint", b"method=GET", b"credits=1")
    digest = hmac.digest
    records = collections.deque(maxlen=100_000)

    async def flat(request: web.Request) -> web.Response:
        bolt11, payment_hash = pool.popleft()
        now = int(time.time())
        expires_at = now + 3600
        token_id = (time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(26)
        identifier = b"\x00\x00" + bytes.fromhex(payment_hash) + token_id
        sig = digest(digest(b"macaroons-key-generator", digest(root, token_id, "sha256"), "sha256"),
                     identifier, "sha256")
        for caveat in caveats:
            sig = digest(sig, caveat, "sha256")
        mac = b"".join((b"\x02\x01", bytes((len(location),)), location, b"\x02", bytes((len(identifier),)),
                        identifier, b"\x00", *[b"\x02" + bytes((len(c),)) + c + b"\x00" for c in caveats],
                        b"\x00\x06\x20", sig))
        mac_b64 = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        charge = base64.urlsafe_b64encode(
            f'{{"amount":"1","currency":"sat","description":"bench: GET /mint","methodDetails":'
            f'{{"invoice":"{bolt11}","network":"regtest","paymentHash":"{payment_hash}"}}}}'.encode()
        ).rstrip(b"=").decode()
        opaque = base64.urlsafe_b64encode(
            f'{{"hash":"{payment_hash}","msat":"1000","route":"GET /mint","token":"{token_id.hex()}"}}'.encode()
        ).rstrip(b"=").decode()
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
        cid = base64.urlsafe_b64encode(digest(bind_key, f"bench|lightning|charge|{charge}|{expires}||{opaque}"
                                              .encode(), "sha256")).rstrip(b"=").decode()
        body = (f'{{"type": "https://micropay.dev/errors/payment_required", "title": "Payment Required", '
                f'"status": 402, "error": "payment_required", "detail": "Pay the invoice (1000 msat) and retry '
                f'with \'Authorization: L402 <macaroon>:<preimage hex>\'.", "resource": "GET /mint", '
                f'"price_msat": 1000, "invoice": "{bolt11}", "payment_hash": "{payment_hash}", '
                f'"expires_at": {expires_at}, "macaroon": "{mac_b64}", "credits": 1, "valid_until": null, '
                f'"description": "", "how_to_pay": {{"scheme": "L402", "network": "lightning", '
                f'"authorization": "L402 <macaroon>:<preimage hex>", '
                f'"spec": "https://github.com/lightning/blips/blob/master/blip-0026.md"}}}}')
        records.append((payment_hash, token_id, request.headers.get("X-Forwarded-For"), now))
        out = web.Response(status=402, text=body, content_type="application/problem+json",
                           headers={"Cache-Control": "no-store"})
        out.headers.add("WWW-Authenticate", f'L402 version="0", token="{mac_b64}", macaroon="{mac_b64}", '
                                            f'invoice="{bolt11}"')
        out.headers.add("WWW-Authenticate", f'LSAT macaroon="{mac_b64}", invoice="{bolt11}"')
        out.headers.add("WWW-Authenticate", f'Payment id="{cid}", realm="bench", method="lightning", '
                                            f'intent="charge", request="{charge}", expires="{expires}", '
                                            f'opaque="{opaque}"')
        return out
    return flat


async def main(n: int, rounds: int, calls: bool = False) -> None:
    fleet_runner, rt = await _fleet_runner(n * (rounds + 1) + 1000 + CALLS_N)
    fleet = [_Connection(fleet_runner.server) for _ in range(CONNECTIONS)]
    _, (sample,) = await _drive(fleet, [_raw("/mint", {"X-Forwarded-For": "192.0.2.1"})])
    assert _status(sample) == 402, sample[:300]
    app = web.Application()
    app.router.add_get("/bare402", _server.bare_402)
    app.router.add_get("/canned", _canned(sample))
    app.router.add_get("/flat", _flat(n * (rounds + 1) + 1000 + CALLS_N))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    conns = [_Connection(runner.server) for _ in range(CONNECTIONS)]
    sizes = {"fleet": len(sample)}
    for name in ("bare402", "canned", "flat"):
        _, (one,) = await _drive(conns, [_raw(f"/{name}", {"X-Forwarded-For": "192.0.2.2"})])
        assert _status(one) == 402, one[:300]
        sizes[name] = len(one)
    names = ("bare402", "canned", "flat", "fleet")
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        clients = [{"X-Forwarded-For": f"10.{r + 1}.{i // 256 % 256}.{i % 256}"} for i in range(n)]
        gc.collect()
        spent = dict.fromkeys(names, 0.0)
        for start in range(0, n, CHUNK):
            chunk = clients[start:start + CHUNK]
            for name in names:
                path = "/mint" if name == "fleet" else f"/{name}"
                started = time.process_time()
                _, answers = await _drive(fleet if name == "fleet" else conns, [_raw(path, h) for h in chunk])
                if name == "fleet":
                    await _settled(rt)
                spent[name] += (time.process_time() - started) * 1e6
                assert all(_status(a) == 402 for a in answers), f"{name}: {answers[0][:200]!r}"
        for name in names:
            results[name].append(spent[name] / n)
    bare = statistics.median(results["bare402"])
    labels = {"bare402": "bare 402 (baseline)", "canned": "canned: a fleet 402's bytes",
              "flat": "flat: the same content, computed", "fleet": "fleet gate, pool, SQLite"}
    for name in names:
        cpu = statistics.median(results[name])
        print(f"{labels[name]:34}: {cpu:6.1f} us CPU  adds {cpu - bare:6.1f} us  ratio {cpu / bare:5.2f}x bare  "
              f"({sizes[name]} bytes; rounds: {', '.join(f'{x:.1f}' for x in results[name])})")
    print(f"(median of {rounds} rounds of {n} 402s each, {CONNECTIONS} connections, no sockets; "
          "issue 20's goal: a fleet 402 on SQLite adds <= 60 us)")
    if calls:
        clients = [{"X-Forwarded-For": f"10.250.{i // 256 % 256}.{i % 256}"} for i in range(CALLS_N)]
        counted = {}
        for name in names:
            path = "/mint" if name == "fleet" else f"/{name}"
            counted[name] = await _calls(fleet if name == "fleet" else conns, [_raw(path, h) for h in clients], 402,
                                         after=(lambda: _settled(rt)) if name == "fleet" else None)
        for name in names:
            py, every = counted[name]
            print(f"{labels[name]:34}: {py:6.1f} Python calls per 402 (adds {py - counted['bare402'][0]:6.1f}), "
                  f"{every:6.1f} with C calls (adds {every - counted['bare402'][1]:6.1f})")
    await runner.cleanup()
    await fleet_runner.cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", action="store_true", help="also count the function calls per 402 (cProfile)")
    args = ap.parse_args()
    asyncio.run(main(args.n, args.rounds, args.calls))
