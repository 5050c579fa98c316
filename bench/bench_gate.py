"""Gate throughput with a valid pass token vs a bare aiohttp handler (goal >= 0.90x).

    python bench/bench_gate.py [--seconds 5] [--rounds 3]

Both targets are separate processes (pinned to CPU 0) serving the same handler; wrk
(one thread, pinned to CPU 1, 32 keep-alive connections) sends both the same request,
Authorization header included, alternating rounds. Best and median rounds are shown.
"""
from __future__ import annotations

import argparse

from common import Target, alternate, median as med, rounds_line, wrk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    bare, gated = Target("bare"), Target("gated")
    try:
        auth = gated.buy_pass()
        wrk(bare.url + "/pass", 1), wrk(gated.url + "/pass", 1, headers={"Authorization": auth})  # warm up
        # The same request (Authorization header included) to both, so the ratio is the
        # gate's cost, not the cost of parsing a larger request.
        b, g, bcpu, gcpu = alternate(bare, gated, "/pass", a.seconds, a.rounds, {"Authorization": auth})
    finally:
        bare.stop()
        gated.stop()
    print(rounds_line("bare aiohttp handler", b))
    print(rounds_line("gated, valid token  ", g))
    print(f"ratio gated/bare     : {max(g) / max(b):9.3f}x best, {med(g) / med(b):.3f}x median   (goal >= 0.90x)")
    print(f"server CPU / request : bare {min(bcpu):.1f} us, gated {min(gcpu):.1f} us (least of the rounds) "
          f"-> CPU-bound ratio {min(bcpu) / min(gcpu):.3f}x")


if __name__ == "__main__":
    main()
