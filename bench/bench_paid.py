"""CPU the gate adds to a paid request whose credential it has never seen, over a bare
aiohttp handler in the same run (issue 20's goals: first-seen L402 <= 50 us, Payment
charge <= 70 us).

    python bench/bench_paid.py [--seconds 3] [--rounds 3] [--n 20000]

Targets are separate processes pinned to CPU 0 (wrk on CPU 1), as in bench_gate.py:
`bare` serves the handler with no gate; `stub` is the gate on a node that hands back a
ready invoice and tells the bench its preimage, so the bench can pay without a node.
Before each measured run, the bench asks the stub for `n` fresh 402s and builds one
paid credential from each; wrk sends each credential exactly once (a Lua script walks
the list), so every request is a credential the gate has never seen:

- L402, pay per request (`/mint`, credits 1): verify the macaroon and preimage, debit
  the token's one credit in the store, sign the receipt, serve;
- L402, pass token, first request (`/pass`): verify, sign the pass receipt, cache it;
- Payment charge (`/mint`): parse and verify the credential, consume it in the store.

The bare target gets the same requests (same script, same Authorization headers), so
the difference is the gate's work, not request parsing. Server CPU per request comes
from /proc over the run; any answer that is not 2xx is reported (it would mean a
credential was refused and the run measured 402s instead).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import urllib.request

import aiohttp

from common import Target, wrk_stats

from micropay.l402.macaroon import Macaroon
from micropay.l402.tokens import decode_identifier
from micropay.l402.wire import format_authorization, parse_challenges
from micropay.payment import scheme as pa

WALK_LUA = """
local headers = {}
for line in io.lines("%s") do headers[#headers + 1] = line end
local i = 0
request = function()
  i = i + 1
  if i > #headers then i = 1 end        -- only when the list ran out: a reused credential, counted as non-2xx
  wrk.headers["Authorization"] = headers[i]
  return wrk.format(nil, "%s")
end
"""


async def mint(url: str, path: str, n: int, kind: str) -> list[str]:
    """n fresh challenges on `path`, each made into a paid credential of `kind`."""
    prefix = os.urandom(4).hex()
    challenges: list = []

    async def one(http: aiohttp.ClientSession, i: int) -> None:
        async with http.get(url + path, headers={"X-Forwarded-For": f"mint-{prefix}-{i}"}) as r:
            assert r.status == 402, r.status
            values = r.headers.getall("WWW-Authenticate")
        if kind == "payment":
            challenges.append(next(c for c in pa.parse_challenges(values) if c.intent == "charge"))
        else:
            challenges.append(parse_challenges(values)[0])

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as http:
        for start in range(0, n, 256):
            await asyncio.gather(*(one(http, i) for i in range(start, min(n, start + 256))))
    preimages = json.loads(urllib.request.urlopen(url + "/stub/preimages").read())
    out = []
    for ch in challenges:
        if kind == "payment":
            out.append(pa.format_credential(ch, preimages[pa.decode_request(ch)["methodDetails"]["paymentHash"]]))
        else:
            payment_hash, _ = decode_identifier(Macaroon.deserialize(ch.macaroon).identifier)
            out.append(format_authorization(ch.macaroon, preimages[payment_hash.hex()]))
    return out


def walk_script(headers: list[str], path: str) -> str:
    hfile = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    hfile.write("\n".join(headers) + "\n")
    hfile.close()
    lua = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    lua.write(WALK_LUA % (hfile.name, path))
    lua.close()
    return lua.name


def quiet(target: Target, timeout_s: float = 30.0) -> None:
    """Wait until the target is idle (it writes the minted challenges' records behind the
    402s), so the measured run counts only the paid requests' CPU."""
    import time
    deadline = time.monotonic() + timeout_s
    last = target.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = target.cpu_seconds()
        if now - last < 0.01:
            return
        last = now


def run(target: Target, path: str, seconds: int, script: str) -> tuple[float, float, int]:
    quiet(target)
    before = target.cpu_seconds()
    stats = wrk_stats(target.url + path, seconds, connections=16, script=script)
    cpu_us = (target.cpu_seconds() - before) / max(stats["total"], 1) * 1e6
    return stats["rate"], cpu_us, stats["non2xx"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=20000, help="credentials minted per measured run")
    a = ap.parse_args()
    bare, stub = Target("bare"), Target("stub")
    cases = {"L402, pay per request": ("/mint", "l402"), "L402 pass, first request": ("/pass", "l402"),
             "Payment charge": ("/mint", "payment")}
    results: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name in cases}
    try:
        for _ in range(a.rounds):
            for name, (path, kind) in cases.items():
                headers = asyncio.run(mint(stub.url, path, a.n, kind))
                script = walk_script(headers, path)
                b_rate, b_cpu, _ = run(bare, path, a.seconds, script)
                g_rate, g_cpu, refused = run(stub, path, a.seconds, script)
                results[name].append((b_cpu, g_cpu, g_rate, refused))
    finally:
        bare.stop()
        stub.stop()
    goals = {"L402, pay per request": 50, "L402 pass, first request": 50, "Payment charge": 70}
    for name, rows in results.items():
        added = [g - b for b, g, _, _ in rows]
        best = min(range(len(rows)), key=lambda i: added[i])
        b_cpu, g_cpu, g_rate, refused = rows[best]
        print(f"{name:26}: gate adds {added[best]:6.1f} us CPU per request (bare {b_cpu:5.1f} us, gated "
              f"{g_cpu:5.1f} us, {g_rate:6.0f} req/s; rounds: {', '.join(f'{x:.1f}' for x in added)})"
              f"  goal <= {goals[name]} us{'' if not refused else f'  [{refused} not 2xx!]'}")
    print(f"(least added CPU of {a.rounds} rounds of {a.seconds} s; every request a credential never seen before)")


if __name__ == "__main__":
    main()
