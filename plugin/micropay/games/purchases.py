"""In-app purchases: create (idempotent), read, list, settle, expire; and the event hub.

A purchase is pending until its invoice settles (paid) or expires (expired). Every
transition is one store transaction that also writes its event and webhook outbox
rows, so listeners and webhooks never miss a transition and never see one twice.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import time
from typing import Any, Callable

from ..errors import BadRequest, MicropayError
from ..lightning.base import Node, Settlement
from ..receipts import ReceiptSigner
from ..store import Store
from ..store.base import Step
from ..store.games import GSQL, PURCHASE_FIELDS, EventRecord, NewEvent, row_dict
from .config import GamesConfig

log = logging.getLogger("micropay.games")
PLAYER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_METADATA_BYTES = 4096
CURSOR = re.compile(r"([0-9]{1,12})~([A-Za-z0-9_]{0,64})")
LABEL_PREFIX = "micropay-purchase-"
NO_LIMIT = 2 ** 62


class NotFound(MicropayError):
    code = "not_found"
    http_status = 404
    rpc_code = 1404


class Conflict(MicropayError):
    code = "conflict"
    http_status = 409
    rpc_code = 1409


class EventHub:
    """Wakes listeners (SSE, WebSocket) when events are written in this process.
    Take `current()` before reading the store, then `wait()` on it: no wake-up is lost."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        ev, self._event = self._event, asyncio.Event()
        ev.set()

    @staticmethod
    async def wait(ev: asyncio.Event, timeout: float) -> bool:
        """True if woken, False on timeout. asyncio.timeout, not wait_for: on Python 3.11,
        wait_for swallows a cancellation that arrives as the event is set, and a loop
        built on it then never stops (seen as a hung shutdown)."""
        try:
            async with asyncio.timeout(timeout):
                await ev.wait()
            return True
        except TimeoutError:
            return False


def check_player_id(value: Any) -> str:
    if not isinstance(value, str) or not PLAYER_ID.fullmatch(value):
        raise BadRequest("player_id must be 1-128 of A-Z a-z 0-9 . _ : @ -")
    return value


