"""The cost of a 402 challenge, against a bare aiohttp handler answering a static 402
of the same size.

    python bench/bench_challenge.py [--seconds 5] [--rounds 3]

Every request carries an X-Forwarded-For (trusted in this config) never seen before by
the target, so no client reaches its rate limit: each 402 is a new invoice, token and
store row (as every 402 is since issue 17). The gated targets:
`stub`, whose node hands back a ready invoice at once, measures the gate's own cost per
402 (goal: at most 150 us of server CPU more than the bare 402); `sandbox` adds what the
in-process node costs to make and sign a real BOLT11 invoice; `fleet (SQLite)` and
`fleet (PostgreSQL)` are sidecars in fleet mode whose 402s claim invoices from a pool
filled beforehand (issue 20's goal: at most 60 us more than the bare 402 on SQLite).
PostgreSQL: $MICROPAY_BENCH_PG (default postgresql://postgres@127.0.0.1:5432/test), in a
schema of its own that is dropped afterwards; without a reachable server that target is
left out, saying so.
"""
from __future__ import annotations

import argparse
import os

from common import Target, script


PG = os.environ.get("MICROPAY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg(sql: str) -> None:
    import asyncio

    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    asyncio.run(run())


def drop_schema(schema: str) -> None:
    _pg(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def measure(target: Target, path: str, seconds: int) -> tuple[float, float]:
    """(responses per second, server CPU microseconds per response)."""
    return target.measure(path, seconds, connections=16, script=script(path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    targets = {"bare": (Target("bare"), "/bare402"), "stub": (Target("stub"), "/mint"),
               "sandbox": (Target("gated"), "/mint"), "fleet-sqlite": (Target("fleet"), "/mint")}
    pg_schema = None
    try:
        import uuid
        _pg("SELECT 1")
        pg_schema = f"mp_bench_{uuid.uuid4().hex[:10]}"
        targets["fleet-pg"] = (Target("fleet", "--store", f"{PG}{'&' if '?' in PG else '?'}schema={pg_schema}"),
                               "/mint")
    except Exception as exc:       # noqa: BLE001 - the other targets still run
        print(f"(fleet on PostgreSQL left out: {exc})")
        pg_schema = None
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in targets}
    try:
        for _ in range(a.rounds):
            for name, (target, path) in targets.items():
                results[name].append(measure(target, path, a.seconds))
    finally:
        for target, _ in targets.values():
            target.stop()
        if pg_schema:
            drop_schema(pg_schema)
    best = {name: (max(r for r, _ in rs), min(c for _, c in rs)) for name, rs in results.items()}
    (b_rate, b_cpu), (s_rate, s_cpu), (g_rate, g_cpu) = best["bare"], best["stub"], best["sandbox"]
    print(f"bare static 402         : {b_rate:9.0f} responses/s   {b_cpu:7.1f} us CPU each")
    print(f"challenge, stub node    : {s_rate:9.0f} challenges/s  {s_cpu:7.1f} us CPU each "
          f"-> the gate adds {s_cpu - b_cpu:.0f} us per 402 (goal <= 150 us); ratio {s_rate / b_rate:.3f}x")
    print(f"challenge, sandbox node : {g_rate:9.0f} challenges/s  {g_cpu:7.1f} us CPU each "
          f"(+ making and signing a BOLT11 invoice); ratio {g_rate / b_rate:.3f}x")
    for name, label in (("fleet-sqlite", "fleet, pool, SQLite    "), ("fleet-pg", "fleet, pool, PostgreSQL")):
        if name in best:
            f_rate, f_cpu = best[name]
            print(f"{label} : {f_rate:9.0f} challenges/s  {f_cpu:7.1f} us CPU each -> adds {f_cpu - b_cpu:.0f} us "
                  f"per 402 (goal <= 60 us on SQLite); ratio {f_rate / b_rate:.3f}x")
    print(f"(best of {a.rounds} rounds of {a.seconds} s; CPU is the least per response)")


if __name__ == "__main__":
    main()
