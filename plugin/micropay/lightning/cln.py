"""Core Lightning adapter: asyncio JSON-RPC over the lightning-rpc unix socket.

One connection carries many concurrent calls (lightningd answers by id, in any order);
a lost connection fails the calls in flight and the next call reconnects. Settlement
is followed with `waitanyinvoice lastpay_index`, so a consumer that persists the last
pay_index it handled misses nothing across its own or the node's restarts. Payments
use `xpay` and `xkeysend` (the deprecated `pay`/`keysend` are not used).
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator

from ..core.errors import BadRequest, DuplicateLabel, NodeError, PaymentFailed, PaymentUnknown
from .base import DecodedInvoice, Invoice, Liquidity, Payment, PaymentStatus, Settlement

log = logging.getLogger("micropay.cln")

# lightningd error codes (common/jsonrpc_errors.h)
INVOICE_LABEL_ALREADY_EXISTS = 900
# Failures where smaller payments may get through: no route with enough capacity,
# retries exhausted, unspecified routing failure, not enough spendable balance.
LIQUIDITY_CODES = frozenset({205, 209, 210, 215})
STREAM_LIMIT = 64 * 1024 * 1024   # largest JSON reply we accept (listinvoices can be big)


class ClnRpcError(NodeError):
    """lightningd answered with a JSON-RPC error."""

    code = "cln_rpc_error"
    rpc_code = 1507

    def __init__(self, method: str, rpc_error: dict[str, Any]) -> None:
        self.method = method
        self.cln_code = int(rpc_error.get("code", -1))
        self.cln_message = str(rpc_error.get("message", ""))
        super().__init__(f"{method}: {self.cln_message} (code {self.cln_code})", cln_code=self.cln_code)


async def _open_unix(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Unix socket paths are limited to ~107 bytes; reach longer ones (test directories
    often are) through /proc/self/fd/<dir fd>/<name>."""
    if len(path.encode()) < 100:
        return await asyncio.open_unix_connection(path, limit=STREAM_LIMIT)
    dirfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        return await asyncio.open_unix_connection(f"/proc/self/fd/{dirfd}/{os.path.basename(path)}",
                                                  limit=STREAM_LIMIT)
    finally:
        os.close(dirfd)


class ClnRpc:
    """Minimal asyncio JSON-RPC 2.0 client for lightningd."""

    def __init__(self, path: str | Path, timeout_s: float = 120.0) -> None:
        self.path, self.timeout_s = str(path), timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._read_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def _ensure(self) -> None:
        async with self._lock:
            if self._writer is not None and not self._writer.is_closing():
                return
            try:
                self._reader, self._writer = await _open_unix(self.path)
            except OSError as exc:
                raise NodeError(f"cannot connect to lightningd at {self.path}: {exc.strerror or exc}") from None
            self._read_task = asyncio.create_task(self._read_loop(self._reader), name="cln-rpc-reader")

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        """Replies are framed on bytes: lightningd ends each JSON message with a blank
        line ("\\n\\n", which JSON text never contains unescaped). Only a whole message
        is decoded, so a UTF-8 character split across two reads is never cut, and each
        byte is scanned once, so a reply of many megabytes parses in linear time."""
        buf = bytearray()
        try:
            while True:
                chunk = await reader.read(1 << 20)
                if not chunk:
                    break
                search_from = max(0, len(buf) - 1)   # a separator may straddle old and new bytes
                buf += chunk
                start = 0
                while (end := buf.find(b"\n\n", search_from)) >= 0:
                    self._deliver(bytes(buf[start:end]))
                    start = search_from = end + 2
                if start:
                    del buf[:start]
                if len(buf) > STREAM_LIMIT:
                    log.warning("lightningd sent a reply larger than %d bytes; reconnecting", STREAM_LIMIT)
                    break
        except OSError as exc:
            log.warning("lightningd connection lost: %s", exc)
        finally:
            self._fail_pending(NodeError("connection to lightningd closed"))
            if self._writer is not None:
                self._writer.close()
            self._writer = None

    def _deliver(self, raw: bytes) -> None:
        if not raw.strip():
            return
        try:
            msg = json.loads(raw)
        except ValueError as exc:   # includes UnicodeDecodeError: not ours to guess at
            log.warning("undecodable reply from lightningd (%d bytes): %s", len(raw), exc)
            return
        fut = self._pending.pop(msg.get("id"), None) if isinstance(msg, dict) else None
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _fail_pending(self, err: Exception) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout_s: float | None = -1.0) -> Any:
        """Call `method`; timeout_s None waits forever (long polls), -1 uses the default."""
        await self._ensure()
        assert self._writer is not None
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        body = {"jsonrpc": "2.0", "id": req_id, "method": method,
                "params": {k: v for k, v in (params or {}).items() if v is not None}}
        self._writer.write(json.dumps(body).encode())
        await self._writer.drain()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives with the reply, and the caller's loop then never stops.
            async with asyncio.timeout(self.timeout_s if timeout_s == -1.0 else timeout_s):
                reply = await fut
        except TimeoutError:
            self._pending.pop(req_id, None)
            raise NodeError(f"{method}: no answer from lightningd within {self.timeout_s:.0f}s") from None
        finally:
            self._pending.pop(req_id, None)
        if "error" in reply:
            raise ClnRpcError(method, reply["error"])
        return reply.get("result")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._read_task is not None:
            self._read_task.cancel()
            try:
                await self._read_task
            except (asyncio.CancelledError, Exception):
                pass


