"""The latency the micropay plugin adds to payments into its node and forwarded
through it (goal: at most 5 ms at p99), on a regtest line 1 -> 2 -> 3.

    python bench/bench_htlc_latency.py [--n 200] [--dir /tmp/micropay-bench-htlc]

Node 2 starts without the plugin; payments 1 -> 2 (into node 2) and 1 -> 3 (forwarded
by node 2) are timed one after another (xpay until it returns). Then the plugin is
started on node 2 (`plugin start`) and the same is timed again, then once more with a
micropay-fetch in flight on node 2, then with the plugin stopped again, all in one run.
The baseline is node 2 without the plugin (both rounds). lightningd calls the plugin's
htlc_accepted hook for every one of these HTLCs.
"""
from __future__ import annotations

import argparse
import http.server
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "contrib" / "regtest"))
import network  # noqa: E402
from pyln.client import LightningRpc  # noqa: E402


def timed(src: LightningRpc, dst: LightningRpc, n: int, tag: str) -> list[float]:
    out = []
    for i in range(n):
        inv = dst.invoice(10_000, f"{tag}-{i}-{time.monotonic_ns()}", "latency")["bolt11"]
        t0 = time.perf_counter()
        src.xpay(inv)
        out.append(time.perf_counter() - t0)
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def row(name: str, into: list[float], through: list[float], base_in: list[float], base_fwd: list[float]) -> str:
    def f(x: float) -> str:
        return f"{x * 1000:6.1f} ms"
    return (f"{name:<28} into p50 {f(pct(into, 50))} p99 {f(pct(into, 99))} "
            f"(+{(pct(into, 50) - pct(base_in, 50)) * 1000:5.1f} / +{(pct(into, 99) - pct(base_in, 99)) * 1000:5.1f} ms)"
            f" | through p50 {f(pct(through, 50))} p99 {f(pct(through, 99))} "
            f"(+{(pct(through, 50) - pct(base_fwd, 50)) * 1000:5.1f} / "
            f"+{(pct(through, 99) - pct(base_fwd, 99)) * 1000:5.1f} ms)")


class Slow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(30)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--dir", default="/tmp/micropay-bench-htlc")
    a = ap.parse_args()
    root = Path(a.dir)
    state = network.up(root, 3, None, with_plugin=False)
    try:
        r1, r2, r3 = (LightningRpc(n["rpc_file"]) for n in state["nodes"])
        plugin = shutil.which("micropay-plugin") or str(Path(sys.executable).parent / "micropay-plugin")
        timed(r1, r2, 10, "warm"), timed(r1, r3, 10, "warm")
        base_in, base_fwd = timed(r1, r2, a.n, "b-in"), timed(r1, r3, a.n, "b-fwd")
        r2.plugin_start(plugin)
        network.wait(lambda: "micropay-fetch" in str(r2.help()), "the plugin to start")
        with_in, with_fwd = timed(r1, r2, a.n, "p-in"), timed(r1, r3, a.n, "p-fwd")
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        fetch_rpc = LightningRpc(state["nodes"][1]["rpc_file"])
        slow_url = f"http://127.0.0.1:{server.server_address[1]}/slow"

        def fetch_waiting() -> None:
            try:
                fetch_rpc.call("micropay-fetch", {"url": slow_url})
            except Exception:          # ended by `plugin stop` below: expected
                pass
        threading.Thread(target=fetch_waiting, daemon=True).start()
        time.sleep(0.5)
        busy_in, busy_fwd = timed(r1, r2, min(a.n, 100), "f-in"), timed(r1, r3, min(a.n, 100), "f-fwd")
        r2.plugin_stop(plugin)
        base2_in, base2_fwd = timed(r1, r2, a.n, "b2-in"), timed(r1, r3, a.n, "b2-fwd")
        server.shutdown()
        bi, bf = base_in + base2_in, base_fwd + base2_fwd
        print(f"{a.n} payments per row, sequential; deltas against node 2 without the plugin (both rounds)")
        print(row("baseline, round 1", base_in, base_fwd, bi, bf))
        print(row("baseline, round 2", base2_in, base2_fwd, bi, bf))
        print(row("with micropay", with_in, with_fwd, bi, bf))
        print(row("with micropay, fetch waiting", busy_in, busy_fwd, bi, bf))
        print(f"p99 added by the plugin: into {(pct(with_in, 99) - pct(bi, 99)) * 1000:.1f} ms, "
              f"through {(pct(with_fwd, 99) - pct(bf, 99)) * 1000:.1f} ms (goal <= 5 ms); "
              f"medians {statistics.median(with_in) * 1000:.1f} / {statistics.median(bi) * 1000:.1f} ms into")
    finally:
        network.down(root)


if __name__ == "__main__":
    main()
