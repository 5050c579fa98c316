"""Cost of verifying a "Payment" (MPP charge) credential against an L402 credential
(goal: within 1.2x of L402's first-seen verification), and of rendering the Payment
challenge that a 402 carries beside L402's.

    python bench/bench_payment.py [--n 20000]

Baseline, measured in the same run: L402's first-seen verification of a token with five
caveats (TokenService.verify_header, nothing cached), the check a Payment credential
replaces. A Payment credential is single use, so it has no repeated-credential figure:
the store write that consumes it is the same one statement a credits token costs.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import time

from micropay.payment import scheme as pa
from common import per_op_us

from micropay.l402.wire import format_authorization
from micropay.l402.tokens import RootKeyRing, TokenService

CAVEATS = ["services=bench:0", "path=/api/*", "method=GET", "bench_capabilities=read",
           "bench_valid_until=4102444800"]
INVOICE = "lnbcrt10n1" + "q" * 300          # the length of a real regtest invoice


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    n = ap.parse_args().n
    svc = TokenService(RootKeyRing.ephemeral(), "bench", cache_size=2 * n)
    binder = pa.Binder([os.urandom(32)])
    now = int(time.time())
    l402, payment, offers = [], [], []
    for _ in range(n):
        pre = os.urandom(32)
        ph = hashlib.sha256(pre).digest()
        l402.append(format_authorization(svc.mint(ph, CAVEATS).serialize(), pre.hex()))
        args = dict(realm="bench", bolt11=INVOICE, payment_hash=ph.hex(), price_msat=1000, expires_at=now + 600,
                    description="bench: GET /api/x", opaque={"route": "GET /api/*", "token": os.urandom(32).hex()})
        offers.append(args)
        ch = pa.charge_challenge(binder, **args)
        payment.append("Payment " + pa.encode_object({"challenge": ch.echo(), "payload": {"preimage": pre.hex()}}))
    firsts, verifies, renders = [], [], []
    for _ in range(7):               # interleaved rounds: a noisy neighbour slows both alike
        svc.forget_cached()
        firsts.append(per_op_us(lambda h: svc.verify_header(h, "GET", "/api/x"), l402))
        verifies.append(per_op_us(lambda h: pa.verify_charge(binder, pa.parse_credential(h), realm="bench",
                                                             now=now), payment))
        renders.append(per_op_us(lambda a: pa.charge_challenge(binder, **a).header(), offers))
    base, verify, render = min(firsts), min(verifies), min(renders)
    print(f"L402 credential, first seen (baseline) : {base:7.2f} us/op")
    print(f"Payment credential (parse + verify)    : {verify:7.2f} us/op   ratio {verify / base:4.2f}x L402"
          f"   (goal <= 1.2x)")
    print(f"Payment challenge rendered for a 402   : {render:7.2f} us/op   (added to each 402 that offers it)")


if __name__ == "__main__":
    main()
