"""Gate throughput with a valid pass token vs a bare aiohttp handler (goal >= 0.90x).

    python bench/bench_gate.py [--seconds 5] [--rounds 3]

Both targets are separate processes serving the same handler; wrk (one thread, 32
keep-alive connections) drives each in turn, alternating, best round of each kept.
"""
from __future__ import annotations

import argparse

from common import Target, wrk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    bare, gated = Target("bare"), Target("gated")
    try:
        auth = gated.buy_pass()
        wrk(bare.url + "/pass", 1), wrk(gated.url + "/pass", 1, headers={"Authorization": auth})  # warm up
        b, g = [], []
        for _ in range(a.rounds):
            b.append(wrk(bare.url + "/pass", a.seconds))
            g.append(wrk(gated.url + "/pass", a.seconds, headers={"Authorization": auth}))
    finally:
        bare.stop()
        gated.stop()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print(f"bare aiohttp handler : {max(b):9.0f} req/s best, {med(b):.0f} median  (rounds: {', '.join(f'{x:.0f}' for x in b)})")
    print(f"gated, valid token   : {max(g):9.0f} req/s best, {med(g):.0f} median  (rounds: {', '.join(f'{x:.0f}' for x in g)})")
    print(f"ratio gated/bare     : {max(g) / max(b):9.3f}x best, {med(g) / med(b):.3f}x median   (goal >= 0.90x)")


if __name__ == "__main__":
    main()
