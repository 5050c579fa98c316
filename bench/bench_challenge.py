"""402 challenge minting rate on the sandbox vs a bare aiohttp handler answering a
static 402 of the same size.

    python bench/bench_challenge.py [--seconds 5]

Every request carries a distinct X-Forwarded-For (trusted in this config), so no
pending challenge is reused: each 402 is a new invoice, token and store row.
"""
from __future__ import annotations

import argparse

from common import Target, script, wrk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    a = ap.parse_args()
    bare, gated = Target("bare"), Target("gated")
    try:
        b = wrk(bare.url + "/bare402", a.seconds, connections=16, script=script("/bare402"))
        g = wrk(gated.url + "/mint", a.seconds, connections=16, script=script("/mint"))
    finally:
        bare.stop()
        gated.stop()
    print(f"bare static 402      : {b:9.0f} responses/s")
    print(f"sandbox challenge    : {g:9.0f} challenges/s  (new invoice + macaroon + SQLite row each)")
    print(f"ratio challenge/bare : {g / b:9.3f}x")


if __name__ == "__main__":
    main()
