"""In-app purchases: create (idempotent), read, list, settle, expire; and the event hub.

A purchase is pending until its invoice settles (paid) or expires (expired). Every
transition is one store transaction that also writes its event and webhook outbox
rows, so listeners and webhooks never miss a transition and never see one twice.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import time
from dataclasses import replace
from typing import Any, Callable

from ..core.errors import BadRequest, Conflict, NotFound
from ..lightning.base import Node, Settlement
from ..core.receipts import ReceiptSigner
from ..store import Store
from .config import GamesConfig
from .events import EventHub
from .models import MAX_METADATA_BYTES, PURCHASE_CREATE
from .repository import EventRecord, EventRepository, NewEvent, Purchase, PurchaseRepository, PurchaseStatus

log = logging.getLogger("micropay.games")
CURSOR = re.compile(r"([0-9]{1,12})~([A-Za-z0-9_]{0,64})")
LABEL_PREFIX = "micropay-purchase-"
NO_LIMIT = 2 ** 62


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class Purchases:
    def __init__(self, cfg: GamesConfig, store: Store, node: Node, signer: ReceiptSigner, service: str,
                 token_key: bytes, hub: EventHub | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.node, self.signer = cfg, node, signer
        self.repo, self.events = PurchaseRepository(store), EventRepository(store)
        self.service, self._token_key, self.clock = service, token_key, clock
        self.hub = hub or EventHub()

    # -- player client tokens: read access to one purchase ----------------------
    def client_token(self, purchase_id: str) -> str:
        mac = hmac.new(self._token_key, f"purchase:{purchase_id}".encode(), hashlib.sha256).digest()
        return "mpc_" + base64.urlsafe_b64encode(mac[:24]).decode("ascii")

    def check_client_token(self, purchase_id: str, token: str) -> bool:
        return hmac.compare_digest(self.client_token(purchase_id).encode(), token.encode("utf-8", "replace"))

    # -- views --------------------------------------------------------------------
    def view(self, p: Purchase) -> dict[str, Any]:
        status = p.status
        if status == PurchaseStatus.PENDING and p.expires_at <= self.clock():
            status = PurchaseStatus.EXPIRED
        out = {"id": p.id, "sku": p.sku, "player_id": p.player_id, "price_msat": p.price_msat,
               "metadata": json.loads(p.metadata), "status": str(status), "invoice": p.bolt11,
               "payment_hash": p.payment_hash, "created_at": p.created_at, "expires_at": p.expires_at,
               "paid_at": None, "amount_received_msat": None, "preimage": None, "receipt": None}
        if p.status == PurchaseStatus.PAID:
            out.update(paid_at=p.paid_at, amount_received_msat=p.received_msat, preimage=p.preimage,
                       receipt=p.receipt)
        return out

    async def get(self, purchase_id: str) -> dict[str, Any]:
        p = await self.repo.by_id(purchase_id)
        if p is None:
            raise NotFound("no such purchase")
        return self.view(p)

    # -- create -------------------------------------------------------------------
    async def create(self, body: Any) -> tuple[dict[str, Any], bool]:
        """Returns (purchase, created). The same idempotency key returns the same purchase."""
        fields = PURCHASE_CREATE.parse(body)
        sku, player, key = fields["sku"], fields["player_id"], fields["idempotency_key"]
        item = self.cfg.item(sku)
        if item is None:
            raise BadRequest(f"unknown sku {sku!r}", reason="unknown_sku")
        meta_text = _canonical(fields["metadata"] or {})
        if len(meta_text.encode()) > MAX_METADATA_BYTES:
            raise BadRequest(f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON")

        existing = await self._same_key(key, sku, player, meta_text)
        if existing is not None:
            return existing, False
        now = int(self.clock())
        pid = "pur_" + os.urandom(12).hex()
        inv = await self.node.create_invoice(item.price_msat, LABEL_PREFIX + pid,
                                             f"{item.title} ({item.sku})", self.cfg.expiry_s)
        new = Purchase(pid, key, sku, player, item.price_msat, meta_text, PurchaseStatus.PENDING, inv.bolt11,
                       inv.payment_hash, now, inv.expires_at)
        if await self.repo.add(new, now, item.max_per_player or NO_LIMIT):
            log.info("purchase %s created: %s for player %s, %d msat", pid, sku, player, item.price_msat)
            return self.view(new), True
        # Lost a race on the same key, or the player's limit is reached.
        existing = await self._same_key(key, sku, player, meta_text)
        if existing is not None:
            return existing, False
        raise Conflict(f"player {player!r} has reached the limit of {item.max_per_player} "
                       f"for {sku!r}", reason="purchase_limit_reached")

    async def _same_key(self, key: str, sku: str, player: str, meta_text: str) -> dict[str, Any] | None:
        p = await self.repo.by_key(key)
        if p is None:
            return None
        if (p.sku, p.player_id, p.metadata) != (sku, player, meta_text):
            raise Conflict("idempotency_key was already used for a different purchase",
                           reason="idempotency_key_reused", purchase_id=p.id)
        return self.view(p)

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
            rows = await self.repo.page(player_id, sku, db_status, after_t, after_id, limit + 1)
            for r in rows:
                v = self.view(r)
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
        p = await self.repo.by_hash(s.payment_hash)
        if p is None or p.status == PurchaseStatus.PAID:
            return False
        receipt = self.signer.sign({
            "v": 1, "type": "purchase", "service": self.service, "purchase_id": p.id,
            "sku": p.sku, "player_id": p.player_id, "amount_msat": int(s.amount_msat),
            "price_msat": p.price_msat, "payment_hash": s.payment_hash,
            "preimage": s.preimage, "paid_at": int(s.paid_at)})
        paid = replace(p, status=PurchaseStatus.PAID, paid_at=s.paid_at, received_msat=s.amount_msat,
                       preimage=s.preimage, receipt=receipt)
        ev = NewEvent(f"purchase.paid:{p.id}", "purchase.paid", p.id, p.player_id,
                      {"purchase": self.view(paid)}, int(self.clock()))
        if not await self.repo.mark_paid(s.payment_hash, s.paid_at, s.amount_msat, s.preimage, receipt, ev,
                                         self.cfg.endpoints_for(ev.type)):
            return False
        self.hub.notify()
        log.info("purchase %s paid: %d msat (%s for %s)", p.id, s.amount_msat, p.sku, p.player_id)
        return True

    async def expire_due(self, batch: int = 100) -> int:
        now = int(self.clock())
        n = 0
        for pid in await self.repo.expirable(now, batch):
            p = await self.repo.by_id(pid)
            if p is None:
                continue
            ev = NewEvent(f"purchase.expired:{pid}", "purchase.expired", pid, p.player_id,
                          {"purchase": self.view(replace(p, status=PurchaseStatus.EXPIRED))}, now)
            n += await self.repo.mark_expired(pid, now, ev, self.cfg.endpoints_for(ev.type))
        if n:
            self.hub.notify()
        return n

    async def last_event_id(self) -> int:
        return await self.events.last_id()

    async def events_after(self, after_id: int, subject_id: str = "", limit: int = 100) -> list[EventRecord]:
        return await self.events.after(after_id, subject_id, limit)
