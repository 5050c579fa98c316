"""Lightning Addresses as a service: the payRequest, the callback that issues a tip's
invoice, LUD-21 verification, and what happens when a tip is paid (stored with its
comment, a `tip.received` event and webhooks, the collaborators' shares, the zap
receipt). Nothing here knows HTTP: a refusal is a TipRefused with the reason the
payer's wallet shows.

Money is decided by the tip's record: the invoice is for exactly the amount asked,
commits to the metadata (or, for a zap, to the zap request), and what is split is
what the node received for it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from ..core.errors import BadRequest, MicropayError, NodeError, NotFound, RateLimited
from ..core.inputs import decimal
from ..core.ratelimit import TokenBucket
from ..core.secretfile import load_or_create_secret
from ..games.events import EventHub
from ..games.repository import NewEvent
from ..lightning.base import Node, Settlement
from ..nostr.keys import Keys
from ..store import Store
from . import lnurl
from .config import AddressConfig, CreatorsConfig
from .repository import Share, ShareRepository, Tip, TipRepository, TipStatus, ZapRepository
from .zaps import ZapError, parse_zap_request, zap_receipt

log = logging.getLogger("micropay.creators")
LABEL_PREFIX = "micropay-tip-"
MAX_ZAP_REQUEST = 16 * 1024
KEEP_EXPIRED_S = 86_400          # an expired, unpaid tip is deleted a day after it expired
_TIP_ID = re.compile(r"tip_[0-9a-f]{24}")
_HASH = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


class TipRefused(BadRequest):
    """A payRequest or callback the service refuses: answered {"status": "ERROR", "reason": ...}."""

    code = "tip_refused"


class UnknownAddress(NotFound):
    """No such Lightning Address here, or no such tip invoice of it."""

    code = "unknown_lightning_address"
    rpc_code = 1430


class TipsBusy(RateLimited):
    """A client's tip-invoice rate, or the unpaid tips it (or everyone) holds, is at its bound."""

    code = "too_many_tip_invoices"
    rpc_code = 1431


class NoTipInvoice(RateLimited):
    """The node (or the fleet) could not make the tip's invoice now; nothing was stored."""

    code = "tip_invoice_unavailable"
    http_status = 503
    rpc_code = 1432


@dataclass(frozen=True)
class Limits:
    per_client_per_minute: int = 30
    max_pending: int = 10_000
    max_pending_per_client: int = 50


def tip_view(t: Tip, shares: list[Share] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": t.id, "address": t.address, "amount_msat": t.amount_msat, "received_msat": t.received_msat,
        "comment": t.comment, "status": str(t.status), "payment_hash": t.payment_hash, "bolt11": t.bolt11,
        "created_at": t.created_at, "expires_at": t.expires_at, "paid_at": t.paid_at,
        "zap": _zap_summary(t.zap_request)}
    if shares is not None:
        out["shares"] = [share_view(s) for s in shares]
    return out


def share_view(s: Share) -> dict[str, Any]:
    return {"index": s.idx, "destination": s.destination, "name": s.name, "amount_msat": s.amount_msat,
            "status": str(s.status), "fee_msat": s.fee_msat, "attempts": s.attempt, "error": s.error,
            "payment_hash": s.payment_hash, "updated_at": s.updated_at}


