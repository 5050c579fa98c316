"""A small discrete-event simulation of a micropay fleet, fed with measured costs, to
check a capacity plan (docs/scaling.md) before anyone buys the machines.

    python bench/sim_fleet.py                        # the worked plan: 100,000 paid requests/s
    python bench/sim_fleet.py --rate 100000 --credits 1 --nodes 600 ...   # any other plan

What is simulated, per client: a 402 (one sidecar process's CPU, one claim in
PostgreSQL; when the pool of the node chosen is empty, an ask: the node makes the
invoice on demand), the Lightning payment (the node's HTLC handling), then `credits`
paid requests (sidecar CPU; the first one verifies a new credential). Clients arrive at
rate/credits a second (Poisson). Each node's agent refills its pool (its invoice rate,
shared with asks) whenever the pool is under its depth. Stations are FIFO queues of
identical servers with the measured service time (exponentially distributed around it,
so queues form as they would). What it reports: each station's utilisation, latency
percentiles of 402s and paid requests, asks made, the least pool depth seen. A plan
holds if no station is near 100% and the pools never run dry.

The defaults are the worked plan of docs/scaling.md with this project's 2-vCPU test
machine's measurements (docs/performance.md, "Fleet mode"); pass your own with the flags.
"""
from __future__ import annotations

import argparse
import heapq
import math
import random
from dataclasses import dataclass, field


