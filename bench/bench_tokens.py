"""Token verification cost (goals: <= 20 us/op first seen, <= 2 us/op repeated).

    python bench/bench_tokens.py [--n 20000]

Baseline, measured in the same run: the least work any L402 verifier must do for a
new credential, one HMAC-SHA256 plus one SHA-256 (hashlib, C).
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import os

from common import per_op_us

from micropay.l402.wire import format_authorization
from micropay.l402.tokens import RootKeyRing, TokenService

CAVEATS = ["services=bench:0", "path=/api/*", "method=GET", "bench_capabilities=read",
           "bench_valid_until=4102444800"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    n = ap.parse_args().n
    svc = TokenService(RootKeyRing.ephemeral(), "bench", cache_size=2 * n)
    headers = []
    for _ in range(n):
        pre = os.urandom(32)
        mac = svc.mint(hashlib.sha256(pre).digest(), CAVEATS)
        headers.append(format_authorization(mac.serialize(), pre.hex()))
    key, msg = os.urandom(32), os.urandom(66)
    baseline = min(per_op_us(lambda h: (hmac.digest(key, msg, "sha256"), hashlib.sha256(msg).digest()),
                             headers) for _ in range(3))
    verify = lambda h: svc.verify_header(h, "GET", "/api/x")  # noqa: E731
    firsts = []
    for _ in range(3):
        svc.forget_cached()
        firsts.append(per_op_us(verify, headers))
    first = min(firsts)
    repeated = min(per_op_us(verify, [headers[0]] * n) for _ in range(3))
    print(f"baseline (1 HMAC + 1 SHA-256)   : {baseline:7.2f} us/op")
    print(f"first-seen credential           : {first:7.2f} us/op   ratio {first / baseline:5.1f}x baseline"
          f"   (goal <= 20 us)")
    print(f"repeated credential (cache hit) : {repeated:7.2f} us/op   ratio {repeated / baseline:5.1f}x baseline"
          f"   (goal <= 2 us)")


if __name__ == "__main__":
    main()
