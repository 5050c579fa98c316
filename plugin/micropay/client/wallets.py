"""Wallets the paying client pays through: a node (any Node adapter, the sandbox's or a
CLN node's), or a sidecar's sandbox wallet over HTTP. nwc_wallet.py adds Nostr Wallet
Connect. A wallet pays a BOLT11 invoice and says what it paid; a NodeWallet also settles
a payment from the node's own record of it (lightning/outcome.py)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from ..core.errors import BadRequest, PaymentFailed, PaymentUnknown, RequestFailed
from ..core.inputs import load_json, read_bounded
from ..lightning.base import Node
from ..lightning.outcome import ORPHAN_GRACE_S, Settled, settle_payment

MAX_WALLET_REPLY = 64 * 1024           # a sandbox wallet's JSON reply


@dataclass(frozen=True)
class PaidInvoice:
    preimage: str
    amount_msat: int
    fee_msat: int


class Wallet(Protocol):
    async def pay(self, bolt11: str, amount_msat: int, max_fee_msat: int) -> PaidInvoice: ...


class PaymentNeverLeft(PaymentFailed):
    """The node recorded the payment but it is dead (pending with no HTLC behind it past
    the grace): nothing was paid, and this node cannot pay that invoice any more."""

    code = "payment_dead"
    rpc_code = 1520


class NodeWallet:
    """Pays with any Node adapter (an in-process sandbox node, or a CLN node)."""

    def __init__(self, node: Node, orphan_grace_s: float = ORPHAN_GRACE_S) -> None:
        self.node, self.orphan_grace_s = node, orphan_grace_s

    async def settle(self, payment_hash: str, orphan_since: float | None, now: float) -> Settled:
        """What the node recorded of our payment to this hash (lightning/outcome.py)."""
        return await settle_payment(self.node, payment_hash=payment_hash, orphan_since=orphan_since, now=now,
                                    grace_s=self.orphan_grace_s)

    async def pay(self, bolt11: str, amount_msat: int, max_fee_msat: int) -> PaidInvoice:
        p = await self.node.pay(bolt11, max_fee_msat=max_fee_msat)
        return PaidInvoice(p.preimage, p.amount_msat, p.fee_msat)

    async def invoice_any(self, description: str, expiry_s: int) -> str:
        """An amountless invoice of this node (a Payment session's return invoice)."""
        inv = await self.node.create_invoice(None, f"micropay-return-{os.urandom(8).hex()}", description, expiry_s)
        return inv.bolt11


class SandboxHttpWallet:
    """A sandbox wallet exposed by a sidecar in sandbox mode: .../sandbox/wallets/<name>."""

    def __init__(self, url: str, session: aiohttp.ClientSession | None = None) -> None:
        self.url, self._session = url.rstrip("/"), session

    async def pay(self, bolt11: str, amount_msat: int, max_fee_msat: int) -> PaidInvoice:
        async with contextlib.AsyncExitStack() as stack:
            session = self._session or await stack.enter_async_context(aiohttp.ClientSession())
            try:
                async with session.post(f"{self.url}/pay",
                                        json={"bolt11": bolt11, "max_fee_msat": max_fee_msat}) as r:
                    status, (raw, _) = r.status, await read_bounded(r.content, MAX_WALLET_REPLY)
            except ValueError as exc:
                raise PaymentFailed(f"sandbox wallet URL {self.url} is not valid ({exc})") from None
            except aiohttp.ClientConnectorError as exc:       # never reached it: nothing paid
                raise PaymentFailed(f"sandbox wallet at {self.url} unreachable ({type(exc).__name__})") from None
            except (aiohttp.ClientError, TimeoutError) as exc:  # reached it: it may have paid
                raise PaymentUnknown(f"sandbox wallet at {self.url} did not answer ({type(exc).__name__}); "
                                     "the payment will be finished on the next request") from None
        try:
            body = load_json(raw, "the sandbox wallet's reply")
        except BadRequest:
            raise PaymentFailed(f"the sandbox wallet at {self.url} answered {status} without JSON") from None
        if not isinstance(body, dict):
            raise PaymentFailed(f"the sandbox wallet at {self.url} answered {status} with no object")
        if status != 200:
            raise PaymentFailed(f"sandbox wallet refused: {body.get('detail', status)}")
        paid = (body.get("preimage"), body.get("amount_msat"), body.get("fee_msat"))
        if not (isinstance(paid[0], str) and all(isinstance(v, int) for v in paid[1:])):
            raise PaymentFailed("the sandbox wallet's reply lacks preimage, amount_msat or fee_msat")
        return PaidInvoice(*paid)  # type: ignore[arg-type]

    async def invoice_any(self, description: str, expiry_s: int) -> str:
        """An amountless invoice of this sandbox wallet (a Payment session's return invoice)."""
        async with contextlib.AsyncExitStack() as stack:
            session = self._session or await stack.enter_async_context(aiohttp.ClientSession())
            try:
                async with session.post(f"{self.url}/invoice", json={"description": description[:200]}) as r:
                    status, (raw, _) = r.status, await read_bounded(r.content, MAX_WALLET_REPLY)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise RequestFailed(f"sandbox wallet at {self.url}: {type(exc).__name__}") from None
        try:
            body = load_json(raw, "the sandbox wallet's reply")
        except BadRequest:
            body = None
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("bolt11"), str):
            raise RequestFailed(f"the sandbox wallet at {self.url} made no invoice ({status})")
        return body["bolt11"]
