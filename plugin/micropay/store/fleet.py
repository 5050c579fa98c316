"""Fleet mode's tables: the nodes' heartbeats, the invoice pools their agents keep, and
the claims sidecars make on them (issue 20; docs/scaling.md).

A node agent (the plugin on each Core Lightning node) keeps, for each (amount,
description) that sidecars want, a pool of unpaid invoices of its node. A sidecar in
fleet mode claims one with one statement: the invoice is bound to the sidecar's own
label (`claim_label`, unique), so two claims can never get the same invoice, across
processes and machines, and a retried claim under the same label gets the same one.
Only nodes whose heartbeat is fresh are claimed from.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

from .base import Store, point
from .schema import Migration, Schema

# notification channels (PostgreSQL LISTEN/NOTIFY; everyone also polls)
SETTLED_CHANNEL = "micropay_fleet_settled"      # an agent recorded a settlement
ASKS_CHANNEL = "micropay_fleet_asks"            # a sidecar asked for an invoice on demand
ANSWERS_CHANNEL = "micropay_fleet_answers"      # an agent answered asks
QUEUED_CHANNEL = "micropay_fleet_queued"        # a sidecar queued a payment
PAID_CHANNEL = "micropay_fleet_paid"            # an agent finished queued payments

FLEET_SCHEMA = Schema("fleet", (
    Migration(1, "fleet mode: node heartbeats, wanted pools, pooled invoices and their claims", (
        """CREATE TABLE IF NOT EXISTS micropay_fleet_nodes (
            node_id TEXT PRIMARY KEY,
            network TEXT NOT NULL,
            heartbeat_ms BIGINT NOT NULL,
            inbound_msat BIGINT NOT NULL,
            outbound_msat BIGINT NOT NULL,
            pay_index BIGINT NOT NULL DEFAULT 0)""",
        """CREATE TABLE IF NOT EXISTS micropay_fleet_wants (
            amount_msat BIGINT NOT NULL,
            description TEXT NOT NULL,
            depth BIGINT NOT NULL,
            expiry_s BIGINT NOT NULL,
            asked_ms BIGINT NOT NULL,
            PRIMARY KEY (amount_msat, description))""",
        """CREATE TABLE IF NOT EXISTS micropay_fleet_invoices (
            payment_hash TEXT PRIMARY KEY,
            node_id TEXT NOT NULL,
            node_label TEXT NOT NULL UNIQUE,
            amount_msat BIGINT NOT NULL,
            description TEXT NOT NULL,
            bolt11 TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            created_ms BIGINT NOT NULL,
            claim_label TEXT UNIQUE,
            claimed_ms BIGINT)""",
        """CREATE INDEX IF NOT EXISTS micropay_fleet_invoices_ready
            ON micropay_fleet_invoices (amount_msat, description, node_id, expires_at)
            WHERE claim_label IS NULL""",
        # on-demand invoices (dynamic prices, purchases, amountless): a sidecar asks one
        # node, whose agent answers by adding the invoice already claimed under the label
        """CREATE TABLE IF NOT EXISTS micropay_fleet_asks (
            claim_label TEXT PRIMARY KEY,
            node_id TEXT NOT NULL,
            amount_msat BIGINT,
            description TEXT NOT NULL,
            expiry_s BIGINT NOT NULL,
            asked_ms BIGINT NOT NULL,
            answered_ms BIGINT,
            error TEXT)""",
        """CREATE INDEX IF NOT EXISTS micropay_fleet_asks_open
            ON micropay_fleet_asks (node_id, asked_ms) WHERE answered_ms IS NULL""",
        # paid invoices, in the order the agents recorded them: the sidecars' settlement feed
        """CREATE TABLE IF NOT EXISTS micropay_fleet_settlements (
            seq SERIAL_PK,
            payment_hash TEXT NOT NULL UNIQUE,
            node_id TEXT NOT NULL,
            claim_label TEXT,
            amount_msat BIGINT NOT NULL,
            preimage TEXT NOT NULL,
            paid_at BIGINT NOT NULL)""",
        # payments the web tier wants made (session refunds, payouts): only the node
        # agents pay, under their operator's caps, idempotent by key (the caller's label)
        """CREATE TABLE IF NOT EXISTS micropay_fleet_payments (
            key TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            bolt11 TEXT,
            destination TEXT,
            payment_hash TEXT,
            amount_msat BIGINT NOT NULL,
            amountless BIGINT NOT NULL,
            max_fee_msat BIGINT NOT NULL,
            state TEXT NOT NULL,
            node_id TEXT,
            node_label TEXT UNIQUE,
            sendpays_start BIGINT,
            lease_until_ms BIGINT NOT NULL,
            created_ms BIGINT NOT NULL,
            sent_ms BIGINT,
            done_ms BIGINT,
            preimage TEXT,
            fee_msat BIGINT,
            error TEXT)""",
        """CREATE INDEX IF NOT EXISTS micropay_fleet_payments_todo
            ON micropay_fleet_payments (state, created_ms)""",
        """CREATE INDEX IF NOT EXISTS micropay_fleet_payments_hash
            ON micropay_fleet_payments (payment_hash)""",
    )),
    Migration(2, "an ask may want an invoice committing to sha256 of its description (LNURL-pay, zaps)", (
        "ALTER TABLE micropay_fleet_asks ADD COLUMN hashed BIGINT NOT NULL DEFAULT 0",
    )),
))


@dataclass(frozen=True, slots=True)
class NodeBeat:
    node_id: str
    network: str
    heartbeat_ms: int
    inbound_msat: int
    outbound_msat: int


@dataclass(frozen=True, slots=True)
class Want:
    amount_msat: int
    description: str
    depth: int
    expiry_s: int


@dataclass(frozen=True, slots=True)
class PooledInvoice:
    payment_hash: str
    node_id: str
    node_label: str
    amount_msat: int
    description: str
    bolt11: str
    expires_at: int
    claim_label: str | None


@dataclass(frozen=True, slots=True)
class FleetSettlement:
    seq: int                 # 0 until recorded
    payment_hash: str
    node_id: str
    claim_label: str | None  # None: a pool invoice paid although nobody claimed it
    amount_msat: int
    preimage: str
    paid_at: int


_COLUMNS = "payment_hash, node_id, node_label, amount_msat, description, bolt11, expires_at, claim_label"

BEAT = ("INSERT INTO micropay_fleet_nodes (node_id, network, heartbeat_ms, inbound_msat, outbound_msat) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (node_id) DO UPDATE SET network = excluded.network, "
        "heartbeat_ms = excluded.heartbeat_ms, inbound_msat = excluded.inbound_msat, "
        "outbound_msat = excluded.outbound_msat")
LIVE_NODES = point("SELECT node_id, network, heartbeat_ms, inbound_msat, outbound_msat FROM micropay_fleet_nodes "
                   "WHERE heartbeat_ms >= $1 ORDER BY node_id")          # a scan of one row per node
# Sidecars configured with different depths keep the deepest pool while its want is fresh
# (one with a smaller depth must not shrink another's pool); a want gone stale takes the
# new depth.
WANT = ("INSERT INTO micropay_fleet_wants (amount_msat, description, depth, expiry_s, asked_ms) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (amount_msat, description) DO UPDATE SET "
        "depth = CASE WHEN excluded.depth > micropay_fleet_wants.depth "
        "OR micropay_fleet_wants.asked_ms < excluded.asked_ms - $6 THEN excluded.depth "
        "ELSE micropay_fleet_wants.depth END, expiry_s = excluded.expiry_s, asked_ms = excluded.asked_ms")
WANT_TTL_MS = 900_000      # the agents' want_ttl_s
WANTS = "SELECT amount_msat, description, depth, expiry_s FROM micropay_fleet_wants WHERE asked_ms >= $1"
READY_COUNT = ("SELECT COUNT(*) FROM micropay_fleet_invoices WHERE node_id = $1 AND amount_msat = $2 "
               "AND description = $3 AND claim_label IS NULL AND expires_at > $4")
ADD = (f"INSERT INTO micropay_fleet_invoices ({_COLUMNS}, created_ms) "
       "VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8) ON CONFLICT (payment_hash) DO NOTHING")
BY_CLAIM = point(f"SELECT {_COLUMNS} FROM micropay_fleet_invoices WHERE claim_label = $1")
# One statement binds one unclaimed invoice of one node to the claimer's label. The
# invoice must stay payable for `min_left` more seconds, and its node must be live and
# have reported the inbound liquidity to receive it. Asking for one node at a time lets
# the (node, price, expiry) index hand over the first row at once: ordering all nodes'
# invoices by expiry took a sort of the whole pool per claim (54 ms at 20,000 rows). The inner SELECT picks a
# candidate; `claim_label IS NULL` in the UPDATE makes a lost race update nothing (the
# claimer then tries again). PostgreSQL skips rows another claim has locked, so
# concurrent claimers take different invoices instead of queueing on one.
_CLAIM = ("UPDATE micropay_fleet_invoices SET claim_label = $1, claimed_ms = $2 WHERE payment_hash = ("
          "SELECT i.payment_hash FROM micropay_fleet_invoices i JOIN micropay_fleet_nodes n "
          "ON n.node_id = i.node_id WHERE i.node_id = $7 AND i.amount_msat = $3 AND i.description = $4 "
          "AND i.claim_label IS NULL AND i.expires_at > $5 AND n.heartbeat_ms >= $6 AND n.inbound_msat >= $3 "
          "ORDER BY i.expires_at LIMIT 1{lock}) "
          f"AND claim_label IS NULL RETURNING {_COLUMNS}")
CLAIM = {"sqlite": point(_CLAIM.format(lock="")), "postgresql": _CLAIM.format(lock=" FOR UPDATE OF i SKIP LOCKED")}
# A sidecar's reserve (lightning/fleet.py): up to $8 invoices of one node bound at once,
# each to the label `$1 || payment_hash`, so one statement serves many 402s.
_CLAIM_MANY = ("UPDATE micropay_fleet_invoices SET claim_label = $1 || payment_hash, claimed_ms = $2 "
               "WHERE {key} IN (SELECT i.{key} FROM micropay_fleet_invoices i "
               "JOIN micropay_fleet_nodes n ON n.node_id = i.node_id WHERE i.node_id = $7 AND i.amount_msat = $3 "
               "AND i.description = $4 AND i.claim_label IS NULL AND i.expires_at > $5 AND n.heartbeat_ms >= $6 "
               "AND n.inbound_msat >= $3 ORDER BY i.expires_at LIMIT $8{lock}){outer} "
               f"RETURNING {_COLUMNS}")
# SQLite runs the statement inside its one writer's transaction, so the inner SELECT's
# `claim_label IS NULL` already holds; repeating it outside made SQLite walk the
# claim_label index over every unclaimed row (120 ms at 100,000 rows, EXPLAIN QUERY PLAN).
# On SQLite the rows are named by rowid: by payment hash, each one was looked up again in
# the primary key's index before its update (8.8 against 7.2 us a claimed row at 20,000
# pooled; docs/performance.md, fifteenth session). PostgreSQL has no stable row id.
CLAIM_MANY = {"sqlite": _CLAIM_MANY.format(key="rowid", lock="", outer=""),
              "postgresql": _CLAIM_MANY.format(key="payment_hash", lock=" FOR UPDATE OF i SKIP LOCKED",
                                               outer=" AND claim_label IS NULL")}
# A claim of up to POINT_CLAIM_MAX rows walks that many entries of the (node, price,
# expiry) index and took 1.4-2.2 ms at the median on SQLite in a burst of fleet 402s (at
# most 3 ms in two runs, one of 11 ms in another), so it may run on the event loop's
# thread while the worker is idle, one claim per batch there (base.point, ranged): handing
# it to the worker costs more, a busy loop and the worker taking turns with the GIL. A
# larger claim (a grown reserve of a large `reserve`) runs on the worker: the same
# statement under another text, which base.point does not know.
POINT_CLAIM_MAX = 256
CLAIM_MANY_LARGE = {dialect: sql + " /* more than POINT_CLAIM_MAX rows */" for dialect, sql in CLAIM_MANY.items()}
point(CLAIM_MANY["sqlite"], ranged=True)
# A reserve given back at shutdown: only rows still bound to that exact label, never paid.
RELEASE = ("UPDATE micropay_fleet_invoices SET claim_label = NULL, claimed_ms = NULL WHERE claim_label IN ({labels}) "
           "AND NOT EXISTS (SELECT 1 FROM micropay_fleet_settlements s "
           "WHERE s.payment_hash = micropay_fleet_invoices.payment_hash) RETURNING payment_hash")
RELEASE_CHUNK = 200
# Unclaimed invoices that will soon expire leave the pool: the agent takes them out here,
# then deletes them from its node. (A pool nobody wants any more is not refilled, and
# empties this way within its invoices' expiry.)
STALE = ("SELECT payment_hash, node_label FROM micropay_fleet_invoices WHERE node_id = $1 "
         "AND claim_label IS NULL AND expires_at <= $2 ORDER BY expires_at LIMIT $3")
DROP = "DELETE FROM micropay_fleet_invoices WHERE payment_hash = $1 AND claim_label IS NULL RETURNING payment_hash"


@dataclass(frozen=True, slots=True)
class QueuedPayment:
    key: str
    kind: str                # "refund", "payout", ...
    subject: str             # whom the per-subject cap counts (a player), or ""
    bolt11: str | None
    destination: str | None  # a node id, for keysend
    payment_hash: str | None
    amount_msat: int         # to deliver
    amountless: bool         # the invoice names no amount: pay amount_msat
    max_fee_msat: int
    state: str = "queued"    # queued | leased | sending | paid | failed
    node_id: str | None = None
    node_label: str | None = None
    sendpays_start: int | None = None
    created_ms: int = 0
    sent_ms: int | None = None
    preimage: str | None = None
    fee_msat: int | None = None
    error: str | None = None


def _payment(row) -> QueuedPayment:
    (key, kind, subject, bolt11, dest, h, amount, amountless, fee, state, node, label, start, created, sent,
     preimage, fee_paid, error) = row
    return QueuedPayment(key, kind, subject, bolt11, dest, h, int(amount), bool(amountless), int(fee), state, node,
                         label, None if start is None else int(start), int(created),
                         None if sent is None else int(sent), preimage, None if fee_paid is None else int(fee_paid),
                         error)


class FleetRepository:
    def __init__(self, store: Store) -> None:
        self.store = store
        dialect = "postgresql" if store.url.startswith(("postgresql:", "postgres:")) else "sqlite"
        self.claim_sql, self.lease_sql = CLAIM[dialect], LEASE[dialect]
        self.claim_many_sql, self.claim_many_large_sql = CLAIM_MANY[dialect], CLAIM_MANY_LARGE[dialect]

    # -- the agent's side ------------------------------------------------------------
    async def heartbeat(self, node: NodeBeat) -> None:
        await self.store.execute(BEAT, (node.node_id, node.network, node.heartbeat_ms, node.inbound_msat,
                                        node.outbound_msat))

    async def wants(self, asked_since_ms: int) -> list[Want]:
        rows = await self.store.query(WANTS, (asked_since_ms,))
        return [Want(int(a), d, int(depth), int(e)) for a, d, depth, e in rows]

    async def ready_count(self, node_id: str, amount_msat: int, description: str, payable_after: int) -> int:
        row = await self.store.fetchrow(READY_COUNT, (node_id, amount_msat, description, payable_after))
        return int(row[0]) if row else 0

    async def add(self, invoice: PooledInvoice, now_ms: int) -> None:
        await self.store.execute(ADD, (invoice.payment_hash, invoice.node_id, invoice.node_label,
                                       invoice.amount_msat, invoice.description, invoice.bolt11,
                                       invoice.expires_at, now_ms))

    async def stale(self, node_id: str, expiring_before: int, limit: int) -> list[tuple[str, str]]:
        return [(h, label) for h, label in await self.store.query(STALE, (node_id, expiring_before, limit))]

    async def drop(self, payment_hash: str) -> bool:
        """Remove an unclaimed invoice from the pool; False if a claim took it first."""
        return bool(await self.store.query(DROP, (payment_hash,)))

    # -- the sidecar's side ----------------------------------------------------------
    async def want(self, want: Want, now_ms: int) -> None:
        await self.store.execute(WANT, (want.amount_msat, want.description, want.depth, want.expiry_s, now_ms,
                                        WANT_TTL_MS))

    async def live_nodes(self, fresh_since_ms: int) -> list[NodeBeat]:
        rows = await self.store.query(LIVE_NODES, (fresh_since_ms,))
        return [NodeBeat(n, net, int(hb), int(i), int(o)) for n, net, hb, i, o in rows]

    async def claim(self, label: str, amount_msat: int, description: str, *, now_ms: int, payable_after: int,
                    fresh_since_ms: int, nodes: list[str] | None = None, attempts: int = 8) -> PooledInvoice | None:
        """Bind one pooled invoice to `label` (idempotent: a label already bound gets its
        invoice again), from the first of `nodes` (default: every live node) whose pool
        has one. None when no pool has one for this amount and description."""
        if nodes is None:
            nodes = [n.node_id for n in await self.live_nodes(fresh_since_ms) if n.inbound_msat >= amount_msat]
        for node in nodes:
            for _ in range(attempts):
                try:
                    row = await self.store.fetchrow(self.claim_sql, (label, now_ms, amount_msat, description,
                                                                     payable_after, fresh_since_ms, node))
                except Exception:
                    # claim_label is unique: a label already bound (a retry) gets its invoice
                    found = await self.by_claim(label)
                    if found is None:
                        raise
                    return found
                if row is not None:
                    return _invoice(row)
                # nothing claimed: this pool is empty, or another claim won the row
                row = await self.store.fetchrow(READY_ANY, (amount_msat, description, payable_after,
                                                            fresh_since_ms, node))
                if row is None or not row[0]:
                    break
        return await self.by_claim(label)       # bound before (a retry on an empty pool), or None

    async def claim_many(self, label_prefix: str, amount_msat: int, description: str, *, now_ms: int,
                         payable_after: int, fresh_since_ms: int, node: str, n: int) -> list[PooledInvoice]:
        """Bind up to `n` pooled invoices of `node` at once, each to `label_prefix` +
        its payment hash: a sidecar's reserve, handed out one per 402 from memory."""
        sql = self.claim_many_sql if n <= POINT_CLAIM_MAX else self.claim_many_large_sql
        rows = await self.store.query(sql, (label_prefix, now_ms, amount_msat, description,
                                            payable_after, fresh_since_ms, node, n))
        invoices = [_invoice(r) for r in rows]
        invoices.sort(key=_EXPIRES_AT)
        return invoices

    async def release(self, labels: list[str]) -> int:
        """Give reserved invoices nobody was handed back to the pool (a sidecar stopping)."""
        released = 0
        for start in range(0, len(labels), RELEASE_CHUNK):
            chunk = labels[start:start + RELEASE_CHUNK]
            sql = RELEASE.format(labels=", ".join(f"${i + 1}" for i in range(len(chunk))))
            released += len(await self.store.query(sql, tuple(chunk)))
        return released

    # -- on demand ---------------------------------------------------------------------
    async def ask(self, label: str, node_id: str, amount_msat: int | None, description: str, expiry_s: int,
                  now_ms: int, *, hash_description: bool = False) -> None:
        await self.store.execute(ASK, (label, node_id, amount_msat, description, expiry_s, now_ms,
                                       int(hash_description)))

    async def open_asks(self, node_id: str, asked_since_ms: int,
                        limit: int) -> list[tuple[str, int | None, str, int, bool]]:
        """(claim label, amount or None, description, expiry, whether the invoice commits to
        the description's hash) of each open ask of this node, oldest first."""
        return [(lbl, None if a is None else int(a), d, int(e), bool(h))
                for lbl, a, d, e, h in await self.store.query(OPEN_ASKS, (node_id, asked_since_ms, limit))]

    async def answer(self, label: str, invoice: PooledInvoice | None, now_ms: int, error: str | None = None) -> None:
        """The agent's answer to an ask: the invoice, bound to the asker's label at once."""
        if invoice is not None:
            await self.store.execute(ADD_CLAIMED, (invoice.payment_hash, invoice.node_id, invoice.node_label,
                                                   -1 if invoice.amount_msat is None else invoice.amount_msat,
                                                   invoice.description, invoice.bolt11, invoice.expires_at,
                                                   label, now_ms))
        await self.store.execute(ANSWER, (label, now_ms, error))

    async def ask_error(self, label: str) -> str | None:
        row = await self.store.fetchrow(ASK_ERROR, (label,))
        return row[0] if row else None

    # -- settlements -----------------------------------------------------------------
    async def by_node_label(self, node_label: str) -> PooledInvoice | None:
        row = await self.store.fetchrow(BY_NODE_LABEL, (node_label,))
        return _invoice(row) if row else None

    async def by_hash(self, payment_hash: str) -> PooledInvoice | None:
        row = await self.store.fetchrow(BY_HASH, (payment_hash,))
        return _invoice(row) if row else None

    async def pay_index(self, node_id: str) -> int:
        """How far the agent of this node has recorded its node's settlements."""
        row = await self.store.fetchrow(CURSOR, (node_id,))
        return int(row[0]) if row else 0

    async def advance_pay_index(self, node_id: str, pay_index: int) -> None:
        await self.store.execute(ADVANCE, (node_id, pay_index))

    async def record_settlement(self, s: "FleetSettlement") -> None:
        """Idempotent by payment hash: an agent replaying its node's settlements after a
        restart adds nothing twice."""
        await self.store.execute(SETTLED, (s.payment_hash, s.node_id, s.claim_label, s.amount_msat, s.preimage,
                                           s.paid_at))

    async def settlements_after(self, seq: int, limit: int = 500) -> list["FleetSettlement"]:
        return [FleetSettlement(int(q), h, n, c, int(a), p, int(t))
                for q, h, n, c, a, p, t in await self.store.query(FEED, (seq, limit))]

    # -- the payment queue -------------------------------------------------------------
    async def enqueue(self, p: QueuedPayment, now_ms: int) -> QueuedPayment:
        """Queue a payment, or find the one already queued under its key (idempotent:
        the first request's terms stand)."""
        await self.store.execute(ENQUEUE, (p.key, p.kind, p.subject, p.bolt11, p.destination, p.payment_hash,
                                           p.amount_msat, int(p.amountless), p.max_fee_msat, now_ms))
        found = await self.payment(p.key)
        assert found is not None
        return found

    async def payment(self, key: str) -> QueuedPayment | None:
        row = await self.store.fetchrow(PAYMENT, (key,))
        return _payment(row) if row else None

    async def payment_by_hash(self, payment_hash: str) -> QueuedPayment | None:
        row = await self.store.fetchrow(PAYMENT_BY_HASH, (payment_hash,))
        return _payment(row) if row else None

    async def lease(self, node_id: str, now_ms: int, lease_ms: int, carry_msat: int,
                    max_amount_msat: int | None = None, max_fee_msat: int | None = None,
                    subjects: bool = True, fee_grace_ms: int = 0) -> QueuedPayment | None:
        """The oldest queued payment whose amount is at most `max_amount_msat` (the node's
        cap per payment) and whose amount and fee fit in `carry_msat` (its outbound
        liquidity, what is left of its day), counting the fee the node would pay: the
        payment's allowance, or `max_fee_msat` (its fee cap) if that is lower; one whose
        allowance is over `max_fee_msat` only once it has been queued for `fee_grace_ms`
        (a node whose cap covers it may take it first). With `subjects` False, only
        payments without a subject (refunds). Leased to `node_id`."""
        row = await self.store.fetchrow(self.lease_sql, (
            node_id, now_ms + lease_ms, now_ms, carry_msat,
            carry_msat if max_amount_msat is None else max_amount_msat,
            carry_msat if max_fee_msat is None else max_fee_msat, subjects, now_ms - fee_grace_ms))
        return _payment(row) if row else None

    async def spent(self, node_id: str, since_ms: int, subject: str = "") -> int:
        row = await self.store.fetchrow(SPENT, (node_id, since_ms, subject))
        return int(row[0]) if row else 0

    async def sending(self, key: str, node_id: str, node_label: str, sendpays_start: int, now_ms: int) -> bool:
        return bool(await self.store.query(SENDING, (key, node_id, node_label, sendpays_start, now_ms)))

    async def done(self, key: str, node_id: str, state: str, now_ms: int, *, preimage: str | None = None,
                   fee_msat: int | None = None, error: str | None = None, payment_hash: str | None = None) -> bool:
        assert state in ("paid", "failed")
        return bool(await self.store.query(DONE, (key, node_id, state, preimage, fee_msat, error, now_ms,
                                                  payment_hash)))

    async def requeue(self, key: str, node_id: str) -> bool:
        """A payment recorded as sending that never reached the node goes back to the queue."""
        return bool(await self.store.query(REQUEUE, (key, node_id)))

    async def sending_of(self, node_id: str) -> list[QueuedPayment]:
        return [_payment(r) for r in await self.store.query(SENDING_OF, (node_id,))]

    async def by_claim(self, label: str) -> PooledInvoice | None:
        row = await self.store.fetchrow(BY_CLAIM, (label,))
        return _invoice(row) if row else None

    async def forget(self, wants_before_s: int, invoices_before_s: int, asks_before_s: int,
                     settlements_before_s: int, limit: int) -> None:
        """Retention: wants nobody renewed, claimed invoices long expired (their payment,
        if any, is in the feed), asks a day old (agents leave an ask after a minute, so one
        unanswered by then never is), and old settlements; at most `limit`
        rows of each per call."""
        await self.store.execute(FORGET_WANTS, (wants_before_s * 1000,))
        await self.store.execute(FORGET_INVOICES, (invoices_before_s, limit))
        await self.store.execute(FORGET_ASKS, (asks_before_s * 1000, limit))
        await self.store.execute(FORGET_SETTLEMENTS, (settlements_before_s, limit))

    # -- what an operator watches (/metrics) -------------------------------------------
    async def stats(self, now_ms: int) -> "FleetStats":
        nodes = [NodeBeat(n, net, int(hb), int(i), int(o))
                 for n, net, hb, i, o in await self.store.query(ALL_NODES)]
        ready = {n: int(c) for n, c in await self.store.query(POOL_READY, (now_ms // 1000,))}
        queue = {s: (int(c), int(oldest)) for s, c, oldest in await self.store.query(QUEUE_STATS)}
        asks = await self.store.fetchrow(OPEN_ASK_STATS, (now_ms - 60_000,))
        return FleetStats(nodes, ready, queue, int(asks[0]) if asks else 0,
                          None if not asks or asks[1] is None else int(asks[1]))


@dataclass(frozen=True)
class FleetStats:
    nodes: list[NodeBeat]
    ready: dict[str, int]                      # node -> unclaimed, unexpired pooled invoices
    queue: dict[str, tuple[int, int]]          # state -> (payments, oldest created_ms)
    open_asks: int
    oldest_ask_ms: int | None


FORGET_WANTS = "DELETE FROM micropay_fleet_wants WHERE asked_ms < $1"
FORGET_INVOICES = ("DELETE FROM micropay_fleet_invoices WHERE payment_hash IN (SELECT payment_hash FROM "
                   "micropay_fleet_invoices WHERE claim_label IS NOT NULL AND expires_at < $1 LIMIT $2)")
FORGET_ASKS = ("DELETE FROM micropay_fleet_asks WHERE claim_label IN (SELECT claim_label FROM micropay_fleet_asks "
               "WHERE asked_ms < $1 LIMIT $2)")
FORGET_SETTLEMENTS = ("DELETE FROM micropay_fleet_settlements WHERE seq IN (SELECT seq FROM "
                      "micropay_fleet_settlements WHERE paid_at < $1 ORDER BY seq LIMIT $2)")
ALL_NODES = "SELECT node_id, network, heartbeat_ms, inbound_msat, outbound_msat FROM micropay_fleet_nodes"
POOL_READY = ("SELECT node_id, COUNT(*) FROM micropay_fleet_invoices WHERE claim_label IS NULL AND expires_at > $1 "
              "GROUP BY node_id")
QUEUE_STATS = ("SELECT state, COUNT(*), MIN(created_ms) FROM micropay_fleet_payments "
               "WHERE state IN ('queued', 'leased', 'sending') GROUP BY state")
OPEN_ASK_STATS = "SELECT COUNT(*), MIN(asked_ms) FROM micropay_fleet_asks WHERE answered_ms IS NULL AND asked_ms >= $1"


ASK = ("INSERT INTO micropay_fleet_asks (claim_label, node_id, amount_msat, description, expiry_s, asked_ms, "
       "hashed) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (claim_label) DO NOTHING")
OPEN_ASKS = ("SELECT claim_label, amount_msat, description, expiry_s, hashed FROM micropay_fleet_asks "
             "WHERE node_id = $1 AND answered_ms IS NULL AND asked_ms >= $2 ORDER BY asked_ms LIMIT $3")
ANSWER = ("UPDATE micropay_fleet_asks SET answered_ms = $2, error = $3 WHERE claim_label = $1 "
          "AND answered_ms IS NULL")
ASK_ERROR = "SELECT error FROM micropay_fleet_asks WHERE claim_label = $1 AND answered_ms IS NOT NULL"
# any conflict (the hash, or the label of an answer retried after it was written) adds nothing
ADD_CLAIMED = (f"INSERT INTO micropay_fleet_invoices ({_COLUMNS}, created_ms, claimed_ms) "
               "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) ON CONFLICT DO NOTHING")
BY_NODE_LABEL = f"SELECT {_COLUMNS} FROM micropay_fleet_invoices WHERE node_label = $1"
SETTLED = ("INSERT INTO micropay_fleet_settlements (payment_hash, node_id, claim_label, amount_msat, preimage, "
           "paid_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (payment_hash) DO NOTHING")
FEED = point("SELECT seq, payment_hash, node_id, claim_label, amount_msat, preimage, paid_at "
             "FROM micropay_fleet_settlements WHERE seq > $1 ORDER BY seq LIMIT $2", ranged=True)
CURSOR = "SELECT pay_index FROM micropay_fleet_nodes WHERE node_id = $1"
ADVANCE = "UPDATE micropay_fleet_nodes SET pay_index = $2 WHERE node_id = $1 AND pay_index < $2"
BY_HASH = f"SELECT {_COLUMNS} FROM micropay_fleet_invoices WHERE payment_hash = $1"

_PCOLS = ("key, kind, subject, bolt11, destination, payment_hash, amount_msat, amountless, max_fee_msat, state, "
          "node_id, node_label, sendpays_start, created_ms, sent_ms, preimage, fee_msat, error")
ENQUEUE = ("INSERT INTO micropay_fleet_payments (key, kind, subject, bolt11, destination, payment_hash, amount_msat, "
           "amountless, max_fee_msat, state, lease_until_ms, created_ms) "
           "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'queued', 0, $10) ON CONFLICT (key) DO NOTHING")
PAYMENT = f"SELECT {_PCOLS} FROM micropay_fleet_payments WHERE key = $1"
PAYMENT_BY_HASH = (f"SELECT {_PCOLS} FROM micropay_fleet_payments WHERE payment_hash = $1 "
                   "ORDER BY created_ms DESC LIMIT 1")
# A queued payment, or one whose lease ran out before it was sent, goes to one agent
# whose node can carry it: the amount within its cap per payment ($5), and the amount
# with the fee the node would pay (the allowance, or the node's fee cap $6 if lower)
# within its outbound liquidity and what is left of its day ($4). One whose fee allowance
# is over the node's fee cap is left to nodes whose cap covers it until it was queued
# before $8, then tried within this node's cap. A payment for a subject (a player's
# payout, a creator's tip share) only goes to a node with a cap per subject ($7); refunds
# have none.
_LEASE = ("UPDATE micropay_fleet_payments SET state = 'leased', node_id = $1, lease_until_ms = $2 "
          "WHERE key = (SELECT key FROM micropay_fleet_payments WHERE (state = 'queued' "
          "OR (state = 'leased' AND lease_until_ms < $3)) "
          "AND amount_msat + CASE WHEN max_fee_msat < $6 THEN max_fee_msat ELSE $6 END <= $4 "
          "AND amount_msat <= $5 AND (subject = '' OR $7) AND (max_fee_msat <= $6 OR created_ms < $8) "
          "ORDER BY created_ms LIMIT 1{lock}) "
          f"AND (state = 'queued' OR (state = 'leased' AND lease_until_ms < $3)) RETURNING {_PCOLS}")
LEASE = {"sqlite": _LEASE.format(lock=""), "postgresql": _LEASE.format(lock=" FOR UPDATE SKIP LOCKED")}
# What this node has paid or has out, per subject and in all, since a time (the caps).
SPENT = ("SELECT COALESCE(SUM(amount_msat + COALESCE(fee_msat, max_fee_msat)), 0) FROM micropay_fleet_payments "
         "WHERE node_id = $1 "
         "AND state IN ('sending', 'paid') AND sent_ms >= $2 AND ($3 = '' OR subject = $3)")
# Recorded before the node is asked to pay: the label and where its records stood.
SENDING = ("UPDATE micropay_fleet_payments SET state = 'sending', node_label = $3, sendpays_start = $4, "
           "sent_ms = $5 WHERE key = $1 AND node_id = $2 AND state = 'leased' RETURNING key")
DONE = ("UPDATE micropay_fleet_payments SET state = $3, preimage = $4, fee_msat = $5, error = $6, done_ms = $7, "
        "payment_hash = COALESCE($8, payment_hash) WHERE key = $1 AND node_id = $2 AND state IN ('leased', 'sending') "
        "RETURNING key")
REQUEUE = ("UPDATE micropay_fleet_payments SET state = 'queued', node_id = NULL, node_label = NULL, "
           "sendpays_start = NULL, sent_ms = NULL, lease_until_ms = 0 WHERE key = $1 AND node_id = $2 "
           "AND state = 'sending' RETURNING key")
SENDING_OF = f"SELECT {_PCOLS} FROM micropay_fleet_payments WHERE node_id = $1 AND state = 'sending'"

READY_ANY = ("SELECT EXISTS (SELECT 1 FROM micropay_fleet_invoices i JOIN micropay_fleet_nodes n "
             "ON n.node_id = i.node_id WHERE i.node_id = $5 AND i.amount_msat = $1 AND i.description = $2 "
             "AND i.claim_label IS NULL AND i.expires_at > $3 AND n.heartbeat_ms >= $4 AND n.inbound_msat >= $1)")


_EXPIRES_AT = operator.attrgetter("expires_at")


def _invoice(row) -> PooledInvoice:
    h, node, node_label, amount, desc, bolt11, expires_at, claim = row
    return PooledInvoice(h, node, node_label, int(amount), desc, bolt11, int(expires_at), claim)
