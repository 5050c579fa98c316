"""Payment sessions: bearer request throughput against a bare aiohttp handler (goal
>= 0.85x), and what spending one unit per SSE event adds to a streamed response.

    python bench/bench_session.py [--seconds 5] [--rounds 5] [--streams 20]

Throughput: wrk (one thread, pinned to CPU 1, 32 keep-alive connections) sends the same
request, the session's bearer credential included, to a bare handler and to the gated
one (both pinned to CPU 0), alternating rounds; every gated request spends one unit of
one session (a deposit of 1,000,000 units, in SQLite). The server's CPU per request is
read from /proc.

SSE: the same handler streams 2,000 events per response, bare and on a session route
where it charges the session before each event (as the reverse proxy does for an
upstream's events); one client reads `--streams` responses one after the other. The
per-event figure is the difference in server CPU per event.
"""
from __future__ import annotations

import argparse
import time
import urllib.request

from common import Target, alternate, median as med, rounds_line, wrk_run

SSE_EVENTS = 2000


def read_streams(target: Target, auth: str, n: int) -> tuple[float, float]:
    """(wall seconds, server CPU seconds) to read `n` /sse responses."""
    cpu, wall = target.cpu_seconds(), time.perf_counter()
    for _ in range(n):
        req = urllib.request.Request(target.url + "/sse", headers={"Authorization": auth})
        body = urllib.request.urlopen(req).read()
        if body.count(b"data:") != SSE_EVENTS:
            raise RuntimeError(f"a stream had {body.count(b'data:')} events, not {SSE_EVENTS}")
    return time.perf_counter() - wall, target.cpu_seconds() - cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--streams", type=int, default=20)
    a = ap.parse_args()
    bare, gated = Target("bare"), Target("gated")
    try:
        auth = gated.open_session("/sess")
        sse_auth = gated.open_session("/sse")
        wrk_run(bare.url + "/sess", 1, headers={"Authorization": auth})          # warm up
        wrk_run(gated.url + "/sess", 1, headers={"Authorization": auth})
        b, g, bcpu, gcpu = alternate(bare, gated, "/sess", a.seconds, a.rounds, {"Authorization": auth})
        read_streams(bare, sse_auth, 2), read_streams(gated, sse_auth, 2)         # warm up
        sb, sg = [], []
        for _ in range(3):
            sb.append(read_streams(bare, sse_auth, a.streams))
            sg.append(read_streams(gated, sse_auth, a.streams))
    finally:
        bare.stop()
        gated.stop()
    print(rounds_line("bare aiohttp handler ", b))
    print(rounds_line("session bearer       ", g))
    print(f"ratio bearer/bare     : {max(g) / max(b):9.3f}x best, {med(g) / med(b):.3f}x median   (goal >= 0.85x)")
    print(f"server CPU / request  : bare {min(bcpu):.1f} us, bearer {min(gcpu):.1f} us (least of the rounds) "
          f"-> CPU-bound ratio {min(bcpu) / min(gcpu):.3f}x")
    events = a.streams * SSE_EVENTS
    bare_cpu, gated_cpu = min(c for _, c in sb) / events * 1e6, min(c for _, c in sg) / events * 1e6
    bare_wall, gated_wall = min(w for w, _ in sb) / events * 1e6, min(w for w, _ in sg) / events * 1e6
    print(f"SSE, per event        : bare {bare_cpu:.2f} us CPU ({bare_wall:.2f} us wall), metered {gated_cpu:.2f} us "
          f"CPU ({gated_wall:.2f} us wall) -> {gated_cpu - bare_cpu:.2f} us added per event, "
          f"ratio {bare_cpu / gated_cpu:.3f}x")


if __name__ == "__main__":
    main()