def check_idempotency_key(value: Any) -> str:
    if not isinstance(value, str) or not IDEMPOTENCY_KEY.fullmatch(value):
        raise BadRequest("idempotency_key must be 1-128 of A-Z a-z 0-9 . _ : -")
    return value


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class Purchases:
    def __init__(self, cfg: GamesConfig, store: Store, node: Node, signer: ReceiptSigner, service: str,
                 token_key: bytes, hub: EventHub | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.store, self.node, self.signer = cfg, store, node, signer
        self.service, self._token_key, self.clock = service, token_key, clock
        self.hub = hub or EventHub()

    # -- player client tokens: read access to one purchase ----------------------
    def client_token(self, purchase_id: str) -> str:
        mac = hmac.new(self._token_key, f"purchase:{purchase_id}".encode(), hashlib.sha256).digest()
        return "mpc_" + base64.urlsafe_b64encode(mac[:24]).decode("ascii")

    def check_client_token(self, purchase_id: str, token: str) -> bool:
        return hmac.compare_digest(self.client_token(purchase_id).encode(), token.encode("utf-8", "replace"))

    # -- views --------------------------------------------------------------------
    def view(self, row: dict[str, Any]) -> dict[str, Any]:
        status = row["status"]
        if status == "pending" and row["expires_at"] <= self.clock():
            status = "expired"
        out = {"id": row["id"], "sku": row["sku"], "player_id": row["player_id"],
               "price_msat": int(row["price_msat"]), "metadata": json.loads(row["metadata"]),
               "status": status, "invoice": row["bolt11"], "payment_hash": row["payment_hash"],
               "created_at": int(row["created_at"]), "expires_at": int(row["expires_at"]),
               "paid_at": None, "amount_received_msat": None, "preimage": None, "receipt": None}
        if row["status"] == "paid":
            out.update(paid_at=int(row["paid_at"]), amount_received_msat=int(row["received_msat"]),
                       preimage=row["preimage"], receipt=row["receipt"])
        return out

    async def _one(self, key: str, value: str) -> dict[str, Any] | None:
        rows = await self.store.query(GSQL[key], (value,))
        return row_dict(PURCHASE_FIELDS, rows[0]) if rows else None

    async def get(self, purchase_id: str) -> dict[str, Any]:
        row = await self._one("purchase_by_id", purchase_id)
        if row is None:
            raise NotFound("no such purchase")
        return self.view(row)

    # -- create -------------------------------------------------------------------
    async def create(self, body: Any) -> tuple[dict[str, Any], bool]:
        """Returns (purchase, created). The same idempotency key returns the same purchase."""
        if not isinstance(body, dict):
            raise BadRequest("body must be a JSON object")
        unknown = sorted(set(body) - {"sku", "player_id", "idempotency_key", "metadata"})
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}")
        sku = body.get("sku")
        item = self.cfg.item(sku) if isinstance(sku, str) else None
        if item is None:
            raise BadRequest(f"unknown sku {sku!r}" if isinstance(sku, str) and len(sku) < 80 else "unknown sku",
                             reason="unknown_sku")
        player = check_player_id(body.get("player_id"))
        key = check_idempotency_key(body.get("idempotency_key"))
        metadata = body.get("metadata", {})
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise BadRequest("metadata must be a JSON object")
        meta_text = _canonical(metadata)
        if len(meta_text.encode()) > MAX_METADATA_BYTES:
            raise BadRequest(f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")

        existing = await self._same_key(key, sku, player, meta_text)
        if existing is not None:
            return existing, False
        now = int(self.clock())
        pid = "pur_" + os.urandom(12).hex()
        inv = await self.node.create_invoice(item.price_msat, LABEL_PREFIX + pid,
                                             f"{item.title} ({item.sku})", self.cfg.expiry_s)
        limit = item.max_per_player or NO_LIMIT
        tx = await self.store.transaction([
            Step(GSQL["lock"], (f"purchase:{player}:{sku}",)),
            Step(GSQL["purchase_slots"], (player, sku, now, limit), required=True),
            Step(GSQL["add_purchase"], (pid, key, sku, player, item.price_msat, meta_text, inv.bolt11,
                                        inv.payment_hash, now, inv.expires_at)),
        ])
        if tx.ok and tx.rows[2]:
            log.info("purchase %s created: %s for player %s, %d msat", pid, sku, player, item.price_msat)
            return self.view(await self._one("purchase_by_id", pid)), True
        # Lost a race on the same key, or the player's limit is reached.
        existing = await self._same_key(key, sku, player, meta_text)
        if existing is not None:
            return existing, False
        raise Conflict(f"player {player!r} has reached the limit of {item.max_per_player} "
                       f"for {sku!r}", reason="purchase_limit_reached")

    async def _same_key(self, key: str, sku: str, player: str, meta_text: str) -> dict[str, Any] | None:
        row = await self._one("purchase_by_key", key)
        if row is None:
            return None
        if (row["sku"], row["player_id"], row["metadata"]) != (sku, player, meta_text):
            raise Conflict("idempotency_key was already used for a different purchase",
                           reason="idempotency_key_reused", purchase_id=row["id"])
        return self.view(row)

    # -- listing ------------------------------------------------------------------
    async def list(self, *, player_id: str = "", sku: str = "", status: str = "", limit: int = 50,
                   cursor: str = "") -> dict[str, Any]:
        after_t, after_id = 0, ""
        if cursor:   # "<created_at>~<id>": the position after which to list
            m = CURSOR.fullmatch(cursor)
            if m is None:
                raise BadRequest("cursor must be a next_cursor this API returned")
            after_t, after_id = int(m[1]), m[2]
        # 'expired' includes pending rows past their expiry that the sweeper has not reached
        db_status = "" if status == "expired" else status
        rows, out = [], []
        while len(out) <= limit:   # one more than asked: is there a next page?
            rows = await self.store.query(GSQL["list_purchases"],
                                          (player_id, sku, db_status, after_t, after_id, limit + 1))
            for r in rows:
                v = self.view(row_dict(PURCHASE_FIELDS, r))
                after_t, after_id = v["created_at"], v["id"]
                if status and v["status"] != status:
                    continue
                out.append(v)
                if len(out) > limit:
                    break
            if len(rows) <= limit:
                break
        more = len(out) > limit
        out = out[:limit]
        nxt = None
        if more:
            last = out[-1]
            nxt = f"{last['created_at']}~{last['id']}"
        return {"purchases": out, "next_cursor": nxt}

    # -- transitions ----------------------------------------------------------------
    async def on_settlement(self, s: Settlement) -> bool:
        """Mark the purchase paid, sign its receipt, write the event and outbox: once."""
        row = await self._one("purchase_by_hash", s.payment_hash)
        if row is None or row["status"] == "paid":
            return False
        receipt = self.signer.sign({
            "v": 1, "type": "purchase", "service": self.service, "purchase_id": row["id"],
            "sku": row["sku"], "player_id": row["player_id"], "amount_msat": int(s.amount_msat),
            "price_msat": int(row["price_msat"]), "payment_hash": s.payment_hash,
            "preimage": s.preimage, "paid_at": int(s.paid_at)})
        paid = dict(row, status="paid", paid_at=s.paid_at, received_msat=s.amount_msat,
                    preimage=s.preimage, receipt=receipt)
        view = self.view(paid)
        ev = NewEvent(f"purchase.paid:{row['id']}", "purchase.paid", row["id"], row["player_id"],
                      {"purchase": view}, int(self.clock()))
        tx = await self.store.transaction(
            [Step(GSQL["mark_purchase_paid"], (s.payment_hash, s.paid_at, s.amount_msat, s.preimage, receipt),
                  required=True)] + ev.steps(self.cfg.endpoints_for(ev.type)))
        if not tx.ok:
            return False
        self.hub.notify()
        log.info("purchase %s paid: %d msat (%s for %s)", row["id"], s.amount_msat, row["sku"], row["player_id"])
        return True

    async def expire_due(self, batch: int = 100) -> int:
        now = int(self.clock())
        n = 0
        for (pid,) in await self.store.query(GSQL["expirable"], (now, batch)):
            row = await self._one("purchase_by_id", pid)
            if row is None:
                continue
            view = self.view(dict(row, status="expired"))
            ev = NewEvent(f"purchase.expired:{pid}", "purchase.expired", pid, row["player_id"],
                          {"purchase": view}, now)
            tx = await self.store.transaction(
                [Step(GSQL["mark_purchase_expired"], (pid, now), required=True)]
                + ev.steps(self.cfg.endpoints_for(ev.type)))
            n += tx.ok
        if n:
            self.hub.notify()
        return n

    async def events_after(self, after_id: int, subject_id: str = "", limit: int = 100) -> list[EventRecord]:
        rows = await self.store.query(GSQL["events_after"], (after_id, subject_id, limit))
        return [EventRecord(*r) for r in rows]
