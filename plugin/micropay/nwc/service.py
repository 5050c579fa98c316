"""The NWC wallet service for one node: connections with budgets, and the requests their
clients send through relays.

Each connection has a service key of its own (derived from the plugin's NWC master
secret and the connection id, so no key is stored) and a client key whose secret is
handed out once, in the URI, and never kept. A request is answered only when it is
addressed to a live connection's service key and signed by that connection's client key;
anything else gets no answer, except a revoked or expired connection's client, which is
told UNAUTHORIZED.

Money: a payment is reserved against the connection's budget (amount + the fee cap) in
the same transaction that records it as 'sending', before the node is asked to pay; the
budget then holds what it will cost at most. When the node's answer is not seen (a crash,
a restart, a lost connection) the payment stays 'sending' and the resume loop settles it
from the node's own record (lightning/outcome.py), never by paying again: complete ->
paid, failed -> failed, pending -> wait, no record once no attempt can still be running
-> failed. The request is then answered once. Replays: a request id is handled once
(kept for SEEN_KEEP_S), and a request older than MAX_AGE_S or past its `expiration` tag is
ignored.
"""
from __future__ import annotations

import asyncio
import calendar
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import time
from typing import Any, Awaitable, Callable

from ..core.errors import MicropayError, PaymentFailed, PaymentUnknown
from ..core.ratelimit import TokenBucket
from ..lightning.base import Node, Payment, Settlement
from ..lightning.outcome import OrphanWatch, Outcome
from ..nostr import nip04, nip44
from ..nostr.event import Event, sign_event
from ..nostr.keys import Keys, NostrError
from .protocol import (INFO, NIP04, NIP44, NOTIFICATION, NOTIFICATION_NIP04, NOTIFICATIONS, REQUEST, RESPONSE,
                       SPENDING, Code, ListTransactions, LookupInvoice, MakeInvoice, Method, NwcError, PayInvoice,
                       PayKeysend, parse_request, response_content)
from .repository import Connection, NwcInvoice, NwcPayment, NwcRepository, PayStatus
from .uri import NwcUri

log = logging.getLogger("micropay.nwc")
PERIODS = ("daily", "weekly", "monthly", "yearly", "never")
LABEL_PREFIX = "micropay-nwc-"
MAX_AGE_S = 600                  # a request older than this (by its created_at) is ignored
MAX_SKEW_S = 300                 # ... and one dated further ahead than this
ANSWER_FOR_S = 3600              # an answer no relay took is retried this long, then given up
SEEN_KEEP_S = 2 * MAX_AGE_S
LEASE_S, RENEW_EVERY_S = 120, 30
NOT_SENT_GRACE_S = 150           # longer than the node's retry window for one payment
MAX_INFLIGHT = 64                # requests handled at once; more are told RATE_LIMITED
DEFAULT_EXPIRY_S = 3600
MAX_LIST_JSON = 48_000           # characters of list_transactions results (NIP-44 and relays cap an event)
Publisher = Callable[[Event], Awaitable[bool]]


def period_start(period: str, now: float) -> int:
    """Where the budget period holding `now` began (UTC calendar periods; weeks start on
    Monday); 0 for a budget that never renews."""
    t = dt.datetime.fromtimestamp(int(now), dt.timezone.utc)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    start = {"daily": day, "weekly": day - dt.timedelta(days=day.weekday()), "monthly": day.replace(day=1),
             "yearly": day.replace(month=1, day=1)}.get(period)
    return 0 if start is None else calendar.timegm(start.timetuple())


def next_period(period: str, now: float) -> int | None:
    t = dt.datetime.fromtimestamp(period_start(period, now), dt.timezone.utc)
    nxt = {"daily": t + dt.timedelta(days=1), "weekly": t + dt.timedelta(days=7),
           "monthly": (t.replace(day=28) + dt.timedelta(days=4)).replace(day=1),
           "yearly": t.replace(year=t.year + 1)}.get(period)
    return None if nxt is None else calendar.timegm(nxt.timetuple())


