"""Helpers shared by the benchmarks: run a target server, drive it with wrk, read RSS."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent


def per_op_us(fn, items) -> float:
    """Microseconds per call of fn over items (one pass, wall clock)."""
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items) * 1e6


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def rounds_line(label: str, rates: list[float]) -> str:
    """'label : best req/s, median (rounds: ...)', as the throughput benchmarks print it."""
    return (f"{label} : {max(rates):9.0f} req/s best, {median(rates):.0f} median  "
            f"(rounds: {', '.join(f'{x:.0f}' for x in rates)})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target:
    def __init__(self, mode: str, *extra: str) -> None:
        self.port = free_port()
        self.data_dir = tempfile.mkdtemp(prefix="micropay-bench-")
        # The target on CPU 0, the load generator on CPU 1 (when taskset exists).
        pin = ["taskset", "-c", "0"] if shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1 else []
        self.proc = subprocess.Popen([*pin, sys.executable, str(HERE / "_server.py"), "--mode", mode,
                                      "--port", str(self.port), "--data-dir", self.data_dir,
                                      "--loop", os.environ.get("MICROPAY_BENCH_LOOP", "asyncio"), *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{mode} target did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def measure(self, path: str, seconds: int, **wrk_kwargs) -> tuple[float, float]:
        """One wrk run on `path`: (requests per second, server CPU microseconds per request)."""
        before = self.cpu_seconds()
        rate, total = wrk_run(self.url + path, seconds, **wrk_kwargs)
        return rate, (self.cpu_seconds() - before) / max(total, 1) * 1e6

    def buy_pass(self, path: str = "/pass") -> str:
        """Authorization header value for a paid pass token (sandbox wallet)."""
        from micropay.l402.wire import format_authorization, parse_challenges
        try:
            urllib.request.urlopen(self.url + path)
        except urllib.error.HTTPError as e:
            ch = parse_challenges(e.headers.get_all("WWW-Authenticate"))[0]
        req = urllib.request.Request(f"{self.url}/sandbox/wallets/bench/pay",
                                     data=json.dumps({"bolt11": ch.invoice}).encode(),
                                     headers={"Content-Type": "application/json"})
        preimage = json.loads(urllib.request.urlopen(req).read())["preimage"]
        return format_authorization(ch.macaroon, preimage)

    def open_session(self, path: str) -> str:
        """Authorization header value of a bearer credential for a session opened on
        `path`, its deposit paid by a sandbox wallet."""
        from micropay.payment import scheme as pa
        try:
            urllib.request.urlopen(self.url + path)
        except urllib.error.HTTPError as e:
            ch = next(c for c in pa.parse_challenges(e.headers.get_all("WWW-Authenticate")) if c.intent == "session")

        def wallet(op: str, body: dict) -> dict:
            req = urllib.request.Request(f"{self.url}/sandbox/wallets/bench/{op}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(req).read())
        preimage = wallet("pay", {"bolt11": pa.decode_request(ch)["depositInvoice"]})["preimage"]
        ret = wallet("invoice", {"description": "bench refund"})["bolt11"]
        sid = pa.decode_request(ch)["paymentHash"]
        opening = pa.format_session_credential(ch, {"action": "open", "preimage": preimage, "returnInvoice": ret})
        urllib.request.urlopen(urllib.request.Request(self.url + path, headers={"Authorization": opening})).read()
        return pa.format_session_credential(ch, {"action": "bearer", "sessionId": sid, "preimage": preimage})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def wrk(url: str, seconds: int = 5, connections: int = 32, headers: dict[str, str] | None = None,
        script: str | None = None) -> float:
    """Requests per second from wrk (one thread: the target gets the other core)."""
    return wrk_run(url, seconds, connections, headers, script)[0]


def wrk_run(url: str, seconds: int = 5, connections: int = 32, headers: dict[str, str] | None = None,
            script: str | None = None) -> tuple[float, int]:
    """(requests per second, total requests) from one wrk run."""
    stats = wrk_stats(url, seconds, connections, headers, script)
    return stats["rate"], stats["total"]


def wrk_stats(url: str, seconds: int = 5, connections: int = 32, headers: dict[str, str] | None = None,
              script: str | None = None) -> dict:
    """One wrk run: rate, total, non2xx (answers that were not 2xx/3xx), p50/p99 latency (ms)."""
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed for this benchmark: apt-get install wrk")
    pin = ["taskset", "-c", "1"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
    cmd = [*pin, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=seconds + 30).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"could not read wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx and not script:
        raise RuntimeError(f"{non2xx.group(1)} non-2xx responses during the run:\n{out}")
    total = re.search(r"(\d+) requests in", out)

    def ms(q: str) -> float | None:
        found = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not found:
            return None
        return float(found.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[found.group(2)]
    return {"rate": float(m.group(1)), "total": int(total.group(1)) if total else 0,
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "p50_ms": ms("50"), "p99_ms": ms("99")}


# wrk script: every request from a distinct client (X-Forwarded-For), so no client's
# per-minute bucket or pending bound is reached, in this run or a later one on the same
# target. (Until issue 17 the counter restarted with each run, so from the second round
# on every client asked again and, under the old reuse rule, got its pending challenge
# back without a new invoice: later rounds measured reuse, not new challenges.)
DISTINCT_CLIENTS_LUA = """
counter = %d
request = function()
  counter = counter + 1
  local n = counter %% 4294967296
  wrk.headers["X-Forwarded-For"] = string.format("%%d.%%d.%%d.%%d", math.floor(n / 16777216),
    math.floor(n / 65536) %% 256, math.floor(n / 256) %% 256, n %% 256)
  return wrk.format(nil, "%s")
end
"""


def script(path: str) -> str:
    """A wrk script whose clients are new to the target: each request comes from an IPv4
    address (X-Forwarded-For) counted up from a random start of its own per run, as
    real clients' addresses are (a text that is no address takes the slower path that
    tries to parse it first)."""
    f = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    f.write(DISTINCT_CLIENTS_LUA % (int.from_bytes(os.urandom(4), "big"), path))
    f.close()
    return f.name




def alternate(bare: Target, gated: Target, path: str, seconds: int, rounds: int,
              headers: dict[str, str]) -> tuple[list[float], list[float], list[float], list[float]]:
    """The same request to both targets, alternating rounds so drift hits both alike:
    (bare rates, gated rates, bare CPU us/request, gated CPU us/request)."""
    b, g, bcpu, gcpu = [], [], [], []
    for _ in range(rounds):
        for target, rates, cpus in ((bare, b, bcpu), (gated, g, gcpu)):
            rate, cpu = target.measure(path, seconds, headers=headers)
            rates.append(rate)
            cpus.append(cpu)
    return b, g, bcpu, gcpu
