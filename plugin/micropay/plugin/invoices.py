"""Priced invoices with L402 tokens, issued by the node (the plugin's micropay-invoice).

Each issue is keyed by its invoice label: the label makes `invoice` idempotent, the
token id is derived from the label, and the record is written must-create in the
node's datastore, so the same label always yields the same invoice and token, also
after a crash between any two steps.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..payment import scheme as payment_auth
from ..core.errors import BadRequest, InvalidCredential, PaymentSchemeError
from ..core.inputs import decimal
from ..l402.wire import parse_authorization
from ..lightning.base import Node, RecordExists, RecordStore
from ..l402.macaroon import Macaroon
from ..core.params import int_param, msat_param
from ..store import Store
from ..store.issued import IssuedInvoiceRepository
from ..store.l402 import L402Repository
from ..l402.tokens import TokenService, decode_identifier

MAX_DESCRIPTION = 640
MAX_METADATA_BYTES = 4096
STATUSES = ("unpaid", "paid", "expired")
LIST_PAGE = 1000                 # node invoices read per listinvoices call
DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT = 100, 10_000
_SERVICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class IssuedInvoice:
    label: str
    bolt11: str
    payment_hash: str
    amount_msat: int
    expires_at: int
    token: str
    token_id: str
    services: str
    credits: int | None
    description: str
    created_at: int
    metadata: dict[str, Any] = field(default_factory=dict)
    payment_challenge: str | None = None   # WWW-Authenticate: Payment (MPP charge) on the same invoice

    def public(self) -> dict[str, Any]:
        return asdict(self)


def token_id_for_label(label: str) -> bytes:
    return hashlib.sha256(b"micropay-invoice-label\0" + label.encode()).digest()


class InvoiceIssuer:
    def __init__(self, node: Node, datastore: RecordStore, tokens: TokenService, store: Store,
                 default_expiry_s: Callable[[], int] = lambda: 3600) -> None:
        self.node, self.ds, self.tokens = node, datastore, tokens
        self.issued, self.l402 = IssuedInvoiceRepository(store), L402Repository(store)
        self.default_expiry_s = default_expiry_s      # read per call: the option is dynamic

    async def issue(self, amount_msat: Any, description: Any, label: Any = None, expiry: Any = None,
                    services: Any = None, credits: Any = None, metadata: Any = None) -> dict[str, Any]:
        amount = msat_param(amount_msat, "amount_msat")
        if not isinstance(description, str) or not description or len(description) > MAX_DESCRIPTION:
            raise BadRequest(f"description must be a non-empty string of at most {MAX_DESCRIPTION} characters")
        if label is None:
            label = f"micropay-{os.urandom(16).hex()}"
        if not isinstance(label, str) or not label or len(label) > 200:
            raise BadRequest("label must be a non-empty string of at most 200 characters")
        expiry_s = self.default_expiry_s() if expiry is None else int_param(expiry, "expiry", 1, 365 * 86400)
        services_text = _services(services, self.tokens.service)
        n_credits = None if credits is None else int_param(credits, "credits", 1, 1_000_000)
        meta = {} if metadata is None else metadata
        if not isinstance(meta, dict) or len(json.dumps(meta)) > MAX_METADATA_BYTES:
            raise BadRequest(f"metadata must be a JSON object of at most {MAX_METADATA_BYTES} bytes")
        key = ("invoice", label)
        existing = await self.ds.get(key)
        if existing is not None:
            same = self._same_or_conflict(existing[0], amount, description, services_text, n_credits, meta)
            # a crash may have come between the datastore record and its index entry
            await self.issued.record(label, json.dumps(same), int(same.get("created_at", 0)))
            return same
        invoice = await self.node.create_invoice(amount, label, description, expiry_s)
        caveats = [f"services={services_text}"] + ([f"credits={n_credits}"] if n_credits else [])
        mac = self.tokens.mint(bytes.fromhex(invoice.payment_hash), caveats, token_id_for_label(label))
        challenge = None
        if payment_auth.whole_sats(amount) and n_credits in (None, 1):
            challenge = payment_auth.charge_challenge(
                payment_auth.binder_for(self.tokens.keyring), realm=self.tokens.service, bolt11=invoice.bolt11,
                payment_hash=invoice.payment_hash, price_msat=amount, expires_at=invoice.expires_at,
                description=description[:200], opaque={"token": token_id_for_label(label).hex(), "label": label},
            ).header()
        record = IssuedInvoice(label, invoice.bolt11, invoice.payment_hash, amount, invoice.expires_at,
                               mac.serialize(), token_id_for_label(label).hex(), services_text, n_credits,
                               description, int(time.time()), meta, challenge)
        try:
            await self.ds.create(key, record.public())
        except RecordExists:   # a concurrent call with the same label won
            stored = await self.ds.get(key)
            assert stored is not None
            return self._same_or_conflict(stored[0], amount, description, services_text, n_credits, meta)
        await self.issued.record(label, json.dumps(record.public()), record.created_at)
        return record.public()

    @staticmethod
    def _same_or_conflict(stored: dict[str, Any], amount: int, description: str, services: str,
                          credits: int | None, meta: dict[str, Any]) -> dict[str, Any]:
        if (stored["amount_msat"], stored["description"], stored["services"], stored["credits"],
                stored.get("metadata", {})) != (amount, description, services, credits, meta):
            raise BadRequest(f"label {stored['label']!r} was already used with different parameters")
        return stored

    async def verify(self, credential: Any, path: Any = None, method: Any = None) -> dict[str, Any]:
        if not isinstance(credential, str) or not credential:
            raise BadRequest("credential must be a string: 'L402 <macaroon>:<preimage>', '<macaroon>:<preimage>' "
                             "or 'Payment <base64url>'")
        if payment_auth.is_payment(credential):
            return await self._verify_payment(credential)
        header = credential if credential.split(" ", 1)[0].upper() in ("L402", "LSAT") else f"L402 {credential}"
        if path is not None and (not isinstance(path, str) or not path.startswith("/")):
            raise BadRequest("path must start with '/'")
        if method is not None and not isinstance(method, str):
            raise BadRequest("method must be a string")
        cred = parse_authorization(header)          # MalformedCredential -> -32602
        assert cred is not None
        mac = Macaroon.deserialize(cred.macaroons[0])
        payment_hash, token_id = decode_identifier(mac.identifier)
        out: dict[str, Any] = {"valid": False, "reason": None, "token_id": token_id.hex(),
                               "payment_hash": payment_hash.hex(),
                               "caveats": [c.decode("utf-8", "replace") for c in mac.caveats],
                               "credits_left": None}
        try:
            token = self.tokens.verify_credential(cred)
            token.constraints.check(self.tokens.service, method.upper() if method else None, path,
                                    self.tokens.clock())
        except InvalidCredential as err:
            out["reason"] = err.message
            return out
        if token.constraints.credits is not None:
            left = await self.l402.credits_remaining(token.token_id_hex)
            out["credits_left"] = token.constraints.credits if left is None else left
        out["valid"] = True
        return out

    async def _verify_payment(self, credential: str) -> dict[str, Any]:
        """A Payment (MPP charge) credential for an invoice issued here: checked, then
        consumed, once (a second verify of it answers valid: false, already used). It
        spends the same credit ledger as the L402 token of that invoice."""
        now = int(self.tokens.clock())
        cred = payment_auth.parse_credential(credential)      # PaymentCredentialMalformed -> 1416
        out: dict[str, Any] = {"valid": False, "reason": None, "scheme": "Payment",
                               "challenge_id": cred.challenge.get("id"), "payment_hash": None, "label": None,
                               "receipt": None}
        try:
            charge = payment_auth.verify_charge(payment_auth.binder_for(self.tokens.keyring), cred,
                                                realm=self.tokens.service, now=now)
        except PaymentSchemeError as err:
            out["reason"] = err.message
            return out
        out["payment_hash"], out["label"] = charge.payment_hash, charge.opaque.get("label")
        if not await self.l402.consume_whole(charge.opaque.get("token", "")):
            out["reason"] = "this credential (or the L402 token of the same invoice) was already used"
            return out
        out["valid"], out["receipt"] = True, payment_auth.receipt(charge.challenge_id, charge.payment_hash, now)
        return out

    async def mirror(self) -> None:
        """Copy the datastore records into the store's index once (records issued before
        the index existed); from then on `issue` adds each new one."""
        if await self.issued.count() == 0:
            for key, rec, _ in await self.ds.list(("invoice",)):
                await self.issued.record(key[-1], json.dumps(rec), int(rec.get("created_at", 0)))

    async def list(self, status: Any = None, index: Any = None, start: Any = None,
                   limit: Any = None) -> dict[str, Any]:
        """Our invoices, in the node's `index` order from `start`: the node's invoices are
        read a page at a time (never all at once) and matched with our records by label.
        `next_start` is where the next call goes on from (None at the end)."""
        if status is not None and status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
        index = "created" if index is None else index
        if index not in ("created", "updated"):
            raise BadRequest("index must be 'created' or 'updated'")
        position = int_param(0 if start is None else start, "start", 0, 2**63)
        want = int_param(DEFAULT_LIST_LIMIT if limit is None else limit, "limit", 1, MAX_LIST_LIMIT)
        out: list[dict[str, Any]] = []
        while len(out) < want:
            page = await self.node.list_invoices(index, position, LIST_PAGE)
            if not page:
                return {"invoices": out, "next_start": None}
            ours = await self.issued.records([inv["label"] for inv in page])
            for inv in page:
                position = int(inv.get(f"{index}_index", position)) + 1
                rec = ours.get(inv["label"])
                if rec is None or (status is not None and inv["status"] != status):
                    continue
                out.append(dict(json.loads(rec), status=inv["status"], created_index=inv.get("created_index"),
                                updated_index=inv.get("updated_index"), paid_at=inv.get("paid_at"),
                                amount_received_msat=inv.get("amount_received_msat")))
                if len(out) == want:
                    break
            if len(page) < LIST_PAGE and len(out) < want:
                return {"invoices": out, "next_start": None}
        return {"invoices": out, "next_start": position}


def _services(value: Any, default_service: str) -> str:
    if value is None:
        return f"{default_service}:0"
    items = value if isinstance(value, list) else str(value).split(",") if isinstance(value, str) else None
    if not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise BadRequest("services must be 'name:tier[,name:tier]' or a list of such strings")
    out = []
    for item in items:
        name, _, tier = item.strip().partition(":")
        if not _SERVICE_NAME.fullmatch(name) or (tier and decimal(tier, 9) is None):
            raise BadRequest(f"bad service entry {item!r}: expected name:tier")
        out.append(f"{name}:{tier or 0}")
    return ",".join(out)
