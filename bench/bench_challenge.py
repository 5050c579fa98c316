"""The cost of a 402 challenge, against a bare aiohttp handler answering a static 402
of the same size.

    python bench/bench_challenge.py [--seconds 5] [--rounds 3]

Every request carries an X-Forwarded-For (trusted in this config) never seen before by
the target, so no client reaches its rate limit: each 402 is a new invoice, token and
store row (as every 402 is since issue 17). Two gated targets:
`stub`, whose node hands back a ready invoice at once, measures the gate's own cost per
402 (goal: at most 150 us of server CPU more than the bare 402); `sandbox` adds what the
in-process node costs to make and sign a real BOLT11 invoice.
"""
from __future__ import annotations

import argparse

from common import Target, script


def measure(target: Target, path: str, seconds: int) -> tuple[float, float]:
    """(responses per second, server CPU microseconds per response)."""
    return target.measure(path, seconds, connections=16, script=script(path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"bare": [], "stub": [], "sandbox": []}
    targets = {"bare": (Target("bare"), "/bare402"), "stub": (Target("stub"), "/mint"),
               "sandbox": (Target("gated"), "/mint")}
    try:
        for _ in range(a.rounds):
            for name, (target, path) in targets.items():
                results[name].append(measure(target, path, a.seconds))
    finally:
        for target, _ in targets.values():
            target.stop()
    best = {name: (max(r for r, _ in rs), min(c for _, c in rs)) for name, rs in results.items()}
    (b_rate, b_cpu), (s_rate, s_cpu), (g_rate, g_cpu) = best["bare"], best["stub"], best["sandbox"]
    print(f"bare static 402         : {b_rate:9.0f} responses/s   {b_cpu:7.1f} us CPU each")
    print(f"challenge, stub node    : {s_rate:9.0f} challenges/s  {s_cpu:7.1f} us CPU each "
          f"-> the gate adds {s_cpu - b_cpu:.0f} us per 402 (goal <= 150 us); ratio {s_rate / b_rate:.3f}x")
    print(f"challenge, sandbox node : {g_rate:9.0f} challenges/s  {g_cpu:7.1f} us CPU each "
          f"(+ making and signing a BOLT11 invoice); ratio {g_rate / b_rate:.3f}x")
    print(f"(best of {a.rounds} rounds of {a.seconds} s; CPU is the least per response)")


if __name__ == "__main__":
    main()