class NwcService:
    def __init__(self, node: Node, repo: NwcRepository, master: bytes, relays: list[str], *,
                 publish: Publisher, node_info: Callable[[], Awaitable[dict[str, Any]]],
                 clock: Callable[[], float] = time.time, node_started_at: float | None = None,
                 requests_per_minute: int = 120) -> None:
        if len(master) != 32:
            raise ValueError("the NWC master secret is 32 bytes")
        self.node, self.repo, self._master, self.relays = node, repo, master, list(relays)
        self.publish, self.node_info, self.clock = publish, node_info, clock
        self.node_started_at = node_started_at
        self.bucket = TokenBucket(requests_per_minute)
        self._by_service: dict[str, Connection] = {}
        self._inflight: set[asyncio.Task[None]] = set()
        self._outcomes = OrphanWatch(node)
        self._told_limited: dict[str, float] = {}

    # -- keys and connections ------------------------------------------------------------
    def service_keys(self, connection_id: str) -> Keys:
        seed = hmac.new(self._master, b"micropay-nwc-service/" + connection_id.encode(), hashlib.sha256).digest()
        return Keys(seed)        # out of range for secp256k1 with probability ~2**-128

    async def load(self) -> None:
        """Read the connections (at start, and after each change)."""
        self._by_service = {c.service_pubkey: c for c in await self.repo.connections()}

    def live(self, c: Connection, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        return c.revoked_at is None and (c.expires_at is None or c.expires_at > now)

    def filters(self) -> list[dict[str, Any]]:
        """The subscription that brings this service its requests."""
        keys = sorted(pk for pk, c in self._by_service.items() if self.live(c))
        return [{"kinds": [REQUEST], "#p": keys or ["0" * 64], "since": int(self.clock()) - MAX_AGE_S}]

    async def create(self, name: str, *, budget_msat: int, budget_period: str, methods: tuple[str, ...],
                     max_fee_msat: int, expires_at: int | None = None) -> dict[str, Any]:
        if not self.relays:
            raise ValueError("no relay is configured for NWC (micropay-nwc-relay)")
        if budget_period not in PERIODS:
            raise ValueError(f"budget_period must be one of {', '.join(PERIODS)}")
        unknown = [m for m in methods if m not in Method.__members__.values()]
        if unknown or not methods:
            raise ValueError(f"methods must be some of {', '.join(Method)}; unknown: {', '.join(unknown) or 'none'}")
        now = int(self.clock())
        if expires_at is not None and expires_at <= now:
            raise ValueError("expires_at is in the past")
        cid = "nwc_" + os.urandom(8).hex()
        client = Keys.generate()
        conn = Connection(cid, name, self.service_keys(cid).pubkey, client.pubkey, tuple(dict.fromkeys(methods)),
                          budget_msat, budget_period, max_fee_msat, expires_at, now, None)
        await self.repo.add_connection(conn)
        await self.load()
        log.info("NWC connection %s (%s) created: budget %d msat %s", cid, name, budget_msat, budget_period)
        with contextlib.suppress(Exception):
            await self.publish(self.info_event(conn))
        uri = NwcUri(conn.service_pubkey, tuple(self.relays), client.secret)
        return {"uri": uri.text(), **await self.view(conn)}

    async def view(self, c: Connection) -> dict[str, Any]:
        now = self.clock()
        used = await self.repo.used(c.id, period_start(c.budget_period, now))
        state = "revoked" if c.revoked_at is not None else ("expired" if not self.live(c, now) else "active")
        return {"id": c.id, "name": c.name, "state": state, "methods": list(c.methods),
                "budget_msat": c.budget_msat, "budget_period": c.budget_period, "used_msat": used,
                "remaining_msat": max(0, c.budget_msat - used), "renews_at": next_period(c.budget_period, now),
                "max_fee_msat": c.max_fee_msat, "expires_at": c.expires_at, "created_at": c.created_at,
                "revoked_at": c.revoked_at, "service_pubkey": c.service_pubkey, "client_pubkey": c.client_pubkey}

    async def list(self) -> list[dict[str, Any]]:
        return [await self.view(c) for c in await self.repo.connections()]

    async def revoke(self, id_or_name: str) -> dict[str, Any] | None:
        cid = await self.repo.revoke(id_or_name, int(self.clock()))
        await self.load()
        if cid is None:
            return None
        log.info("NWC connection %s revoked", cid)
        c = await self.repo.connection("id", cid)
        return await self.view(c) if c else None

    def info_event(self, c: Connection) -> Event:
        methods = [m for m in c.methods] + ["notifications"]
        return sign_event(self.service_keys(c.id), INFO, " ".join(methods),
                          [["encryption", f"{NIP44} {NIP04}"], ["notifications", " ".join(NOTIFICATIONS)]])

    async def publish_info(self) -> None:
        for c in list(self._by_service.values()):
            if self.live(c):
                await self.publish(self.info_event(c))

    # -- requests ------------------------------------------------------------------------
    def on_event(self, sub_id: str, ev: Event) -> None:
        """From a relay: handled on a task of its own, so the relay's reader never waits."""
        if ev.kind != REQUEST or len(self._inflight) >= 4 * MAX_INFLIGHT:
            return
        task = asyncio.get_running_loop().create_task(self._handle_logged(ev), name="micropay-nwc-request")
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _handle_logged(self, ev: Event) -> None:
        try:
            await self.handle(ev)
        except asyncio.CancelledError:
            raise
        except Exception as exc:              # the store away, say: the client hears nothing and retries
            log.warning("NWC: request %s could not be handled: %s", ev.id[:12], exc)

    async def handle(self, ev: Event) -> None:
        conn = self._by_service.get(ev.first("p") or "")
        if conn is None or ev.pubkey != conn.client_pubkey:
            return                                     # not for us, or not from this connection's client
        now = self.clock()
        expiration = ev.first("expiration")
        if not now - MAX_AGE_S <= ev.created_at <= now + MAX_SKEW_S or (
                expiration is not None and (not expiration.isascii() or not expiration.isdigit()
                                            or int(expiration) <= now)):
            return                                     # stale, from the future or expired: ignored
        limited = self.bucket.take(conn.id) > 0 or len(self._inflight) > MAX_INFLIGHT
        if limited:
            # told once a second at most: a flood (a leaked URI, a revoked app) costs no more
            if now - self._told_limited.get(conn.id, float("-inf")) < 1.0:
                return
            self._told_limited[conn.id] = now
        if not await self.repo.see(ev.id, conn.id, int(now)):
            log.info("NWC %s: request %s seen before; ignored", conn.id, ev.id[:12])
            return                                     # a replay (or another relay's copy)
        enc = {None: NIP04, NIP04: NIP04, NIP44: NIP44}.get(ev.first("encryption"))
        if enc is None:
            await self._answer(conn, ev.id, NIP04, "", None, NwcError(Code.UNSUPPORTED_ENCRYPTION,
                                                                    "this service speaks nip44_v2 and nip04"))
            return
        try:
            text = self._decrypt(conn, ev.content, enc)
        except NostrError:
            log.info("NWC %s: a request that does not decrypt (%s); ignored", conn.id, enc)
            return
        method = ""
        try:
            req = parse_request(text)
            method = req.method
            if not self.live(conn, now):
                raise NwcError(Code.UNAUTHORIZED, "this connection has been revoked or has expired")
            if req.method not in Method.__members__.values():
                raise NwcError(Code.NOT_IMPLEMENTED, f"{req.method} is not supported")
            if req.method not in conn.methods:
                raise NwcError(Code.RESTRICTED, f"this connection may not use {req.method}")
            if limited:
                raise NwcError(Code.RATE_LIMITED, "too many requests; slow down")
            result = await self._dispatch(conn, ev.id, enc, Method(req.method), req.params)
        except NwcError as err:
            await self._answer(conn, ev.id, enc, method, None, err)
            return
        except Exception:
            log.exception("NWC %s: %s failed", conn.id, method)
            await self._answer(conn, ev.id, enc, method, None, NwcError(Code.INTERNAL, "the wallet service failed"))
            return
        if result is not None:             # None: a payment still out, answered when it settles
            await self._answer(conn, ev.id, enc, method, result, None)

    def _decrypt(self, conn: Connection, content: str, enc: str) -> str:
        keys = self.service_keys(conn.id)
        if enc == NIP44:
            return nip44.decrypt(content, nip44.conversation_key(keys, conn.client_pubkey))
        return nip04.decrypt(content, keys, conn.client_pubkey)

    def _encrypt(self, conn: Connection, text: str, enc: str) -> str:
        keys = self.service_keys(conn.id)
        if enc == NIP44:
            return nip44.encrypt(text, nip44.conversation_key(keys, conn.client_pubkey))
        return nip04.encrypt(text, keys, conn.client_pubkey)

    async def _answer(self, conn: Connection, request_id: str, enc: str, method: str,
                      result: dict[str, Any] | None, error: NwcError | None) -> bool:
        content = self._encrypt(conn, response_content(method, result, error), enc)
        ev = sign_event(self.service_keys(conn.id), RESPONSE, content, [["p", conn.client_pubkey], ["e", request_id]])
        try:
            sent = await self.publish(ev)
        except Exception as exc:
            log.warning("NWC %s: answering %s failed: %s", conn.id, request_id[:12], exc)
            return False
        if sent:
            log.info("NWC %s: answered %s %s%s", conn.id, method or "?", request_id[:12],
                     f" ({error.code})" if error is not None else "")
        else:
            log.warning("NWC %s: no relay took the answer to %s", conn.id, request_id[:12])
        return sent

    async def _notify(self, conn: Connection, kind: str, tx: dict[str, Any]) -> None:
        text = json.dumps({"notification_type": kind, "notification": tx}, separators=(",", ":"))
        keys = self.service_keys(conn.id)
        for k, enc in ((NOTIFICATION, NIP44), (NOTIFICATION_NIP04, NIP04)):
            ev = sign_event(keys, k, self._encrypt(conn, text, enc), [["p", conn.client_pubkey]])
            with contextlib.suppress(Exception):
                await self.publish(ev)

    async def _dispatch(self, conn: Connection, request_id: str, enc: str, method: Method,
                        params: dict[str, Any]) -> dict[str, Any] | None:
        if method is Method.GET_INFO:
            info = await self.node_info()
            return {**info, "methods": list(conn.methods), "notifications": list(NOTIFICATIONS)}
        if method is Method.GET_BALANCE:
            return {"balance": await self._balance(conn)}
        if method is Method.MAKE_INVOICE:
            return await self._make_invoice(conn, request_id, MakeInvoice.parse(params))
        if method is Method.LOOKUP_INVOICE:
            return await self._lookup(conn, LookupInvoice.parse(params))
        if method is Method.LIST_TRANSACTIONS:
            return await self._list(conn, ListTransactions.parse(params))
        if method in SPENDING:
            return await self._pay(conn, request_id, enc, method, params)
        raise NwcError(Code.NOT_IMPLEMENTED, f"{method} is not supported")

    async def _balance(self, conn: Connection) -> int:
        """What this connection could spend now: the node's spendable balance, bounded by
        what is left of the connection's budget (an app never learns more than that)."""
        now = self.clock()
        left = max(0, conn.budget_msat - await self.repo.used(conn.id, period_start(conn.budget_period, now)))
        if not any(m in SPENDING for m in conn.methods):
            left = 0
        outbound = (await self.node.liquidity()).outbound_msat
        return min(outbound, left)

    async def _make_invoice(self, conn: Connection, request_id: str, p: MakeInvoice) -> dict[str, Any]:
        if p.description_hash is not None and (
                not p.description or hashlib.sha256(p.description.encode()).hexdigest() != p.description_hash):
            # the node commits to a hash of a text it is given, not to a bare hash
            raise NwcError(Code.NOT_IMPLEMENTED, "description_hash needs the description it is the sha256 of")
        label = f"{LABEL_PREFIX}{conn.id}-{request_id[:24]}"
        try:
            inv = await self.node.create_invoice(p.amount_msat, label, p.description,
                                                 p.expiry_s or DEFAULT_EXPIRY_S,
                                                 hash_description=p.description_hash is not None)
        except MicropayError as exc:
            raise NwcError(Code.INTERNAL, f"the node could not make an invoice: {exc.message}") from None
        now = int(self.clock())
        row = NwcInvoice(inv.payment_hash, conn.id, label, inv.bolt11, p.amount_msat or 0, p.description, now,
                         inv.expires_at, None, None, None)
        await self.repo.add_invoice(row)
        return self._incoming(row)

    async def _lookup(self, conn: Connection, p: LookupInvoice) -> dict[str, Any]:
        h = p.payment_hash
        if h is None:
            try:
                h = (await self.node.decode(p.invoice or "")).payment_hash
            except MicropayError:
                raise NwcError(Code.OTHER, "invoice is not a valid BOLT11 invoice") from None
        inv = await self.repo.invoice("payment_hash", h)
        if inv is not None and inv.connection_id == conn.id:
            return self._incoming(inv)
        pay = await self.repo.payment("payment_hash", h)
        if pay is not None and pay.connection_id == conn.id:
            return self._outgoing(pay)
        raise NwcError(Code.NOT_FOUND, "no invoice or payment of this connection has that payment hash")

    async def _list(self, conn: Connection, p: ListTransactions) -> dict[str, Any]:
        until = p.until_s if p.until_s is not None else int(self.clock())
        n = p.offset + p.limit
        incoming, outgoing = await self.repo.transactions(conn.id, p.from_s, until, p.unpaid, n)
        txs = ([] if p.type == "outgoing" else [self._incoming(i) for i in incoming]) + \
              ([] if p.type == "incoming" else [self._outgoing(o) for o in outgoing])
        txs.sort(key=lambda t: t["created_at"], reverse=True)
        page = txs[p.offset:n]
        while page and len(json.dumps(page)) > MAX_LIST_JSON:     # an answer fits one event: fewer, newest first
            page.pop()
        return {"transactions": page}

    def _incoming(self, i: NwcInvoice) -> dict[str, Any]:
        state = "settled" if i.settled_at is not None else ("expired" if i.expires_at <= self.clock() else "pending")
        tx: dict[str, Any] = {"type": "incoming", "state": state, "invoice": i.bolt11, "description": i.description,
                              "payment_hash": i.payment_hash, "amount": i.received_msat or i.amount_msat,
                              "fees_paid": 0, "created_at": i.created_at, "expires_at": i.expires_at}
        if i.settled_at is not None:
            tx.update(settled_at=i.settled_at, preimage=i.preimage)
        return tx

    def _outgoing(self, o: NwcPayment) -> dict[str, Any]:
        state = {PayStatus.PAID: "settled", PayStatus.FAILED: "failed"}.get(o.status, "pending")
        tx: dict[str, Any] = {"type": "outgoing", "state": state, "payment_hash": o.payment_hash or "",
                              "amount": o.amount_msat, "fees_paid": o.fee_msat or 0, "created_at": o.created_at,
                              "description": o.description}
        if o.kind == "invoice":
            tx["invoice"] = o.destination
        if o.status is PayStatus.PAID:
            tx.update(settled_at=o.updated_at, preimage=o.preimage)
        return tx

    # -- paying ----------------------------------------------------------------------------
    async def _pay(self, conn: Connection, request_id: str, enc: str, method: Method,
                   params: dict[str, Any]) -> dict[str, Any] | None:
        now = int(self.clock())
        amountless: int | None = None
        if method is Method.PAY_INVOICE:
            p = PayInvoice.parse(params)
            try:
                dec = await self.node.decode(p.invoice)
            except MicropayError:
                raise NwcError(Code.OTHER, "invoice is not a valid BOLT11 invoice") from None
            amount = dec.amount_msat
            if amount is None:
                if p.amount_msat is None:
                    raise NwcError(Code.OTHER, "the invoice has no amount: send amount (msat)")
                amount = amountless = p.amount_msat
            elif p.amount_msat is not None and p.amount_msat != amount:
                raise NwcError(Code.OTHER, f"amount {p.amount_msat} does not match the invoice's {amount} msat")
            if dec.expires_at <= now:
                raise NwcError(Code.OTHER, "the invoice has expired")
            earlier = await self.repo.payment("payment_hash", dec.payment_hash)
            if earlier is not None:
                if earlier.connection_id != conn.id:
                    raise NwcError(Code.RESTRICTED, "this invoice was paid through another connection")
                if earlier.status is PayStatus.SENDING:
                    raise NwcError(Code.OTHER, "a payment of this invoice is in flight; look it up later")
                if earlier.status is PayStatus.PAID:
                    return self._paid_result(earlier)     # paying an invoice twice pays it once
            kind, dest, phash, desc = "invoice", p.invoice, dec.payment_hash, dec.description[:200]
        else:
            k = PayKeysend.parse(params)
            amount, kind, dest, phash, desc = k.amount_msat, "keysend", k.pubkey, None, ""
        row = NwcPayment(request_id, conn.id, kind, dest, phash, f"{LABEL_PREFIX}pay-{request_id[:32]}",
                         await self.node.sendpays_position(), amount, conn.max_fee_msat, None, PayStatus.SENDING,
                         None, None, desc, period_start(conn.budget_period, now), enc, False, now + LEASE_S, now, now)
        reserved = await self.repo.reserve(row, conn.budget_msat)
        if reserved is False:
            if await self.repo.payment("request_id", request_id) is not None:
                return None                             # the same request again: answered by its first handling
            live = await self.repo.payment("payment_hash", phash) if phash else None
            if live is not None and live.status is PayStatus.PAID and live.connection_id == conn.id:
                return self._paid_result(live)
            raise NwcError(Code.OTHER, "a payment of this invoice is in flight; look it up later")
        if reserved is None:
            used = await self.repo.used(conn.id, row.period_start)
            raise NwcError(Code.QUOTA_EXCEEDED,
                           f"{amount} msat + up to {conn.max_fee_msat} msat fee exceeds what is left of the "
                           f"{conn.budget_period} budget ({max(0, conn.budget_msat - used)} of {conn.budget_msat} msat)")
        log.info("NWC %s: paying %d msat (%s, request %s)", conn.id, amount, kind, request_id[:12])
        try:
            async with self._leased(request_id):
                done = await self._send(row, amountless, params if kind == "keysend" else None)
            if done.status is PayStatus.SENDING:
                return None                             # out, outcome unknown: the resume loop answers
            return await self._finish_answer(conn, done, answer_now=False)
        except NwcError:
            raise                                       # PAYMENT_FAILED, recorded before it is raised
        except Exception as exc:
            # reserved, maybe paid: never answer INTERNAL now, the record may say otherwise;
            # the resume loop settles it from the node's record and answers once
            log.warning("NWC %s: request %s after its reservation: %s; the resume loop answers it",
                        conn.id, request_id[:12], exc)
            return None

    @contextlib.asynccontextmanager
    async def _leased(self, request_id: str):
        async def renew() -> None:
            while True:
                await asyncio.sleep(RENEW_EVERY_S)
                try:
                    await self.repo.renew(request_id, int(self.clock()) + LEASE_S)
                except Exception as exc:
                    log.warning("NWC: renewing the lease of request %s failed: %s", request_id[:12], exc)
        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()

    async def _send(self, row: NwcPayment, amountless: int | None, keysend_params: dict[str, Any] | None) -> NwcPayment:
        try:
            if row.kind == "invoice":
                p = await self.node.pay(row.destination, max_fee_msat=row.fee_reserve_msat, label=row.label,
                                        amount_msat=amountless)
            else:
                tlvs = PayKeysend.parse(keysend_params or {}).tlv_records
                p = await self.node.keysend(row.destination, row.amount_msat, label=row.label,
                                            max_fee_msat=row.fee_reserve_msat, extratlvs=tlvs or None)
        except PaymentFailed as exc:
            return await self._settle(row, failed_error=exc.message)
        except (PaymentUnknown, Exception) as exc:
            # out or not, its outcome is unknown (lightningd went away mid-call, a timeout):
            # the resume loop settles it from the node's record and answers then
            log.warning("NWC %s: payment for request %s: %s; its outcome is settled from the node's record",
                        row.connection_id, row.request_id[:12], getattr(exc, "message", exc))
            return row
        return await self._record(row, p)

    async def _record(self, row: NwcPayment, p: Payment) -> NwcPayment:
        if row.payment_hash is None:
            await self.repo.set_hash(row.request_id, p.payment_hash)
        await self.repo.finish(row.request_id, PayStatus.PAID, p.fee_msat, p.preimage, None, int(self.clock()))
        return await self.repo.payment("request_id", row.request_id) or row

    async def _settle(self, row: NwcPayment, failed_error: str | None = None) -> NwcPayment:
        """From the node's record (lightning/outcome.py); never pays."""
        now = self.clock()
        if row.payment_hash is not None:
            known = await self._outcomes.settle(payment_hash=row.payment_hash, now=now)
        else:
            known = await self._outcomes.settle(label=row.label, sendpays_start=row.sendpays_start, now=now)
        if known.outcome is Outcome.SUCCEEDED and known.payment is not None:
            return await self._record(row, known.payment)
        if known.outcome is Outcome.IN_FLIGHT:
            return row
        if known.outcome is Outcome.NOT_SENT and failed_error is None:
            restarted = self.node_started_at is not None and self.node_started_at > row.created_at
            if not restarted and now - row.created_at < NOT_SENT_GRACE_S:
                return row                   # an attempt of a live lightningd may still write its record
        error = failed_error or known.detail or "the payment failed"
        await self.repo.finish(row.request_id, PayStatus.FAILED, None, None, error[:300], int(now))
        return await self.repo.payment("request_id", row.request_id) or row

    def _paid_result(self, row: NwcPayment) -> dict[str, Any]:
        return {"preimage": row.preimage, "fees_paid": row.fee_msat or 0}

    async def _finish_answer(self, conn: Connection, row: NwcPayment, *, answer_now: bool) -> dict[str, Any] | None:
        """A payment that is paid or failed: its result (the caller answers) or, with
        `answer_now`, answered here. Marked answered either way once sent."""
        if row.status is PayStatus.PAID:
            log.info("NWC %s: paid %d msat + %d fee", conn.id, row.amount_msat, row.fee_msat or 0)
            await self._notify(conn, "payment_sent", self._outgoing(row))
        method = Method.PAY_INVOICE if row.kind == "invoice" else Method.PAY_KEYSEND
        error = None if row.status is PayStatus.PAID else NwcError(Code.PAYMENT_FAILED, row.error or "payment failed")
        result = self._paid_result(row) if error is None else None
        if not answer_now:
            if error is not None:
                await self.repo.answered(row.request_id)
                raise error
            await self.repo.answered(row.request_id)
            return result
        if await self._answer(conn, row.request_id, row.encryption, method, result, error):
            await self.repo.answered(row.request_id)
        return None

    async def resume(self) -> int:
        """Payments left sending by a crash or a lost answer: settled from the node's record
        and answered, once. Returns how many were looked at."""
        now = int(self.clock())
        sending = await self.repo.sending_due(now)
        for row in sending:
            conn = await self.repo.connection("id", row.connection_id)
            if conn is None or not await self.repo.claim(row.request_id, now + LEASE_S, now):
                continue
            async with self._leased(row.request_id):
                row = await self._settle(row)
            log.info("NWC %s: request %s, left in flight, is %s by the node's record", conn.id,
                     row.request_id[:12], "still out" if row.status is PayStatus.SENDING else row.status)
            if row.status is PayStatus.SENDING:
                await self.repo.renew(row.request_id, int(self.clock()) + 5)   # look again soon
                continue
            await self._finish_answer(conn, row, answer_now=True)
        unanswered = await self.repo.unanswered_due(now)
        for row in unanswered:
            conn = await self.repo.connection("id", row.connection_id)
            if conn is None or not await self.repo.claim(row.request_id, now + 30, now):
                continue
            if row.created_at < now - ANSWER_FOR_S:
                log.warning("NWC %s: no relay took the answer to %s for an hour; given up", conn.id,
                            row.request_id[:12])
                await self.repo.answered(row.request_id)
                continue
            await self._finish_answer(conn, row, answer_now=True)
        with contextlib.suppress(Exception):
            await self.repo.forget_seen(now - SEEN_KEEP_S)
        return len(sending) + len(unanswered)

    async def watch(self, every_s: float = 5.0) -> None:
        while True:
            try:
                await self.resume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("NWC: resuming payments failed: %s", exc)
            await asyncio.sleep(every_s)

    # -- receiving ---------------------------------------------------------------------
    async def settled(self, s: Settlement) -> None:
        """One of the node's invoices was paid; those made through a connection are
        marked settled and announced to it (payment_received)."""
        if not s.label.startswith(LABEL_PREFIX):
            return
        if await self.repo.settle_invoice(s.label, s.paid_at, s.amount_msat, s.preimage) is None:
            return
        inv = await self.repo.invoice("label", s.label)
        conn = await self.repo.connection("id", inv.connection_id) if inv else None
        if inv is not None and conn is not None:
            log.info("NWC %s: received %d msat", conn.id, s.amount_msat)
            await self._notify(conn, "payment_received", self._incoming(inv))

    async def close(self) -> None:
        for task in list(self._inflight):
            task.cancel()
        for task in list(self._inflight):
            with contextlib.suppress(BaseException):
                await task


__all__ = ["NwcService", "PERIODS", "period_start", "next_period"]
