"""The gate's caches are bounded in bytes (issue 18, section 2): one pass token and
requests with distinct 60 KB query strings do not grow a `micropay serve` process."""
from __future__ import annotations

import http.client
import json
import os
import time
import urllib.request
from pathlib import Path

from micropay.sidecar.cache import INLINE_KEY_CHARS, BoundedCache, key_bytes, request_key

from ..helpers_proc import ServerProcess, free_port

CONFIG = """
demo = true
[[routes]]
method = "GET"
path = "/api/echo"
price_msat = 3000
pass_s = 3600
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def buy_pass(base: str) -> str:
    try:
        urllib.request.urlopen(base + "/api/echo", timeout=10)
        raise AssertionError("expected 402")
    except urllib.error.HTTPError as err:
        assert err.code == 402
        doc = json.loads(err.read())
    pay = urllib.request.Request(base + "/sandbox/wallets/default/pay", method="POST",
                                 data=json.dumps({"bolt11": doc["invoice"]}).encode(),
                                 headers={"Content-Type": "application/json"})
    preimage = json.loads(urllib.request.urlopen(pay, timeout=10).read())["preimage"]
    return f"L402 {doc['macaroon']}:{preimage}"


def test_2000_distinct_60kb_query_strings_on_one_pass_token_grow_rss_by_less_than_20mb(tmp_path):
    (tmp_path / "rss.toml").write_text(f'data_dir = "{tmp_path / "data"}"\n{CONFIG}')
    port = free_port()
    server = ServerProcess(["serve", "--config", str(tmp_path / "rss.toml"), "--listen", f"127.0.0.1:{port}"],
                           tmp_path, port)
    try:
        auth = buy_pass(server.url)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        started = time.monotonic()

        def requests(first: int, n: int) -> None:
            for i in range(first, first + n):
                conn.request("GET", f"/api/echo?q={i:08d}{'a' * 60_000}", headers={"Authorization": auth})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200, resp.status
                assert time.monotonic() - started < 120

        requests(0, 200)                          # warm up: buffers, allocator arenas
        before = rss_kib(server.proc.pid)
        requests(200, 2000)
        after = rss_kib(server.proc.pid)
        conn.close()
        print(f"RSS before {before} KiB, after {after} KiB, growth {(after - before) / 1024:.1f} MiB")
        assert after - before < 20 * 1024, f"RSS grew by {(after - before) / 1024:.1f} MiB"
    finally:
        server.stop()


def test_a_bounded_cache_keeps_long_keys_as_digests_and_its_bytes_within_budget():
    long_path = "/p?" + "a" * 60_000
    key = request_key("L402 x:y", "GET", long_path)
    assert isinstance(key, bytes) and len(key) == 32
    assert request_key("L402 x:y", "GET", "/p") == ("L402 x:y", "GET", "/p")
    assert request_key("L402 x:y", "GET", "/" * INLINE_KEY_CHARS) != request_key("L402 x:z", "GET", "/" * INLINE_KEY_CHARS)
    cache: BoundedCache[int] = BoundedCache(max_bytes=64 * 1024, max_entries=1000)
    for i in range(10_000):
        cache.put(request_key("L402 x:y", "GET", f"/p?{i}" + "a" * (i % 3000)), i)
        assert cache.nbytes <= 64 * 1024 and len(cache) <= 1000
    assert cache.nbytes == sum(key_bytes(k) for k in cache)
    newest = request_key("L402 x:y", "GET", "/p?9999" + "a" * (9999 % 3000))
    assert cache[newest] == 9999                  # the oldest went first
    cache.pop(newest)
    assert cache.nbytes == sum(key_bytes(k) for k in cache)
    cache.clear()
    assert cache.nbytes == 0 and not cache
