"""The Node port: what micropay needs from a Lightning node.

Adapters: `sandbox.SandboxNode` (in-process test network) and `cln.ClnNode`
(Core Lightning over its JSON-RPC socket). Amounts are integer millisatoshis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Invoice:
    bolt11: str
    payment_hash: str      # hex
    amount_msat: int
    expires_at: int        # unix seconds
    label: str
    created_index: int = 0


@dataclass(frozen=True, slots=True)
class Settlement:
    """An invoice of ours that got paid. `pay_index` orders settlements; a consumer
    persists the highest one it has handled and resumes after it."""

    pay_index: int
    label: str
    payment_hash: str
    amount_msat: int       # amount received (may exceed the invoice amount)
    preimage: str
    paid_at: int


@dataclass(frozen=True, slots=True)
class Payment:
    payment_hash: str
    preimage: str
    amount_msat: int       # delivered to the destination
    fee_msat: int


@dataclass(frozen=True, slots=True)
class DecodedInvoice:
    payment_hash: str
    amount_msat: int | None
    payee: str
    created_at: int
    expires_at: int
    description: str
    currency: str          # "bc", "tb", "bcrt", ...


@runtime_checkable
class Node(Protocol):
    network: str           # "regtest", "bitcoin", ...

    async def node_id(self) -> str: ...

    async def create_invoice(self, amount_msat: int, label: str, description: str,
                             expiry_s: int) -> Invoice:
        """Idempotent by label: the same label returns the same invoice."""
        ...

    def settlements(self, after_pay_index: int) -> AsyncIterator[Settlement]:
        """Yields every settlement with pay_index > after_pay_index, then waits for more."""
        ...

    async def pay(self, bolt11: str, max_fee_msat: int | None = None,
                  label: str | None = None) -> Payment: ...

    async def decode(self, bolt11: str) -> DecodedInvoice: ...

    async def close(self) -> None: ...
