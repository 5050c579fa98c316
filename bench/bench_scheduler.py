"""Stream scheduler CPU with 10,000 simulated streams (goal < 5% of one core).

    python bench/bench_scheduler.py [--streams 10000] [--interval 60] [--seconds 20]

The real StreamRunner, with an in-memory datastore and a node whose keysend returns at
once: what is measured is micropay's own work per due stream (accrual, planning,
two record writes as JSON, heap scheduling), not Lightning. Streams start spread over
one interval, so payments are due at a steady rate (streams/interval per second).
Baseline in the same run: the CPU of an idle asyncio loop over the same wall time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

from micropay.lightning.base import Payment
from micropay.streams.runner import StreamRunner
from micropay.streams.schedule import Recipient, Stream

DEST = "02" + "ab" * 32


class MemoryDatastore:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, ...], tuple[str, int]] = {}

    async def list(self, key):
        return []

    async def create(self, key, value):
        self.rows[tuple(key)] = (json.dumps(value), 0)
        return 0

    async def replace(self, key, value, generation):
        _, gen = self.rows[tuple(key)]
        assert gen == generation
        self.rows[tuple(key)] = (json.dumps(value), gen + 1)
        return gen + 1


class InstantNode:
    class rpc:  # noqa: N801
        @staticmethod
        async def call(method, params=None, timeout_s=None):
            return {"created": 0}

    payments = 0

    async def keysend(self, destination, amount_msat, **kw):
        InstantNode.payments += 1
        return Payment("00" * 32, "00" * 32, amount_msat, 0)


async def run(streams: int, interval: int, seconds: float) -> None:
    loop_start = time.process_time()
    await asyncio.sleep(seconds / 4)
    idle_cpu = (time.process_time() - loop_start) / (seconds / 4)

    runner = StreamRunner(InstantNode(), MemoryDatastore())  # type: ignore[arg-type]
    now = time.time()
    for i in range(streams):
        s = Stream.create(f"s{i}", [Recipient(DEST)], 1000, interval, None, 10, now)
        s.next_due = now + random.uniform(0, interval)
        runner.streams[s.id], runner._gen[s.id] = s, 0
        runner.ds.rows[("stream", s.id)] = ("{}", 0)
        runner._schedule(s)
    await runner.start()
    cpu0, wall0, paid0 = time.process_time(), time.monotonic(), InstantNode.payments
    await asyncio.sleep(seconds)
    cpu, wall, paid = time.process_time() - cpu0, time.monotonic() - wall0, InstantNode.payments - paid0
    await runner.stop()
    print(f"streams: {streams}, interval {interval} s -> {streams / interval:.0f} payments/s due")
    print(f"payments made in {wall:.1f} s: {paid} ({paid / wall:.0f}/s)")
    print(f"idle asyncio loop (baseline): {idle_cpu * 100:5.2f}% of one core")
    print(f"scheduler                    : {cpu / wall * 100:5.2f}% of one core, "
          f"{cpu / max(paid, 1) * 1e6:.0f} us CPU per payment  (goal < 5%)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=10_000)
    ap.add_argument("--interval", type=int, default=60)
    ap.add_argument("--seconds", type=float, default=20)
    a = ap.parse_args()
    asyncio.run(run(a.streams, a.interval, a.seconds))


if __name__ == "__main__":
    main()