def _zap_summary(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    doc = json.loads(text)
    tags = {t[0]: t[1] for t in doc.get("tags", []) if isinstance(t, list) and len(t) >= 2}
    return {"sender": doc.get("pubkey"), "content": doc.get("content", ""), "event": tags.get("e"),
            "request_id": doc.get("id")}


class Creators:
    def __init__(self, cfg: CreatorsConfig, store: Store, node: Node, hub: EventHub, *,
                 endpoints_for: Callable[[str], list[str]] = lambda t: [], limits: Limits = Limits(),
                 clock: Callable[[], float] = time.time, on_shares: Callable[[], None] = lambda: None,
                 on_zaps: Callable[[], None] = lambda: None) -> None:
        self.cfg, self.node, self.hub, self.clock = cfg, node, hub, clock
        self.tips, self.shares, self.zaps = TipRepository(store), ShareRepository(store), ZapRepository(store)
        self.endpoints_for, self.limits = endpoints_for, limits
        self.on_shares, self.on_zaps = on_shares, on_zaps
        self._per_client = TokenBucket(limits.per_client_per_minute)
        self._keys: dict[str, Keys] = {}
        for a in cfg.addresses:
            if a.nostr_key_file is not None:
                self._keys[a.name] = Keys(load_or_create_secret(a.nostr_key_file, 32))

    # -- the address's documents -------------------------------------------------------------
    def base_url(self, request_origin: str) -> str:
        """Where callbacks point: the configured public URL, else the request's own origin."""
        return self.cfg.public_url or request_origin

    def _address(self, name: str) -> AddressConfig:
        a = self.cfg.address(name.lower())
        if a is None:
            raise UnknownAddress(f"there is no Lightning Address {name[:64]!r} here")
        return a

    def zap_pubkey(self, name: str) -> str | None:
        k = self._keys.get(name)
        return k.pubkey if k is not None else None

    def pay_request(self, name: str, origin: str) -> dict[str, Any]:
        a = self._address(name)
        base = self.base_url(origin)
        return lnurl.pay_request(f"{base}/lnurlp/{a.name}/callback", a.min_sendable_msat, a.max_sendable_msat,
                                 a.metadata(_domain(base)), comment_allowed=a.comment_allowed,
                                 nostr_pubkey=self.zap_pubkey(a.name))

    async def callback(self, name: str, origin: str, client: str, query: dict[str, str]) -> dict[str, Any]:
        """Issue the invoice for one tip: exactly `amount` msat, committing to the metadata
        (or the zap request), within the address's bounds and the client's limits."""
        a = self._address(name)
        base = self.base_url(origin)
        amount = _amount(query.get("amount"), a)
        comment = _comment(query.get("comment"), a)
        zap_text = query.get("nostr")
        wait = self._per_client.take(client)     # before any work a request can make us do
        if wait > 0:
            raise TipsBusy(f"too many tip invoices from this client; try again in {int(wait) + 1} s",
                           int(wait) + 1)
        description = a.metadata(_domain(base))
        if zap_text is not None:
            description = self._check_zap(a, zap_text, amount, base)
        now = int(self.clock())
        tip_id = "tip_" + os.urandom(12).hex()
        try:
            inv = await self.node.create_invoice(amount, f"{LABEL_PREFIX}{tip_id}", description,
                                                 self.cfg.tip_expiry_s, hash_description=True)
        except (NodeError, RateLimited) as exc:     # the fleet's NoInvoiceInTime too
            log.warning("tip invoice for %s not issued: %s", a.name, exc.message)
            raise NoTipInvoice("the node cannot issue an invoice right now; try again shortly", 5) from None
        tip = Tip(tip_id, a.name, amount, comment, zap_text, client, TipStatus.PENDING, inv.bolt11,
                  inv.payment_hash, now, inv.expires_at)
        if not await self.tips.add(tip, min(self.limits.max_pending_per_client, max(1, self.limits.max_pending // 10)),
                                   self.limits.max_pending):
            await self._forget(inv.label)
            raise TipsBusy("too many unpaid tip invoices are open; pay or let some expire first", 30)
        log.info("tip %s: %d msat invoice for %s%s", tip_id, amount, a.name, " (zap)" if zap_text else "")
        return lnurl.callback_answer(inv.bolt11, success_action=a.success_action,
                                     verify=f"{base}/lnurlp/{a.name}/verify/{inv.payment_hash}")

    def _check_zap(self, a: AddressConfig, text: str, amount: int, base: str) -> str:
        pubkey = self.zap_pubkey(a.name)
        if pubkey is None:
            raise TipRefused("this address does not accept zaps")
        if len(text) > MAX_ZAP_REQUEST:
            raise TipRefused(f"the zap request is larger than {MAX_ZAP_REQUEST} bytes")
        try:
            parse_zap_request(text, amount_msat=amount, nostr_pubkey=pubkey,
                              allow_local_relays=self.cfg.private_relays)
        except ZapError as exc:
            raise TipRefused(f"invalid zap request: {exc}") from None
        return text

    async def _forget(self, label: str) -> None:
        try:
            await self.node.delete_invoice(label)
        except MicropayError:
            pass

    async def verify(self, name: str, payment_hash: str) -> dict[str, Any]:
        """LUD-21: whether the tip's invoice is settled (and its preimage once it is)."""
        self._address(name)
        if not _HASH.fullmatch(payment_hash):
            raise UnknownAddress("not a payment hash of this address")
        t = await self.tips.by_hash(payment_hash)
        if t is None or t.address != name.lower():
            raise UnknownAddress("not an invoice of this address")
        paid = t.status is TipStatus.PAID
        return {"status": "OK", "settled": paid, "preimage": t.preimage if paid else None, "pr": t.bolt11}

    # -- settlement ------------------------------------------------------------------------------
    async def on_settlement(self, s: Settlement) -> bool:
        tip = await self.tips.by_hash(s.payment_hash)
        if tip is None or tip.status is TipStatus.PAID:
            return False
        a = self.cfg.address(tip.address)
        if a is None:
            log.warning("tip %s paid to %s, an address no longer configured: recorded, not split", tip.id,
                        tip.address)
        now = int(self.clock())
        paid = replace(tip, status=TipStatus.PAID, paid_at=s.paid_at, received_msat=s.amount_msat,
                       preimage=s.preimage)
        ev = NewEvent(f"tip.received:{tip.id}", "tip.received", tip.id, tip.address, {"tip": tip_view(paid)}, now)
        zap = self._receipt(tip, a, s) if tip.zap_request else None
        if not await self.tips.mark_paid(tip, s.paid_at, s.amount_msat, s.preimage, a, ev,
                                         self.endpoints_for(ev.type), zap):
            return False
        self.hub.notify()
        log.info("tip %s received: %d msat at %s", tip.id, s.amount_msat, tip.address)
        if a is not None and a.splits:
            self.on_shares()
        if zap is not None:
            self.on_zaps()
        return True

    def _receipt(self, tip: Tip, a: AddressConfig | None, s: Settlement) -> tuple[str, str] | None:
        keys = self._keys.get(tip.address)
        if keys is None or a is None:
            log.warning("tip %s was a zap, and %s has no Nostr key now: no receipt", tip.id, tip.address)
            return None
        try:
            req = parse_zap_request(tip.zap_request or "", amount_msat=tip.amount_msat, nostr_pubkey=keys.pubkey,
                                    allow_local_relays=self.cfg.private_relays)
        except ZapError as exc:       # checked when the invoice was issued; the rules may have changed since
            log.warning("tip %s: its zap request no longer passes (%s): no receipt", tip.id, exc)
            return None
        ev = zap_receipt(keys, req, tip.bolt11, s.preimage, int(s.paid_at))
        return json.dumps(ev.as_json(), separators=(",", ":")), json.dumps(list(req.relays))

    async def expire_due(self) -> int:
        """Mark unpaid tips past their expiry expired, and delete those expired more than
        KEEP_EXPIRED_S ago (their invoices on the node expired with them)."""
        now = int(self.clock())
        n = await self.tips.expire_due(now)
        await self.tips.purge(now - KEEP_EXPIRED_S)
        return n

    # -- reading ----------------------------------------------------------------------------------
    async def get(self, tip_id: str) -> dict[str, Any] | None:
        if not _TIP_ID.fullmatch(tip_id):
            return None
        t = await self.tips.by_id(tip_id)
        return tip_view(t, await self.shares.of_tip(t.id)) if t is not None else None

    async def list(self, *, address: str = "", status: str = "", limit: int = 50,
                   cursor: str | None = None) -> dict[str, Any]:
        before_at, before_id = 2 ** 62, "~"
        if cursor:
            at, _, tid = cursor.partition("~")
            at_n = decimal(at)
            if at_n is None or not _TIP_ID.fullmatch(tid):
                raise TipRefused("cursor is not one this API returned")
            before_at, before_id = at_n, tid
        rows = await self.tips.page(address, status, before_at, before_id, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        out = [tip_view(t, await self.shares.of_tip(t.id)) for t in rows]
        return {"tips": out, "next_cursor": f"{rows[-1].created_at}~{rows[-1].id}" if more else None}


def _domain(base: str) -> str:
    return base.split("://", 1)[1]


def _amount(raw: str | None, a: AddressConfig) -> int:
    if raw is None:
        raise TipRefused("amount is required (millisatoshis)")
    amount = decimal(raw)
    if amount is None:
        raise TipRefused("amount must be a whole number of millisatoshis")
    if not a.min_sendable_msat <= amount <= a.max_sendable_msat:
        raise TipRefused(f"amount must be between {a.min_sendable_msat} and {a.max_sendable_msat} msat")
    return amount


def _comment(raw: str | None, a: AddressConfig) -> str:
    if not raw:
        return ""
    if not a.comment_allowed:
        raise TipRefused("this address takes no comments")
    if len(raw) > a.comment_allowed:
        raise TipRefused(f"the comment is longer than {a.comment_allowed} characters")
    if _CONTROL.search(raw):
        raise TipRefused("the comment contains control characters")
    return raw


def key_path(data_dir: Path, name: str) -> Path:
    return data_dir / f"zap-{name}.key"
