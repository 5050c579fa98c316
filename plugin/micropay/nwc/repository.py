"""The NWC service's statements over the Store port. Spending is reserved before paying:
one transaction bumps the connection's row (serialising its spenders, in one process or
several), checks the period's room, and inserts the payment as 'sending'. What counts
against a budget: paid payments at amount + fee, sending ones at amount + fee reserve."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Sequence

from ..store.base import Step, Store


class PayStatus(enum.StrEnum):
    SENDING = "sending"
    PAID = "paid"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Connection:
    id: str
    name: str
    service_pubkey: str
    client_pubkey: str
    methods: tuple[str, ...]
    budget_msat: int
    budget_period: str
    max_fee_msat: int
    expires_at: int | None
    created_at: int
    revoked_at: int | None

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> "Connection":
        return cls(r[0], r[1], r[2], r[3], tuple(r[4].split()), int(r[5]), r[6], int(r[7]),
                   None if r[8] is None else int(r[8]), int(r[9]), None if r[10] is None else int(r[10]))


@dataclass(frozen=True, slots=True)
class NwcPayment:
    request_id: str
    connection_id: str
    kind: str                  # "invoice" | "keysend"
    destination: str           # the invoice, or the keysend's node id
    payment_hash: str | None
    label: str
    sendpays_start: int
    amount_msat: int
    fee_reserve_msat: int
    fee_msat: int | None
    status: PayStatus
    preimage: str | None
    error: str | None
    description: str
    period_start: int
    encryption: str
    answered: bool
    lease_until: int
    created_at: int
    updated_at: int

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> "NwcPayment":
        return cls(r[0], r[1], r[2], r[3], r[4], r[5], int(r[6]), int(r[7]), int(r[8]),
                   None if r[9] is None else int(r[9]), PayStatus(r[10]), r[11], r[12], r[13], int(r[14]), r[15],
                   bool(r[16]), int(r[17]), int(r[18]), int(r[19]))


@dataclass(frozen=True, slots=True)
class NwcInvoice:
    payment_hash: str
    connection_id: str
    label: str
    bolt11: str
    amount_msat: int
    description: str
    created_at: int
    expires_at: int
    settled_at: int | None
    received_msat: int | None
    preimage: str | None

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> "NwcInvoice":
        return cls(r[0], r[1], r[2], r[3], int(r[4]), r[5], int(r[6]), int(r[7]),
                   None if r[8] is None else int(r[8]), None if r[9] is None else int(r[9]), r[10])


_C = ("id, name, service_pubkey, client_pubkey, methods, budget_msat, budget_period, max_fee_msat, expires_at, "
      "created_at, revoked_at")
_P = ("request_id, connection_id, kind, destination, payment_hash, label, sendpays_start, amount_msat, "
      "fee_reserve_msat, fee_msat, status, preimage, error, description, period_start, encryption, answered, "
      "lease_until, created_at, updated_at")
_I = ("payment_hash, connection_id, label, bolt11, amount_msat, description, created_at, expires_at, settled_at, "
      "received_msat, preimage")
ADD_CONNECTION = f"INSERT INTO micropay_nwc_connections ({_C}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,NULL)"
CONNECTION_BY = {f: f"SELECT {_C} FROM micropay_nwc_connections WHERE {f} = $1"
                 for f in ("id", "name", "service_pubkey")}
CONNECTIONS = f"SELECT {_C} FROM micropay_nwc_connections ORDER BY created_at, id"
REVOKE = ("UPDATE micropay_nwc_connections SET revoked_at = $2 WHERE (id = $1 OR name = $1) "
          "AND revoked_at IS NULL RETURNING id")
BUMP = "UPDATE micropay_nwc_connections SET spend_seq = spend_seq + 1 WHERE id = $1 AND revoked_at IS NULL RETURNING id"
USED = ("SELECT COALESCE(SUM(CASE WHEN status = 'paid' THEN amount_msat + COALESCE(fee_msat, 0) "
        "ELSE amount_msat + fee_reserve_msat END), 0) FROM micropay_nwc_payments "
        "WHERE connection_id = $1 AND period_start = $2 AND status <> 'failed'")
ROOM = (f"SELECT 1 WHERE ({USED}) + CAST($3 AS BIGINT) <= CAST($4 AS BIGINT)")
ADD_PAYMENT = (f"INSERT INTO micropay_nwc_payments ({_P}) VALUES "
               "($1,$2,$3,$4,$5,$6,$7,$8,$9,NULL,'sending',NULL,NULL,$10,$11,$12,0,$13,$14,$14) "
               "ON CONFLICT DO NOTHING RETURNING request_id")     # the same request, or a live payment of the invoice
PAYMENT_BY = {"request_id": f"SELECT {_P} FROM micropay_nwc_payments WHERE request_id = $1",
              # the live payment of an invoice if there is one, else its latest failed one
              "payment_hash": f"SELECT {_P} FROM micropay_nwc_payments WHERE payment_hash = $1 "
                              "ORDER BY CASE WHEN status = 'failed' THEN 1 ELSE 0 END, created_at DESC LIMIT 1"}
SET_HASH = "UPDATE micropay_nwc_payments SET payment_hash = $2 WHERE request_id = $1 AND payment_hash IS NULL"
FINISH = ("UPDATE micropay_nwc_payments SET status = $2, fee_msat = $3, preimage = $4, error = $5, updated_at = $6 "
          "WHERE request_id = $1 AND status = 'sending' RETURNING request_id")
ANSWERED = "UPDATE micropay_nwc_payments SET answered = 1 WHERE request_id = $1"
SENDING_DUE = (f"SELECT {_P} FROM micropay_nwc_payments WHERE status = 'sending' AND lease_until <= $1 "
               "ORDER BY lease_until LIMIT 100")
UNANSWERED_DUE = (f"SELECT {_P} FROM micropay_nwc_payments WHERE answered = 0 AND status <> 'sending' "
                  "AND lease_until <= $1 ORDER BY lease_until LIMIT 100")
CLAIM = ("UPDATE micropay_nwc_payments SET lease_until = $2 WHERE request_id = $1 AND answered = 0 "
         "AND lease_until <= $3 RETURNING request_id")
RELEASE_ALL = "UPDATE micropay_nwc_payments SET lease_until = 0 WHERE status = 'sending'"
RENEW = "UPDATE micropay_nwc_payments SET lease_until = $2 WHERE request_id = $1 AND answered = 0"
ADD_INVOICE = (f"INSERT INTO micropay_nwc_invoices ({_I}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,NULL,NULL,NULL) "
               "ON CONFLICT (payment_hash) DO NOTHING")
INVOICE_BY = {f: f"SELECT {_I} FROM micropay_nwc_invoices WHERE {f} = $1" for f in ("payment_hash", "label")}
SETTLE_INVOICE = ("UPDATE micropay_nwc_invoices SET settled_at = $2, received_msat = $3, preimage = $4 "
                  "WHERE label = $1 AND settled_at IS NULL RETURNING payment_hash")
# One connection's transactions, newest first: incoming invoices and outgoing payments.
TX_IN = (f"SELECT {_I} FROM micropay_nwc_invoices WHERE connection_id = $1 AND created_at >= $2 AND created_at <= $3 "
         "AND ($4 OR settled_at IS NOT NULL) ORDER BY created_at DESC LIMIT $5")
TX_OUT = (f"SELECT {_P} FROM micropay_nwc_payments WHERE connection_id = $1 AND created_at >= $2 "
          "AND created_at <= $3 AND ($4 OR status = 'paid') ORDER BY created_at DESC LIMIT $5")
SEE = ("INSERT INTO micropay_nwc_seen (request_id, connection_id, seen_at) VALUES ($1, $2, $3) "
       "ON CONFLICT (request_id) DO NOTHING RETURNING request_id")
FORGET_SEEN = "DELETE FROM micropay_nwc_seen WHERE seen_at < $1"


class NwcRepository:
    def __init__(self, store: Store) -> None:
        self.store = store

    # -- connections -----------------------------------------------------------------
    async def add_connection(self, c: Connection) -> None:
        await self.store.execute(ADD_CONNECTION, (c.id, c.name, c.service_pubkey, c.client_pubkey, " ".join(c.methods),
                                                  c.budget_msat, c.budget_period, c.max_fee_msat, c.expires_at,
                                                  c.created_at))

    async def connection(self, by: str, value: str) -> Connection | None:
        row = await self.store.fetchrow(CONNECTION_BY[by], (value,))
        return Connection.from_row(row) if row else None

    async def connections(self) -> list[Connection]:
        return [Connection.from_row(r) for r in await self.store.query(CONNECTIONS)]

    async def revoke(self, id_or_name: str, now: int) -> str | None:
        row = await self.store.fetchrow(REVOKE, (id_or_name, now))
        return row[0] if row else None

    async def used(self, connection_id: str, period_start: int) -> int:
        row = await self.store.fetchrow(USED, (connection_id, period_start))
        return int(row[0]) if row else 0

    # -- spending --------------------------------------------------------------------
    async def reserve(self, p: NwcPayment, budget_msat: int) -> bool | None:
        """Insert `p` as sending if the budget's period has room for amount + fee reserve.
        True: reserved; False: its request id is known already; None: no room (or the
        connection was revoked meanwhile)."""
        tx = await self.store.transaction([
            Step(BUMP, (p.connection_id,), required=True),
            Step(ROOM, (p.connection_id, p.period_start, p.amount_msat + p.fee_reserve_msat, budget_msat),
                 required=True),
            Step(ADD_PAYMENT, (p.request_id, p.connection_id, p.kind, p.destination, p.payment_hash, p.label,
                               p.sendpays_start, p.amount_msat, p.fee_reserve_msat, p.description, p.period_start,
                               p.encryption, p.lease_until, p.created_at)),
        ])
        if not tx.ok:
            return None
        return bool(tx.rows[2])

    async def payment(self, by: str, value: str) -> NwcPayment | None:
        row = await self.store.fetchrow(PAYMENT_BY[by], (value,))
        return NwcPayment.from_row(row) if row else None

    async def set_hash(self, request_id: str, payment_hash: str) -> None:
        await self.store.execute(SET_HASH, (request_id, payment_hash))

    async def finish(self, request_id: str, status: PayStatus, fee_msat: int | None, preimage: str | None,
                     error: str | None, now: int) -> bool:
        return await self.store.fetchrow(FINISH, (request_id, str(status), fee_msat, preimage, error, now)) is not None

    async def answered(self, request_id: str) -> None:
        await self.store.execute(ANSWERED, (request_id,))

    async def sending_due(self, now: int) -> list[NwcPayment]:
        """Payments left sending whose lease ran out (nobody works on them)."""
        return [NwcPayment.from_row(r) for r in await self.store.query(SENDING_DUE, (now,))]

    async def unanswered_due(self, now: int) -> list[NwcPayment]:
        """Finished payments whose answer was not sent, and nobody holds."""
        return [NwcPayment.from_row(r) for r in await self.store.query(UNANSWERED_DUE, (now,))]

    async def claim(self, request_id: str, lease_until: int, now: int) -> bool:
        return await self.store.fetchrow(CLAIM, (request_id, lease_until, now)) is not None

    async def release_all(self) -> None:
        """At start: the payments a previous process left sending are nobody's now (one
        process serves a node's NWC: its store is the plugin's own)."""
        await self.store.execute(RELEASE_ALL)

    async def renew(self, request_id: str, lease_until: int) -> None:
        await self.store.execute(RENEW, (request_id, lease_until))

    # -- invoices --------------------------------------------------------------------
    async def add_invoice(self, i: NwcInvoice) -> None:
        await self.store.execute(ADD_INVOICE, (i.payment_hash, i.connection_id, i.label, i.bolt11, i.amount_msat,
                                               i.description, i.created_at, i.expires_at))

    async def invoice(self, by: str, value: str) -> NwcInvoice | None:
        row = await self.store.fetchrow(INVOICE_BY[by], (value,))
        return NwcInvoice.from_row(row) if row else None

    async def settle_invoice(self, label: str, paid_at: int, received_msat: int, preimage: str) -> str | None:
        row = await self.store.fetchrow(SETTLE_INVOICE, (label, paid_at, received_msat, preimage))
        return row[0] if row else None

    async def transactions(self, connection_id: str, from_s: int, until_s: int, unpaid: bool,
                           limit: int) -> tuple[list[NwcInvoice], list[NwcPayment]]:
        args = (connection_id, from_s, until_s, unpaid, limit)
        return ([NwcInvoice.from_row(r) for r in await self.store.query(TX_IN, args)],
                [NwcPayment.from_row(r) for r in await self.store.query(TX_OUT, args)])

    # -- replays ---------------------------------------------------------------------
    async def see(self, request_id: str, connection_id: str, now: int) -> bool:
        """True the first time this request id is seen."""
        return await self.store.fetchrow(SEE, (request_id, connection_id, now)) is not None

    async def forget_seen(self, before: int) -> None:
        await self.store.execute(FORGET_SEEN, (before,))
