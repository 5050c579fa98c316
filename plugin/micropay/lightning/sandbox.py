"""An in-process Lightning network for tests and for integrators' test mode.

Nodes have secp256k1 keys and issue real BOLT11 invoices (regtest prefix `bcrt`,
signed with coincurve) that the bolt11 package and lightningd's `decode` accept.
Paying an invoice through another sandbox node moves msat between their balances and
settles the invoice, which then appears in the payee's settlement stream. Keysend moves
msat to a node of the network without an invoice. Payments are atomic: complete, or
never made. Offers (BOLT12) are not supported: `pays_offers` is False.
State lives in memory: a restarted sandbox starts empty (tokens already issued keep
verifying, since verification needs no node).
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from coincurve import PrivateKey

from ..core.errors import DuplicateLabel, PaymentFailed
from ..core.params import MAX_MSAT
from .base import DecodedInvoice, Invoice, Liquidity, Payment, PaymentStatus, Settlement
from .bolt11codec import InvalidInvoice, decode_invoice, encode_invoice

Clock = Callable[[], float]


@dataclass
class _InvoiceState:
    invoice: Invoice
    preimage: bytes
    description: str
    paid_by: str | None = None
    settlement: Settlement | None = None


PLAY_MONEY_MSAT = 100_000_000_000   # 1 BTC: what sandbox wallets and the sidecar's own node start with


class SandboxNetwork:
    def __init__(self, clock: Clock = time.time, fee_ppm: int = 0) -> None:
        self.clock, self.fee_ppm = clock, fee_ppm
        self.nodes: dict[str, "SandboxNode"] = {}
        self.instance_id = os.urandom(4).hex()   # settlement cursors are per instance

    def add_node(self, alias: str, balance_msat: int = 0) -> "SandboxNode":
        node = SandboxNode(self, alias, PrivateKey(), balance_msat)
        self.nodes[node.id] = node
        return node

    def fee_for(self, amount_msat: int) -> int:
        return amount_msat * self.fee_ppm // 1_000_000


@dataclass(frozen=True, slots=True)
class _Sent:
    """An outgoing payment, as the node records it (listsendpays on Core Lightning)."""

    index: int
    label: str | None
    payment: Payment


class SandboxNode:
    """The Node port on the in-process network."""

    network = "regtest"
    pays_offers = False

    def __init__(self, net: SandboxNetwork, alias: str, key: PrivateKey, balance_msat: int) -> None:
        self.net, self.alias, self._key = net, alias, key
        self.id = key.public_key.format(compressed=True).hex()
        self.balance_msat = balance_msat
        self._by_hash: dict[str, _InvoiceState] = {}
        self._by_label: dict[str, _InvoiceState] = {}
        self._settled: list[Settlement] = []
        self._created = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._sent: dict[str, Payment] = {}       # outgoing, by payment hash
        self._sends: list[_Sent] = []             # outgoing, in order, with their labels
        self.keysends_received: list[tuple[int, dict[str, str]]] = []   # (amount, extra TLVs)

    @property
    def cursor_namespace(self) -> str:
        return f"sandbox:{self.net.instance_id}:{self.id}"

    async def node_id(self) -> str:
        return self.id

    async def create_invoice(self, amount_msat: int | None, label: str, description: str,
                             expiry_s: int, *, hash_description: bool = False) -> Invoice:
        existing = self._by_label.get(label)
        if existing is not None:
            inv = existing.invoice
            if inv.amount_msat != amount_msat or existing.description != description:
                raise DuplicateLabel(f"label {label!r} already used for a different invoice")
            return inv
        if amount_msat is not None and amount_msat <= 0:
            raise InvalidInvoice("amount_msat must be positive")
        preimage = os.urandom(32)
        payment_hash = hashlib.sha256(preimage).digest()
        now = int(self.net.clock())
        bolt11 = encode_invoice(currency="bcrt", amount_msat=amount_msat, payment_hash=payment_hash,
                                payment_secret=os.urandom(32), description=description,
                                created_at=now, expiry_s=expiry_s, privkey_hex=self._key.secret.hex(),
                                hash_description=hash_description)
        self._created += 1
        inv = Invoice(bolt11, payment_hash.hex(), amount_msat, now + expiry_s, label, self._created)
        state = _InvoiceState(inv, preimage, description)
        self._by_hash[inv.payment_hash] = self._by_label[label] = state
        return inv

    async def settlements(self, after_pay_index: int) -> AsyncIterator[Settlement]:
        cursor = after_pay_index
        while True:
            while cursor < len(self._settled):
                cursor += 1
                yield self._settled[cursor - 1]
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.add(fut)
            try:
                await fut
            finally:
                self._waiters.discard(fut)

    async def decode(self, bolt11: str) -> DecodedInvoice:
        return decode_invoice(bolt11)

    async def pay(self, bolt11: str, max_fee_msat: int | None = None, label: str | None = None,
                  retry_for_s: int | None = None, amount_msat: int | None = None, subject: str = "") -> Payment:
        dec = decode_invoice(bolt11)
        payee = self.net.nodes.get(dec.payee)
        state = payee._by_hash.get(dec.payment_hash) if payee else None
        if payee is None or state is None:
            raise PaymentFailed("no route to the payee: not a node of this sandbox network")
        if dec.amount_msat is None and amount_msat is None:
            raise PaymentFailed("an amountless invoice needs amount_msat")
        if dec.amount_msat is not None and amount_msat is not None and amount_msat != dec.amount_msat:
            raise PaymentFailed("amount_msat differs from the invoice's amount")
        if amount_msat is not None and amount_msat <= 0:
            raise PaymentFailed("amount_msat must be positive")
        amount = dec.amount_msat if dec.amount_msat is not None else amount_msat
        assert amount is not None
        fee = self.net.fee_for(amount)
        if state.settlement is not None:
            if state.paid_by == self.id:  # paying again is a no-op, like xpay on a paid invoice
                return Payment(dec.payment_hash, state.preimage.hex(), amount, fee)
            raise PaymentFailed("invoice already paid")
        if self.net.clock() > dec.expires_at:
            raise PaymentFailed("invoice expired")
        if max_fee_msat is not None and fee > max_fee_msat:
            raise PaymentFailed(f"fee {fee} msat exceeds max_fee_msat {max_fee_msat}")
        if self.balance_msat < amount + fee:
            raise PaymentFailed(f"insufficient balance: {self.balance_msat} msat")
        self.balance_msat -= amount + fee
        payee.balance_msat += amount
        state.paid_by = self.id
        payee._settle(state, amount)
        return self._record(Payment(dec.payment_hash, state.preimage.hex(), amount, fee), label)

    async def keysend(self, destination: str, amount_msat: int, *, label: str | None = None,
                      max_fee_msat: int | None = None, extratlvs: dict[str, str] | None = None,
                      retry_for_s: int | None = None, subject: str = "") -> Payment:
        payee = self.net.nodes.get(destination)
        if payee is None or payee is self:
            raise PaymentFailed("no route to the destination: not another node of this sandbox network")
        if amount_msat <= 0:
            raise PaymentFailed("amount_msat must be positive")
        fee = self.net.fee_for(amount_msat)
        if max_fee_msat is not None and fee > max_fee_msat:
            raise PaymentFailed(f"fee {fee} msat exceeds max_fee_msat {max_fee_msat}")
        if self.balance_msat < amount_msat + fee:
            raise PaymentFailed(f"insufficient balance: {self.balance_msat} msat", no_liquidity=True)
        preimage = os.urandom(32)
        self.balance_msat -= amount_msat + fee
        payee.balance_msat += amount_msat
        payee.keysends_received.append((amount_msat, dict(extratlvs or {})))
        return self._record(Payment(hashlib.sha256(preimage).hexdigest(), preimage.hex(), amount_msat, fee), label)

    async def fetch_invoice(self, offer: str, amount_msat: int) -> tuple[str, str]:
        raise PaymentFailed("the sandbox does not support offers (BOLT12); use the cln backend")

    def _record(self, p: Payment, label: str | None) -> Payment:
        self._sent[p.payment_hash] = p
        self._sends.append(_Sent(len(self._sends) + 1, label, p))
        return p

    async def sendpays_position(self) -> int:
        return len(self._sends) + 1

    async def lookup_payment(self, label: str, start: int) -> PaymentStatus | None:
        for sent in self._sends[max(0, start - 1):]:
            if sent.label == label:
                return PaymentStatus("complete", sent.payment, sent.payment.payment_hash)
        return None

    async def htlc_in_flight(self, payment_hash: str) -> bool:
        return False           # payments are atomic: nothing is ever in flight

    async def liquidity(self) -> Liquidity:
        # no channels: a sandbox node receives any amount and spends its balance
        return Liquidity(MAX_MSAT, self.balance_msat)

    async def list_invoices(self, index: str, start: int, limit: int) -> list[dict[str, Any]]:
        """Its invoices in creation order (the sandbox keeps no separate update order:
        "updated" lists them in the order they were paid, unpaid ones last)."""
        states = sorted(self._by_hash.values(), key=lambda st: st.invoice.created_index)
        out = []
        for st in states:
            inv = st.invoice
            updated = st.settlement.pay_index if st.settlement is not None else None
            out.append({"label": inv.label, "bolt11": inv.bolt11, "payment_hash": inv.payment_hash,
                        "amount_msat": inv.amount_msat, "status": self.invoice_status(inv.payment_hash),
                        "expires_at": inv.expires_at, "created_index": inv.created_index,
                        "updated_index": updated,
                        "paid_at": st.settlement.paid_at if st.settlement is not None else None,
                        "amount_received_msat": st.settlement.amount_msat if st.settlement is not None else None})
        key = "created_index" if index == "created" else "updated_index"
        return [r for r in out if r[key] is not None and r[key] >= start][:limit]

    async def payment_status(self, payment_hash: str) -> PaymentStatus | None:
        """Sandbox payments are atomic: complete, or never made."""
        p = self._sent.get(payment_hash)
        return PaymentStatus("complete", p) if p is not None else None

    async def wait_until_ready(self, timeout_s: float) -> bool:
        return True

    def _settle(self, state: _InvoiceState, amount_msat: int) -> None:
        s = Settlement(len(self._settled) + 1, state.invoice.label, state.invoice.payment_hash,
                       amount_msat, state.preimage.hex(), int(self.net.clock()))
        state.settlement = s
        self._settled.append(s)
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_result(None)

    async def has_invoice(self, payment_hash: str) -> bool:
        return payment_hash in self._by_hash

    async def delete_invoice(self, label: str) -> bool:
        state = self._by_label.get(label)
        if state is None or state.settlement is not None:
            return False
        del self._by_label[label]
        self._by_hash.pop(state.invoice.payment_hash, None)
        return True

    def invoice_status(self, payment_hash: str) -> str | None:
        state = self._by_hash.get(payment_hash)
        if state is None:
            return None
        if state.settlement is not None:
            return "paid"
        return "expired" if self.net.clock() > state.invoice.expires_at else "unpaid"

    async def close(self) -> None:
        for fut in list(self._waiters):
            if not fut.done():
                fut.cancel()