@dataclass
class Station:
    """c identical FIFO servers; `serve` returns when a job submitted at t is done."""
    name: str
    servers: int
    mean_s: float
    rng: random.Random
    window: tuple[float, float] = (0.0, float("inf"))   # busy time is counted for jobs starting in it
    busy_s: float = 0.0
    free: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.free = [0.0] * self.servers

    def serve(self, t: float, mean_s: float | None = None) -> float:
        service = self.rng.expovariate(1.0 / (mean_s or self.mean_s))
        start = max(t, heapq.heappop(self.free))
        end = start + service
        heapq.heappush(self.free, end)
        if self.window[0] <= start < self.window[1]:
            self.busy_s += service
        return end


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def simulate(a: argparse.Namespace) -> dict:
    """Events in time order (a heap); each station is used at the time of the event that
    uses it, so its FIFO servers see jobs in the order they arrive."""
    rng = random.Random(a.seed)
    # steady state: every client's requests span credits x think_s, so the load is whole
    # from then on; utilisation is measured from there to the end of arrivals
    warm = min(a.credits * a.think_s + a.pay_s + 0.5, a.seconds / 2)
    win = (warm, a.seconds)
    cpu = Station("sidecar CPU", a.sidecars * a.procs_per_sidecar, a.paid_us / 1e6, rng, win)
    pg = Station("PostgreSQL claims", a.pg_cores, 1.0 / a.pg_claims_per_core, rng, win)
    inv = [Station(f"node {i} invoices", 1, 1.0 / a.node_invoices, rng, win) for i in range(a.nodes)]
    htlc = [Station(f"node {i} HTLCs", 1, 1.0 / a.node_htlcs, rng, win) for i in range(a.nodes)]
    pool = [a.depth] * a.nodes
    refilled = [0] * a.nodes
    refill_at = [0.0] * a.nodes
    stats = {"asks": 0, "least": a.depth, "clients": 0}
    lat402: list[float] = []
    latpaid: list[float] = []
    events: list[tuple[float, int, str, tuple]] = []
    seq = 0

    def at(t: float, kind: str, *data) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    client_rate = a.rate / a.credits
    at(rng.expovariate(client_rate), "arrive", 0)
    while events:
        t, _, kind, data = heapq.heappop(events)
        if kind == "arrive":
            (n,) = data
            stats["clients"] += 1
            if t < a.seconds:
                at(t + rng.expovariate(client_rate), "arrive", n + 1)
            at(cpu.serve(t, a.challenge_us / 1e6), "claim", t, n % a.nodes)      # round robin
        elif kind == "claim":
            began, node = data
            made = int(max(0.0, t - refill_at[node]) * a.node_invoices * a.refill_share)
            if pool[node] >= a.depth:
                refill_at[node] = t
            elif made:
                added = min(a.depth - pool[node], made)
                pool[node] += added
                if win[0] <= t < win[1]:
                    refilled[node] += added
                refill_at[node] = t
            done = pg.serve(t)
            if pool[node] > 0:
                pool[node] -= 1
                stats["least"] = min(stats["least"], pool[node])
                at(done, "challenged", began, node)
            else:
                stats["asks"] += 1
                stats["least"] = 0
                at(done, "ask", began, node)
        elif kind == "ask":
            began, node = data
            at(inv[node].serve(t), "challenged", began, node)
        elif kind == "challenged":
            began, node = data
            lat402.append(t - began)
            at(t + a.pay_s, "pay", node)
        elif kind == "pay":
            (node,) = data
            at(htlc[node].serve(t), "paid", 0)
        else:                                   # "paid" (the first request) or a later "request"
            (k,) = data
            end = cpu.serve(t, (a.first_us if k == 0 else a.paid_us) / 1e6)
            latpaid.append(end - t)
            if k + 1 < a.credits:
                at(t + a.think_s, "request", k + 1)
    span = win[1] - win[0]
    busy = {"sidecar CPU": cpu.busy_s / (span * cpu.servers), "PostgreSQL claims": pg.busy_s / (span * pg.servers),
            "node invoices (busiest)": max(s.busy_s + r / a.node_invoices for s, r in zip(inv, refilled)) / span,
            "node HTLCs (busiest)": max(s.busy_s for s in htlc) / span}
    return {"clients": stats["clients"], "busy": busy, "asks": stats["asks"], "least_pool": stats["least"],
            "p50_402_ms": pct(lat402, 0.5) * 1e3, "p99_402_ms": pct(lat402, 0.99) * 1e3,
            "p50_paid_ms": pct(latpaid, 0.5) * 1e3, "p99_paid_ms": pct(latpaid, 0.99) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=100_000, help="paid requests a second, in all")
    ap.add_argument("--credits", type=int, default=100, help="paid requests per payment (a credits token)")
    ap.add_argument("--sidecars", type=int, default=3, help="sidecar machines")
    ap.add_argument("--procs-per-sidecar", type=int, default=4, help="`micropay serve` processes (cores) each")
    ap.add_argument("--nodes", type=int, default=27, help="Lightning nodes running the agent")
    ap.add_argument("--depth", type=int, default=800, help="pool depth per node")
    ap.add_argument("--pg-cores", type=int, default=8)
    ap.add_argument("--pg-claims-per-core", type=float, default=1000.0, help="claims a second one PG core does")
    ap.add_argument("--node-invoices", type=float, default=366.0, help="invoices a second a node makes")
    ap.add_argument("--node-htlcs", type=float, default=53.6, help="incoming payments a second a node settles")
    ap.add_argument("--refill-share", type=float, default=0.8, help="share of a node's invoice rate its agent uses")
    ap.add_argument("--challenge-us", type=float, default=150.0, help="sidecar CPU per 402 from the pool")
    ap.add_argument("--first-us", type=float, default=130.0, help="sidecar CPU per first-seen credential")
    ap.add_argument("--paid-us", type=float, default=60.0, help="sidecar CPU per paid request (token seen before)")
    ap.add_argument("--pay-s", type=float, default=0.3, help="the payer's time from 402 to paid")
    ap.add_argument("--think-s", type=float, default=0.05, help="time between a client's paid requests")
    ap.add_argument("--seconds", type=float, default=10.0, help="simulated seconds of arrivals")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    r = simulate(a)
    payments = a.rate / a.credits
    print(f"plan: {a.rate:,.0f} paid requests/s, {a.credits} per payment ({payments:,.0f} payments/s); "
          f"{a.sidecars} sidecars x {a.procs_per_sidecar} processes, {a.nodes} nodes (pool {a.depth} each), "
          f"PostgreSQL {a.pg_cores} cores")
    print(f"simulated {a.seconds:g} s, {r['clients']:,} clients")
    for name, u in r["busy"].items():
        flag = "  <-- saturated" if u >= 0.9 else ("  (high)" if u >= 0.7 else "")
        print(f"  {name:24}: {u * 100:5.1f}% busy{flag}")
    print(f"  402 latency             : p50 {r['p50_402_ms']:.2f} ms, p99 {r['p99_402_ms']:.2f} ms "
          f"(queueing in the stations only; the network is not modelled)")
    print(f"  paid request latency    : p50 {r['p50_paid_ms']:.2f} ms, p99 {r['p99_paid_ms']:.2f} ms")
    print(f"  asks (pool ran dry)     : {r['asks']:,}; least pool depth seen {r['least_pool']}")
    need_nodes = math.ceil(payments / (a.node_htlcs * 0.7))
    need_cpus = math.ceil((a.rate * a.paid_us + payments * (a.challenge_us + a.first_us - a.paid_us)) / 1e6 / 0.7)
    print(f"  sizing rule (70% busy)  : {need_cpus} sidecar cores, {need_nodes} nodes, "
          f"{math.ceil(payments / (a.pg_claims_per_core * 0.7))} PostgreSQL cores for claims")
    ok = all(u < 0.9 for u in r["busy"].values()) and r["asks"] == 0
    print("the plan holds" if ok else "the plan does NOT hold: see the saturated station above")


if __name__ == "__main__":
    main()
