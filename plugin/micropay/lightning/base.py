"""The ports to the node: `Node` (what micropay needs from a Lightning node) and
`RecordStore` (records the node keeps for us).

Adapters: `sandbox.SandboxNode` (in-process test network) and `cln.ClnNode` (Core
Lightning over its JSON-RPC socket); `datastore.Datastore` (lightningd's datastore) and
`memrecords.MemoryRecords` (in memory, for the sandbox and tests). Amounts are integer
millisatoshis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator, Protocol, runtime_checkable

from ..core.errors import RecordExists, StaleRecord

__all__ = ["DecodedInvoice", "Invoice", "Node", "Payment", "PaymentStatus", "RecordExists", "RecordStore",
           "Settlement", "StaleRecord"]


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
class PaymentStatus:
    """What the node itself has recorded of an outgoing payment (by payment hash)."""

    state: str                       # "complete" | "pending" | "failed"
    payment: Payment | None = None   # when complete
    payment_hash: str = ""


@dataclass(frozen=True, slots=True)
class DecodedInvoice:
    payment_hash: str
    amount_msat: int | None
    payee: str
    created_at: int
    expires_at: int
    description: str
    currency: str          # "bc", "tb", "bcrt", ...
    description_hash: str | None = None     # hex, when the invoice commits to a hash instead (`h` tag)


@dataclass(frozen=True, slots=True)
class Liquidity:
    """What a node can receive and send now, over its usable channels (msat)."""
    inbound_msat: int
    outbound_msat: int


@runtime_checkable
class Node(Protocol):
    """Everything micropay asks of a Lightning node; services depend on this, never on
    an adapter."""

    network: str           # "regtest", "bitcoin", ...
    pays_offers: bool      # whether fetch_invoice can work (BOLT12)

    @property
    def cursor_namespace(self) -> str:
        """Names this node's settlement sequence: a consumer's cursor is kept per namespace."""
        ...

    async def node_id(self) -> str: ...

    # -- receiving -------------------------------------------------------------------
    async def create_invoice(self, amount_msat: int | None, label: str, description: str,
                             expiry_s: int, *, hash_description: bool = False) -> Invoice:
        """Idempotent by label: the same label returns the same invoice. `amount_msat`
        None: an amountless invoice (the payer chooses; a session's return invoice).
        `hash_description`: the invoice carries sha256(description) instead of the text
        (BOLT11 `h`; LNURL-pay's metadata, NWC's description_hash)."""
        ...

    async def has_invoice(self, payment_hash: str) -> bool:
        """Whether the node can still be paid on this invoice of its own (an in-memory
        node forgets its invoices when it restarts)."""
        ...

    async def delete_invoice(self, label: str) -> bool:
        """Delete an unpaid invoice of ours (a fleet pool's invoice nobody claimed before it
        grew old). False when there is none under `label` or it is no longer unpaid."""
        ...

    def settlements(self, after_pay_index: int) -> AsyncIterator[Settlement]:
        """Yields every settlement with pay_index > after_pay_index, then waits for more."""
        ...

    async def list_invoices(self, index: str, start: int, limit: int) -> list[dict[str, Any]]:
        """One page of the node's invoices in `index` ("created" or "updated") order from
        `start`: each with label, status (unpaid/paid/expired), created_index,
        updated_index, paid_at, amount_received_msat."""
        ...

    # -- paying ----------------------------------------------------------------------
    async def pay(self, bolt11: str, max_fee_msat: int | None = None, label: str | None = None,
                  retry_for_s: int | None = None, amount_msat: int | None = None, subject: str = "") -> Payment:
        """Raises PaymentFailed (nothing is out) or PaymentUnknown (it may be).
        `amount_msat`: what to pay on an amountless invoice (refused on one with an amount).
        `subject`: whom the payment is for (a player), where caps per subject are kept
        outside this process (fleet mode's agents); other nodes ignore it."""
        ...

    async def keysend(self, destination: str, amount_msat: int, *, label: str | None = None,
                      max_fee_msat: int | None = None, extratlvs: dict[str, str] | None = None,
                      retry_for_s: int | None = None, subject: str = "") -> Payment: ...

    async def fetch_invoice(self, offer: str, amount_msat: int) -> tuple[str, str]:
        """A BOLT12 invoice for `offer`, and its payment hash (PaymentFailed when the node
        cannot pay offers: see pays_offers)."""
        ...

    async def decode(self, bolt11: str) -> DecodedInvoice: ...

    # -- what the node recorded of its payments ------------------------------------------
    async def payment_status(self, payment_hash: str) -> PaymentStatus | None:
        """The node's record of our payment to this hash; None if it never tried."""
        ...

    async def sendpays_position(self) -> int:
        """Where the node's payment records start for payments made from now on."""
        ...

    async def lookup_payment(self, label: str, start: int) -> PaymentStatus | None:
        """The node's record of the payment made under `label` (records from `start` on)."""
        ...

    async def htlc_in_flight(self, payment_hash: str) -> bool:
        """Whether an outgoing HTLC for this payment sits in any channel."""
        ...

    async def liquidity(self) -> Liquidity:
        """Receivable and spendable msat summed over channels that can carry a payment
        now (open, peer connected): the fleet's agents report it in their heartbeat."""
        ...

    async def wait_until_ready(self, timeout_s: float) -> bool:
        """Wait (at most timeout_s) until the node can pay: a channel is up with its peer
        connected. After a restart, payments sent before that fail for no good reason."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class RecordStore(Protocol):
    """JSON records kept by the node itself (Core Lightning's datastore), so they live and
    are backed up with the node. Keys are tuples of strings. `create` is must-create (a
    retry cannot overwrite: RecordExists); `replace` is must-replace at a known generation
    (two writers cannot both win: StaleRecord)."""

    async def get(self, key: tuple[str, ...] | list[str]) -> tuple[Any, int] | None: ...

    async def list(self, key: tuple[str, ...] | list[str]) -> list[tuple[list[str], Any, int]]:
        """Records directly under `key`: (their key, below the store's prefix; value; generation)."""
        ...

    async def create(self, key: tuple[str, ...] | list[str], value: Any) -> int: ...

    async def replace(self, key: tuple[str, ...] | list[str], value: Any, generation: int) -> int: ...

    async def delete(self, key: tuple[str, ...] | list[str]) -> None: ...
