"""Start-up cost of `micropay serve` (the built-in demo, sandbox backend, SQLite):
wall time from process start to the first 402 answer, the process's RSS then, and how
many micropay.games modules a demo sidecar loads. Median of N runs (default 9).

    .venv/bin/python bench/bench_startup.py [N]

To measure another tree, put its plugin/ first on PYTHONPATH (e.g. a `git archive` of
an older commit).
"""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

GAMES_MODULES = """
import asyncio, sys, tempfile
from pathlib import Path
from micropay.cli import build_parser
from micropay.seller.configfile import demo_config
from micropay.sidecar.app import build_app, create_runtime
build_parser()
async def main():
    rt = await create_runtime(demo_config().with_overrides(data_dir=Path(tempfile.mkdtemp())))
    build_app(rt)
    print(len([n for n in sys.modules if n.startswith("micropay.games")]))
    await rt.store.close()
asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run() -> tuple[float, float]:
    d, port = tempfile.mkdtemp(), free_port()
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "micropay", "serve", "--listen", f"127.0.0.1:{port}",
                          "--data-dir", d + "/data"], cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() - t0 < 30:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/joke", timeout=1)
            except urllib.error.HTTPError as e:
                if e.code == 402:
                    break
            except OSError:
                pass
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        with open(f"/proc/{p.pid}/status") as f:
            rss_kb = int(next(line for line in f if line.startswith("VmRSS")).split()[1])
    finally:
        p.terminate()
        p.wait()
    return elapsed, rss_kb / 1024


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 9
    runs = [one_run() for _ in range(n)]
    times, rss = sorted(r[0] for r in runs), sorted(r[1] for r in runs)
    games = subprocess.run([sys.executable, "-c", GAMES_MODULES], capture_output=True, text=True,
                           check=True).stdout.strip()
    print(f"start-up to the first 402: median {times[n // 2] * 1000:.0f} ms (min {times[0] * 1000:.0f}); "
          f"RSS then: median {rss[n // 2]:.1f} MB; micropay.games modules loaded: {games} (n={n})")


if __name__ == "__main__":
    main()
