"""What a Payment charge's (or a credit debit's) ledger insert costs on SQLite with the
token ids micropay mints, against the same insert with uniformly random ids, in the
same run.

    python bench/bench_ledger.py [--n 64000] [--rows 200000] [--late 5000] [--batch 16]

The ledger (`micropay_credits`, keyed by token id) already holds `rows` tokens. Each
insert is the store's own CONSUME_WHOLE statement, 16 to a transaction as the gate's
group commits make them, with a passive WAL checkpoint every 100 transactions as the
store's worker runs them; CPU is this process's (statements and checkpoints). With
random ids every insert dirties a random leaf page of the index, which the commit
writes to the WAL and the checkpoint copies back; ids that start with the time
(l402/tokens.py `new_token_id`) land near the index's right edge.

A token is minted with its 402 and reaches the ledger only when it is paid and
presented, so the ledger takes ids out of minting order. The minted ids are inserted
twice: in minting order (the best case), and with each one late by up to `late` other
ids (uniformly; 5,000 is a gate answering 100 402s a second whose clients take up to
50 s to pay).

Each case runs on both layouts of the table: the rowid table of release 0.1.0 (the rows
in one B-tree, the token id's index in another) and the WITHOUT ROWID table core schema
step 7 made of it (one B-tree keyed by token id). The file's size per token is printed
beside the CPU. `--batch 7` is what 16 wrk connections make of a first-seen paid request
on a gate (bench_paid.py).
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sqlite3
import tempfile
import time

from micropay.l402.tokens import new_token_id
from micropay.store.core import CORE_SCHEMA
from micropay.store.l402 import CONSUME_WHOLE

BATCH = 16
CHECKPOINT_EVERY = 100


def ledger_table(layout: str) -> str:
    """The ledger's table as the store's own schema creates it: "rowid" (step 1) or
    "without rowid" (SQLite's step 7, made under another name and renamed)."""
    if layout == "rowid":
        return next(s for m in CORE_SCHEMA.migrations for s in m.statements
                    if "TABLE IF NOT EXISTS micropay_credits" in s)
    return next(s for m in CORE_SCHEMA.migrations for s in m.sqlite_only
                if "WITHOUT ROWID" in s).replace("micropay_credits_by_token", "micropay_credits")


def minted(n: int, late: int) -> list[bytes]:
    """n ids minted in a row, each inserted up to `late` places after its turn."""
    ids = [new_token_id() for _ in range(n)]
    if not late:
        return ids
    rng = random.Random(7)
    return [i for _, i in sorted(((k + rng.uniform(0, late), i) for k, i in enumerate(ids)),
                                 key=lambda pair: pair[0])]


def run(ids: list[bytes], rows: int, layout: str, per_batch: int) -> tuple[float, float]:
    """Microseconds of CPU per insert (checkpoints included), and the file's bytes per token."""
    d = tempfile.mkdtemp(prefix="micropay-bench-ledger-")
    try:
        conn = sqlite3.connect(f"{d}/ledger.sqlite3", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(ledger_table(layout))
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO micropay_credits (token_id, remaining) VALUES (?, 1)",
                         ((os.urandom(32).hex(),) for _ in range(rows)))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        sql = re.sub(r"\$(\d+)", r"?\1", CONSUME_WHOLE)
        keys = [i.hex() for i in ids]
        batches = len(keys) // per_batch
        start = time.process_time()
        for batch in range(batches):
            conn.execute("BEGIN")
            for key in keys[batch * per_batch:(batch + 1) * per_batch]:
                assert conn.execute(sql, (key,)).fetchall() == [(0,)]
            conn.execute("COMMIT")
            if (batch + 1) % CHECKPOINT_EVERY == 0:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        used = time.process_time() - start
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        size = os.path.getsize(f"{d}/ledger.sqlite3")
        return used / (batches * per_batch) * 1e6, size / (rows + batches * per_batch)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64000, help="inserts measured per run")
    ap.add_argument("--rows", type=int, default=200000, help="tokens in the ledger before the run")
    ap.add_argument("--late", type=int, default=5000, help="how many later ids one may be inserted after")
    ap.add_argument("--batch", type=int, default=BATCH, help="inserts to a transaction")
    a = ap.parse_args()
    cases = {"random token ids (baseline)": lambda: [os.urandom(32) for _ in range(a.n)],
             "minted ids, in minting order": lambda: minted(a.n, 0),
             f"minted ids, up to {a.late} late": lambda: minted(a.n, a.late)}
    layouts = ("rowid", "without rowid")
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {(c, lay): [] for c in cases for lay in layouts}
    for _ in range(2):                     # alternating, so drift hits all alike
        for name, ids in cases.items():
            for layout in layouts:
                runs[name, layout].append(run(ids(), a.rows, layout, a.batch))
    base = min(us for us, _ in runs["random token ids (baseline)", "rowid"])
    for (name, layout), results in runs.items():
        us = [u for u, _ in results]
        print(f"{name:30} {layout:13}: {min(us):6.1f} us CPU per insert  ratio {min(us) / base:.2f}x  "
              f"{results[0][1]:5.0f} bytes per token  (runs: {', '.join(f'{x:.1f}' for x in us)})")
    print(f"({a.n} inserts into a ledger of {a.rows} tokens, {a.batch} to a transaction, a passive "
          f"checkpoint every {CHECKPOINT_EVERY} transactions; least of 2 runs; baseline: random ids, rowid table)")


if __name__ == "__main__":
    main()