class ClnNode:
    """The Node port on Core Lightning."""

    pays_offers = True
    pending_wait_s = 60.0   # how long pay() waits on an earlier attempt still in flight

    def __init__(self, rpc_file: str | Path, timeout_s: float = 120.0) -> None:
        self.rpc = ClnRpc(rpc_file, timeout_s)
        self.network = "unknown"
        self._id: str | None = None

    @property
    def cursor_namespace(self) -> str:
        return f"cln:{self._id}"

    async def connect(self) -> None:
        info = await self.rpc.call("getinfo")
        self._id, self.network = info["id"], info.get("network", "unknown")

    async def node_id(self) -> str:
        if self._id is None:
            await self.connect()
        return self._id  # type: ignore[return-value]

    async def create_invoice(self, amount_msat: int | None, label: str, description: str,
                             expiry_s: int, *, hash_description: bool = False) -> Invoice:
        params: dict[str, Any] = {"amount_msat": "any" if amount_msat is None else amount_msat, "label": label,
                                  "description": description, "expiry": expiry_s}
        if hash_description:
            params["deschashonly"] = True
        try:
            r = await self.rpc.call("invoice", params)
        except ClnRpcError as exc:
            if exc.cln_code != INVOICE_LABEL_ALREADY_EXISTS:
                raise
            existing = (await self.rpc.call("listinvoices", {"label": label}))["invoices"][0]
            if "description" in existing:          # lightningd keeps the text, hashed or not
                same_text = existing["description"] == description
            else:
                digest = (await self.decode(existing["bolt11"])).description_hash
                same_text = hash_description and digest == hashlib.sha256(description.encode()).hexdigest()
            if existing.get("amount_msat") != amount_msat or not same_text:
                raise DuplicateLabel(f"label {label!r} already used for a different invoice") from None
            return Invoice(existing["bolt11"], existing["payment_hash"], amount_msat,
                           existing["expires_at"], label, existing.get("created_index", 0))
        return Invoice(r["bolt11"], r["payment_hash"], amount_msat, r["expires_at"], label,
                       r.get("created_index", 0))

    async def has_invoice(self, payment_hash: str) -> bool:
        """lightningd keeps its invoices across restarts (a pending challenge's invoice has
        at least a minute to live, so autoclean has not removed it): no call needed."""
        return True

    async def delete_invoice(self, label: str) -> bool:
        """`delinvoice` with status "unpaid": lightningd refuses (and nothing is deleted)
        when the invoice was paid meanwhile or never existed."""
        try:
            await self.rpc.call("delinvoice", {"label": label, "status": "unpaid"})
        except ClnRpcError:
            return False
        return True

    async def settlements(self, after_pay_index: int) -> AsyncIterator[Settlement]:
        cursor = after_pay_index
        while True:
            inv = await self.rpc.call("waitanyinvoice", {"lastpay_index": cursor}, timeout_s=None)
            if inv.get("status") != "paid" or "pay_index" not in inv:
                continue
            cursor = inv["pay_index"]
            yield Settlement(cursor, inv["label"], inv["payment_hash"],
                             inv.get("amount_received_msat", inv.get("amount_msat", 0)),
                             inv.get("payment_preimage", ""), inv.get("paid_at", 0))

    async def pay(self, bolt11: str, max_fee_msat: int | None = None,
                  label: str | None = None, retry_for_s: int | None = None,
                  amount_msat: int | None = None, subject: str = "") -> Payment:
        waited = False
        while True:
            try:
                r = await self.rpc.call("xpay", {"invstring": bolt11, "maxfee": max_fee_msat, "label": label,
                                                 "retry_for": retry_for_s, "amount_msat": amount_msat},
                                        timeout_s=None)
                break
            except ClnRpcError as exc:
                # Already paid earlier (e.g. by a run that crashed)? Then that payment counts.
                # Still out (an attempt from before a restart)? Wait a while for its outcome:
                # complete counts, failed means it is safe to pay now; still pending after
                # that, and the outcome is not known yet.
                try:   # BOLT11 or BOLT12 invoice
                    d = await self.rpc.call("decode", {"string": bolt11})
                    payment_hash = d.get("payment_hash") or d.get("invoice_payment_hash")
                except ClnRpcError:
                    payment_hash = None
                status = await self.payment_status(payment_hash) if payment_hash else None
                if status is not None and status.state == "pending" and not waited:
                    waited = True
                    status = await self._wait_while_pending(payment_hash, self.pending_wait_s)  # type: ignore[arg-type]
                    if status is not None and status.state == "failed":
                        continue           # the earlier attempt failed for good: pay now
                if status is not None and status.state == "complete" and status.payment is not None:
                    return status.payment
                if status is not None and status.state == "pending":
                    raise PaymentUnknown(f"the payment is still in flight ({exc.cln_message})") from None
                raise _payment_failed(exc) from None
        preimage = r["payment_preimage"]
        return Payment(hashlib.sha256(bytes.fromhex(preimage)).hexdigest(), preimage, r["amount_msat"],
                       r["amount_sent_msat"] - r["amount_msat"])

    async def keysend(self, destination: str, amount_msat: int, *, label: str | None = None,
                      max_fee_msat: int | None = None, extratlvs: dict[str, str] | None = None,
                      retry_for_s: int | None = None, subject: str = "") -> Payment:
        try:
            r = await self.rpc.call("xkeysend", {
                "destination": destination, "amount_msat": amount_msat, "label": label,
                "maxfee": max_fee_msat, "extratlvs": extratlvs, "retry_for": retry_for_s}, timeout_s=None)
        except ClnRpcError as exc:
            raise _payment_failed(exc) from None
        preimage = r["payment_preimage"]
        return Payment(hashlib.sha256(bytes.fromhex(preimage)).hexdigest(), preimage, r["amount_msat"],
                       r["amount_sent_msat"] - r["amount_msat"])

    async def fetch_invoice(self, offer: str, amount_msat: int) -> tuple[str, str]:
        """A BOLT12 invoice for `offer`, and its payment hash."""
        try:
            r = await self.rpc.call("fetchinvoice", {"offer": offer, "amount_msat": amount_msat})
            d = await self.rpc.call("decode", {"string": r["invoice"]})
        except ClnRpcError as exc:
            raise PaymentFailed(f"fetchinvoice failed: {exc.cln_message}", cln_code=exc.cln_code) from None
        return r["invoice"], d["invoice_payment_hash"]

    async def _wait_while_pending(self, payment_hash: str, timeout_s: float) -> PaymentStatus | None:
        """lightningd's record of the payment once it is no longer pending (or when
        `timeout_s` has passed): after a restart, its HTLC resolves once the peer is back."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            status = await self.payment_status(payment_hash)
            if status is None or status.state != "pending" or asyncio.get_running_loop().time() >= deadline:
                return status
            await asyncio.sleep(0.5)

    async def payment_status(self, payment_hash: str) -> PaymentStatus | None:
        """From lightningd's own record (listsendpays): complete if any part completed,
        pending if any part is still out, failed if every part failed, None if never tried."""
        parts = (await self.rpc.call("listsendpays", {"payment_hash": payment_hash}))["payments"]
        done = [p for p in parts if p.get("status") == "complete"]
        if done:
            amount = sum(p.get("amount_msat", 0) for p in done)
            sent = sum(p.get("amount_sent_msat", 0) for p in done)
            return PaymentStatus("complete", Payment(payment_hash, done[0].get("payment_preimage", ""), amount,
                                                     sent - amount))
        if any(p.get("status") == "pending" for p in parts):
            return PaymentStatus("pending")
        return PaymentStatus("failed") if parts else None

    async def list_invoices(self, index: str, start: int, limit: int) -> list[dict[str, Any]]:
        """One page of the node's invoices, in `index` (created/updated) order from `start`."""
        return (await self.rpc.call("listinvoices", {"index": index, "start": start, "limit": limit}))["invoices"]

    async def sendpays_position(self) -> int:
        r = await self.rpc.call("wait", {"subsystem": "sendpays", "indexname": "created", "nextvalue": 0})
        return int(r.get("created", 0)) + 1

    async def lookup_payment(self, label: str, start: int) -> PaymentStatus | None:
        parts = (await self.rpc.call("listsendpays", {"index": "created", "start": start}))["payments"]
        mine = [p for p in parts if p.get("label") == label]
        done = [p for p in mine if p.get("status") == "complete"]
        if done:
            amount = sum(p["amount_msat"] for p in done)
            fee = sum(p["amount_sent_msat"] for p in done) - amount
            return PaymentStatus("complete", Payment(done[0]["payment_hash"], done[0].get("payment_preimage", ""),
                                                     amount, fee), done[0]["payment_hash"])
        pending = [p for p in mine if p.get("status") == "pending"]
        if pending:
            return PaymentStatus("pending", payment_hash=pending[0]["payment_hash"])
        return PaymentStatus("failed", payment_hash=mine[0]["payment_hash"]) if mine else None

    async def htlc_in_flight(self, payment_hash: str) -> bool:
        channels = (await self.rpc.call("listpeerchannels"))["channels"]
        return any(h.get("payment_hash") == payment_hash and h.get("direction") == "out"
                   for c in channels for h in c.get("htlcs", []))

    async def liquidity(self) -> Liquidity:
        inbound = outbound = 0
        for c in (await self.rpc.call("listpeerchannels"))["channels"]:
            if c.get("state") == "CHANNELD_NORMAL" and c.get("peer_connected"):
                inbound += int(c.get("receivable_msat", 0))
                outbound += int(c.get("spendable_msat", 0))
        return Liquidity(inbound, outbound)

    async def wait_until_ready(self, timeout_s: float) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            channels = (await self.rpc.call("listpeerchannels"))["channels"]
            if any(c.get("state") == "CHANNELD_NORMAL" and c.get("peer_connected") for c in channels):
                return True
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(1.0)

    async def decode(self, bolt11: str) -> DecodedInvoice:
        try:
            d = await self.rpc.call("decode", {"string": bolt11})
        except ClnRpcError as exc:
            raise BadRequest(f"not a valid invoice: {exc.cln_message}") from None
        if not d.get("valid") or "payment_hash" not in d:
            raise BadRequest("not a valid BOLT11 invoice")
        created = d.get("created_at", 0)
        return DecodedInvoice(d["payment_hash"], d.get("amount_msat"), d.get("payee", ""), created,
                              created + d.get("expiry", 3600), d.get("description", ""),
                              d.get("currency", ""), d.get("description_hash"))

    async def close(self) -> None:
        await self.rpc.close()


def _payment_failed(exc: ClnRpcError) -> PaymentFailed:
    """lightningd's refusal as the port's PaymentFailed; `no_liquidity` when no route had
    the capacity (the stream engine waits longer before it tries again)."""
    return PaymentFailed(f"payment failed: {exc.cln_message}", cln_code=exc.cln_code,
                         no_liquidity=exc.cln_code in LIQUIDITY_CODES)
