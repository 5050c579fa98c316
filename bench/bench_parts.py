"""What each part of a 402 and of a first-seen paid request costs on its own, against
the whole request's CPU on a bare aiohttp handler measured in the same run.

    python bench/bench_parts.py [--n 20000] [--seconds 3]

bench_challenge.py and bench_paid.py measure the gate's whole added CPU per request;
this one takes it apart. Each part runs alone, in this process, n times in a row, as
the gate calls it (the route of bench/_server.py, SQLite in a temporary directory,
statements in batches of 16 as 16 connections make them). A part timed alone runs from
warm caches, so the parts add up to less than the same work inside a server: read the
sums as a floor under what the gate can cost while it does this work, and compare them
with the issue's goals (a 402 from the pool <= 60 us over bare on SQLite, first-seen
L402 <= 50 us, Payment charge <= 70 us).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import Target, per_op_us, script, wrk_run

from micropay.core.ratelimit import TokenBucket, client_address
from micropay.core.receipts import ReceiptSigner, canonical_json, request_receipt_json
from micropay.l402.tokens import RootKeyRing, TokenService, new_token_id
from micropay.l402.wire import challenge_headers, format_authorization, payment_required_json
from micropay.payment import scheme as pa
from micropay.store import open_store_from_url
from micropay.store.core import CORE_SCHEMA
from micropay.store.fleet import FLEET_SCHEMA, FleetRepository, NodeBeat
from micropay.store.l402 import ChallengeRecord, L402Repository

BATCH = 16
BOLT11 = "lnbcrt10n1" + "q" * 300
ROUTE, PATH, PRICE = "GET /mint", "/mint", 1000
CAVEATS = ["services=bench:0", f"path={PATH}", "method=GET", "credits=1"]


def best(fn, items, rounds: int = 3) -> float:
    return min(per_op_us(fn, items) for _ in range(rounds))


def batched_us(loop: asyncio.AbstractEventLoop, run_batch, n: int, step: int = BATCH) -> float:
    """Process CPU microseconds (the store's worker thread included) per item of an async
    batch function called for items 0, step, 2*step, ... below n."""
    async def go() -> float:
        start = time.process_time()
        for i in range(0, n, step):
            await run_batch(i)
        return (time.process_time() - start) / n * 1e6
    return loop.run_until_complete(go())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seconds", type=int, default=3)
    a = ap.parse_args()
    n = a.n
    bare = Target("bare")
    try:
        rate, total = wrk_run(bare.url + "/bare402", 1, connections=16, script=script("/bare402"))   # warm
        before = bare.cpu_seconds()
        rate, total = wrk_run(bare.url + "/bare402", a.seconds, connections=16, script=script("/bare402"))
        bare_us = (bare.cpu_seconds() - before) / max(total, 1) * 1e6
    finally:
        bare.stop()

    tokens = TokenService(RootKeyRing.ephemeral(), "bench")
    binder = pa.binder_for(tokens.keyring)
    key_dir = Path(tempfile.mkdtemp(prefix="micropay-parts-key-"))
    signer = ReceiptSigner.load_or_create(key_dir / "receipt.key")
    now = int(time.time())
    idx = list(range(n))
    preimages = [os.urandom(32) for _ in idx]
    hashes = [hashlib.sha256(p).hexdigest() for p in preimages]
    token_ids = [new_token_id() for _ in idx]
    addresses = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in idx]
    macs = [tokens.mint(bytes.fromhex(hashes[i]), CAVEATS, token_ids[i]).serialize() for i in idx]
    bucket = TokenBucket(100_000)

    parts_402: dict[str, float] = {}
    parts_402["client address (X-Forwarded-For)"] = best(lambda i: client_address("127.0.0.1", [addresses[i]], 1), idx)
    parts_402["rate limit bucket"] = best(lambda i: bucket.take(addresses[i]), idx)
    parts_402["token id (time + 26 random bytes)"] = best(lambda i: new_token_id(), idx)
    parts_402["macaroon: mint and serialize"] = best(
        lambda i: tokens.mint(bytes.fromhex(hashes[i]), CAVEATS, token_ids[i]).serialize(), idx)
    parts_402["Payment charge challenge"] = best(
        lambda i: pa.charge_challenge(binder, realm="bench", bolt11=BOLT11, payment_hash=hashes[i], price_msat=PRICE,
                                      expires_at=now + 600, opaque={"route": ROUTE, "token": token_ids[i].hex()},
                                      description="bench: GET /mint").header(), idx)
    parts_402["402 body (JSON)"] = best(
        lambda i: payment_required_json(resource=ROUTE, price_msat=PRICE, invoice=BOLT11, payment_hash=hashes[i],
                                        expires_at=now + 600, macaroon=macs[i], credits=1, valid_until=None,
                                        description=""), idx)
    parts_402["L402 WWW-Authenticate values"] = best(lambda i: challenge_headers(macs[i], BOLT11), idx)

    data_dir = Path(tempfile.mkdtemp(prefix="micropay-parts-"))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    store = open_store_from_url(f"sqlite:///{data_dir}/store.sqlite3", (CORE_SCHEMA, FLEET_SCHEMA))
    loop.run_until_complete(store.open())
    l402, fleet = L402Repository(store), FleetRepository(store)
    records = [ChallengeRecord(hashes[i], token_ids[i].hex(), ROUTE, addresses[i], PRICE, BOLT11, macs[i], now,
                               now + 600, 1) for i in idx]
    parts_402["challenge record (SQLite, 16 a transaction)"] = batched_us(
        loop, lambda i: l402.add_challenges(records[i:i + BATCH]), n)
    node = "02" + "ab" * 32
    loop.run_until_complete(fleet.heartbeat(NodeBeat(node, "regtest", int((time.time() + 86400) * 1000), 1, 1)))
    for start in range(0, n, 500):
        rows = [(hashlib.sha256(f"pool-{i}".encode()).hexdigest(), node, f"micropay-fleet-parts-{i}", PRICE,
                 "bench: GET /mint", BOLT11, now + 7 * 86400, int(time.time() * 1000))
                for i in range(start, min(n, start + 500))]
        marks = ",".join(f"(${8 * k + 1}, ${8 * k + 2}, ${8 * k + 3}, ${8 * k + 4}, ${8 * k + 5}, ${8 * k + 6}, "
                         f"${8 * k + 7}, ${8 * k + 8})" for k in range(len(rows)))
        loop.run_until_complete(store.execute(
            "INSERT INTO micropay_fleet_invoices (payment_hash, node_id, node_label, amount_msat, description, "
            f"bolt11, expires_at, created_ms) VALUES {marks}", [v for row in rows for v in row]))
    parts_402["pool claim (SQLite, 32 a statement)"] = batched_us(
        loop, lambda i: fleet.claim_many(f"micropay-parts-{int(time.time() * 1000):012x}-", PRICE,   # as the sidecar
                                         "bench: GET /mint", now_ms=int(time.time() * 1000),
                                         payable_after=now, fresh_since_ms=0, node=node, n=2 * BATCH),
        n - n % (2 * BATCH), step=2 * BATCH)

    # A first-seen L402 credential on a pay-per-request route, and a Payment charge.
    auths = [format_authorization(macs[i], preimages[i].hex()) for i in idx]
    challenges = [pa.charge_challenge(binder, realm="bench", bolt11=BOLT11, payment_hash=hashes[i], price_msat=PRICE,
                                      expires_at=now + 600, opaque={"route": ROUTE, "token": token_ids[i].hex()},
                                      description="bench: GET /mint") for i in idx]
    credentials = [pa.format_credential(challenges[i], preimages[i].hex()) for i in idx]
    receipt = {"v": 1, "type": "request", "service": "bench", "payment_hash": hashes[0], "token_id": "cd" * 32,
               "method": "GET", "path": PATH, "credits_remaining": 0, "ts": now}
    parts_l402: dict[str, float] = {}
    tokens.forget_cached()
    parts_l402["verify the credential (first seen)"] = per_op_us(lambda i: tokens.verify_header(auths[i], "GET", PATH),
                                                                 idx)
    parts_l402["debit its credit (SQLite, 16 a batch)"] = batched_us(
        loop, lambda i: asyncio.gather(*(l402.debit_credit(token_ids[j].hex(), 1) for j in range(i, min(n, i + BATCH)))), n)
    def receipt_json(i: int) -> bytes:                  # as the gate writes it (Gate._request_receipt)
        return request_receipt_json(pubkey=signer.pubkey_hex, service="bench", payment_hash=hashes[i],
                                    token_id=token_ids[i].hex(), method="GET", path=PATH, credits_remaining=0,
                                    ts=now)
    parts_l402["receipt (one signature per 16)"] = best(
        lambda b: signer.sign_many([receipt_json(j) for j in range(b * BATCH, (b + 1) * BATCH)]),
        range(n // BATCH)) / BATCH
    json_alone = {"written out (the gate's)": best(receipt_json, idx),
                  "generic encoder (before)": best(lambda _: canonical_json(dict(receipt, pubkey=signer.pubkey_hex)),
                                                   idx)}
    parts_pay: dict[str, float] = {}
    parts_pay["parse and verify the credential"] = best(
        lambda i: pa.verify_charge(binder, pa.parse_credential(credentials[i]), realm="bench", now=now), idx)
    parts_pay["consume it (SQLite, 16 a batch)"] = batched_us(
        loop, lambda i: asyncio.gather(*(l402.consume_whole(hashlib.sha256(token_ids[j]).hexdigest())
                                   for j in range(i, min(n, i + BATCH)))), n)
    parts_pay["Payment-Receipt"] = best(lambda i: pa.receipt(challenges[i].id, hashes[i], now), idx)
    loop.run_until_complete(store.close())
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.rmtree(key_dir, ignore_errors=True)

    print(f"bare aiohttp 402, whole request: {bare_us:6.1f} us CPU ({rate:.0f} responses/s, 16 connections)")
    for title, parts, goal in (("402 from the pool, SQLite", parts_402, 60), ("first-seen L402, pay per request",
                                                                              parts_l402, 50),
                               ("Payment charge", parts_pay, 70)):
        print(f"\n{title} (goal: the gate adds <= {goal} us over bare)")
        for name, us in parts.items():
            print(f"  {name:46}: {us:6.1f} us   {us / bare_us:5.2f}x bare")
        total = sum(parts.values())
        print(f"  {'sum of the parts alone':46}: {total:6.1f} us   {total / bare_us:5.2f}x bare   "
              f"({total / goal:.2f}x the goal)")
    print("\nof the receipt, its JSON alone: " + ", ".join(f"{k} {v:.2f} us" for k, v in json_alone.items()))
    print(f"\n(n = {n}; wall time per item where a part has no state, least of 3 passes; the store's parts in process CPU time, its worker thread included)")


if __name__ == "__main__":
    main()
